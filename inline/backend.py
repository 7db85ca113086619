"""One code path for NumPy and CuPy: the array module comes from the input array.

sigpy's ``backend.get_array_module`` idea: a function never takes a device flag; it asks
its input where it lives. CuPy is an optional extra (``pip install -e '.[gpu-cu12]'``); it
is imported only when asked for, so CPU-only machines never touch it. Data move between
host and device in one explicit stage (``gadgets.device``), through pinned host memory.
"""

from __future__ import annotations

import functools
import logging
import sys
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """CuPy or a CUDA device was asked for where there is none."""


def is_cupy(x: Any) -> bool:
    """True when ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.split(".", 1)[0] == "cupy"


def get_array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if any(is_cupy(a) for a in arrays):
        return sys.modules["cupy"]
    return np


def fft_module(xp: ModuleType) -> ModuleType:
    """``scipy.fft`` for NumPy, ``cupyx.scipy.fft`` for CuPy (same call signatures)."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def ndimage_module(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception as e:  # ImportError, CUDA driver errors
        log.debug("CuPy unavailable: %s", e)
        return False


def require_cupy() -> ModuleType:
    """The ``cupy`` module; raises :class:`BackendUnavailable` with the reason if it cannot be used."""
    if not cupy_available():
        raise BackendUnavailable("CuPy with a CUDA device is not available (install the gpu-cu12 or gpu-cu13 extra on a GPU host)")
    import cupy

    return cupy


def to_device(x: np.ndarray) -> Any:
    """Copy a host array to the current CUDA device through pinned (page-locked) staging.

    Raises:
        BackendUnavailable: no CuPy/GPU.
    """
    cp = require_cupy()
    if is_cupy(x):
        return x
    x = np.ascontiguousarray(x)
    pinned = cp.cuda.alloc_pinned_memory(x.nbytes)
    staging = np.frombuffer(pinned, x.dtype, x.size).reshape(x.shape)
    staging[...] = x
    out = cp.empty(x.shape, x.dtype)
    out.set(staging)
    return out


def to_host(x: Any) -> np.ndarray:
    """A NumPy array of ``x`` (a copy from the device for CuPy arrays; ``x`` itself otherwise)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)
