"""DL inference engine: models loaded once per server process, shared by sessions.

    from inline.inference import get_model
    model = get_model("varnet_mni152", preference=["tensorrt", "compile", "eager"], precision="bf16")
    model.warm_up([(1, 8, 256, 256)])
    kspace_out = model.run(kspace, mask, acs_mask)  # numpy in, numpy out; cupy in, cupy out
    meta["InlineDLBackend"] = model.backend

* :mod:`.spec` - a model's weights file, its sha256 (checked at load) and its factory;
* :mod:`.registry` - the shipped models (name -> weights, checksum, factory);
* :mod:`.cache` - the process-wide, thread-safe cache and :func:`get_model` (backend choice);
* :mod:`.model` - :class:`LoadedModel`: input checks, array conversion, warm-up;
* :mod:`.backends` - eager, torch.compile (CUDA graphs), ONNX Runtime, TensorRT behind one interface;
* :mod:`.diskcache` - where exported models and engines are kept, and their (pure) keys.

Axis vocabulary (:mod:`models.varnet`): k-space ``(batch, coils, ky, kx)`` complex64, masks
``(batch, 1, ky, 1)`` float32 in {0, 1}.
"""

from __future__ import annotations

from inline.inference.backends import BACKENDS, DEFAULT_PREFERENCE, PRECISIONS
from inline.inference.cache import CacheStats, NoBackendAvailable, cache_stats, clear_cache, get_model
from inline.inference.model import LoadedModel
from inline.inference.registry import SHIPPED_MODELS, shipped_spec
from inline.inference.shapes import Shape, ShapeRange
from inline.inference.spec import ChecksumMismatch, ModelSpec, ModelSpecError, load_network

__all__ = [
    "BACKENDS", "DEFAULT_PREFERENCE", "PRECISIONS", "CacheStats", "ChecksumMismatch", "LoadedModel",
    "ModelSpec", "ModelSpecError", "NoBackendAvailable", "SHIPPED_MODELS", "Shape", "ShapeRange",
    "cache_stats", "clear_cache", "get_model", "load_network", "shipped_spec",
]  # fmt: skip
