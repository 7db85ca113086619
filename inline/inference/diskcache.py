"""The on-disk cache of exported models (ONNX) and built engines (TensorRT): where, and under which keys.

An export takes tens of seconds and an engine build minutes; both are done once per key and
kept on disk, so a restarted server loads them. The key functions are pure: everything that
changes the artefact (weights checksum, input shapes, precision, GPU, library versions) is in
the key, and nothing else. Files are written to a temporary name and renamed into place, so
two processes building the same key never read a half-written file.

Directory: ``cache_dir`` given by the caller, else ``$INLINE_MODEL_CACHE``, else ``~/.cache/inline``;
exports under ``onnx/``, engines under ``tensorrt/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from inline.inference.shapes import ShapeRange

ENV_VAR = "INLINE_MODEL_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$INLINE_MODEL_CACHE``, else ``~/.cache/inline``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "inline"


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def onnx_cache_key(checksum: str, ky: int, kx: int, opset: int, exporter_version: str) -> str:
    """File stem of an ONNX export: batch and coils are dynamic axes; ky and kx are fixed
    (the exporter cannot export ``torch.roll`` -- the centred FFT's shift -- with symbolic shifts)."""
    fields = {"sha256": checksum, "ky": int(ky), "kx": int(kx), "opset": int(opset), "exporter": exporter_version}
    return f"{checksum[:16]}_{int(ky)}x{int(kx)}_op{int(opset)}_{_digest(fields)}"


def engine_cache_key(
    checksum: str, shape_range: ShapeRange, precision: str, gpu_name: str, tensorrt_version: str, torch_tensorrt_version: str
) -> str:
    """File stem of a TensorRT engine built for ``shape_range`` of k-space shapes, at
    ``precision``, on GPU ``gpu_name`` with those library versions (engines are specific to
    all of them: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html)."""
    fields = {
        "sha256": checksum, "min": list(shape_range.min), "opt": list(shape_range.opt), "max": list(shape_range.max),
        "precision": precision, "gpu": gpu_name, "tensorrt": tensorrt_version, "torch_tensorrt": torch_tensorrt_version,
    }  # fmt: skip
    opt = "x".join(str(d) for d in shape_range.opt)
    return f"{checksum[:16]}_{precision}_{opt}_{_digest(fields)}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` with a temporary path next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # same suffix as the target: writers may pick the format from it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
