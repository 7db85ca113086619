"""Inference backends behind one interface (:class:`~inline.inference.backends.base.Backend`).

``BACKENDS`` maps a config's backend name to its implementation; :func:`inline.inference.get_model`
tries them in the configured preference order and skips those unavailable here, logging why.
"""

from __future__ import annotations

from inline.inference.backends.base import PRECISIONS, Backend, BuildContext, Runner
from inline.inference.backends.compiled import CompileBackend
from inline.inference.backends.eager import EagerBackend
from inline.inference.backends.ort import OnnxRuntimeBackend
from inline.inference.backends.tensorrt import TensorRTBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TensorRTBackend(), CompileBackend(), OnnxRuntimeBackend(), EagerBackend())}

#: Fastest first where each is available. ``eager`` comes before ``onnxruntime``: on the CPU,
#: ORT measured ~4.5x slower than eager for the 256x256 model (see ``backends/ort.py``).
DEFAULT_PREFERENCE: tuple[str, ...] = ("tensorrt", "compile", "eager", "onnxruntime")

__all__ = ["BACKENDS", "DEFAULT_PREFERENCE", "PRECISIONS", "Backend", "BuildContext", "Runner"]
