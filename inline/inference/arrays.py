"""NumPy, CuPy and torch arrays in and out of the networks, without host round trips on the GPU.

NumPy arrays become CPU tensors that share their memory (``torch.from_numpy``); CuPy arrays
reach PyTorch through DLPack (``torch.from_dlpack``: zero copy, same device, the producer's
stream ordered before the consumer's) and results go back the same way (``cupy.from_dlpack``).
See https://dmlc.github.io/dlpack/latest/ and
https://docs.cupy.dev/en/stable/user_guide/interoperability.html#dlpack. A copy between host
and device happens only where the array and the model live on different devices.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from inline.backend import is_cupy


def array_kind(x: Any) -> str:
    """``"numpy"``, ``"cupy"`` or ``"torch"``.

    Raises:
        TypeError: any other type.
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy(x):
        return "cupy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    raise TypeError(f"expected a numpy or cupy array or a torch tensor, got {type(x).__name__}")


def dtype_name(x: Any) -> str:
    """The dtype as a NumPy-style name (``"complex64"``, ``"float32"``) for any of the three kinds."""
    return str(x.dtype).removeprefix("torch.")


def to_torch(x: Any, device: Any) -> Any:
    """``x`` as a torch tensor on ``device`` (zero copy where ``x`` already lives there)."""
    import torch

    kind = array_kind(x)
    if kind == "numpy":
        if not x.dtype.isnative or any(s < 0 for s in x.strides):
            x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
        t = torch.from_numpy(x)
    elif kind == "cupy":
        t = torch.from_dlpack(x)
    else:
        t = x
    return t.to(device)


def from_torch(t: Any, like: Any) -> Any:
    """Tensor ``t`` as the kind of array ``like`` is, on ``like``'s device."""
    kind = array_kind(like)
    t = t.detach().resolve_conj()
    if kind == "numpy":
        return t.cpu().numpy()
    if kind == "cupy":
        import cupy

        t = t.to(f"cuda:{like.device.id}").contiguous()
        return cupy.from_dlpack(t)
    return t.to(like.device)
