"""The interface every inference backend implements, and the precisions they may offer.

A backend says whether it can run on a device at a precision (and if not, why, in one
sentence for the log), and turns a loaded network into a :class:`Runner`: a callable from
device tensors (k-space ``(batch, coils, ky, kx)`` complex64, masks ``(batch, 1, ky, 1)``
float32) to the completed k-space, complex64, on the same device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from inline.inference.shapes import ShapeRange

#: precision name -> torch dtype name of the reduced-precision compute (None: full fp32)
PRECISIONS: dict[str, str | None] = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(precision: str) -> Any:
    """The torch dtype of ``precision``'s compute (``torch.float32`` for ``"fp32"``)."""
    import torch

    name = PRECISIONS[precision]
    return getattr(torch, name) if name else torch.float32


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type at ``precision``; a null context for fp32.

    Convolutions and matrix products run in fp16/bf16; the FFTs and the complex arithmetic
    of data consistency are not on autocast's lists and stay complex64, and the U-Net's
    output is promoted back to float32 when it is de-normalised (mean/std are float32).
    See https://pytorch.org/docs/stable/amp.html#autocast-op-reference.
    """
    import torch

    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(precision))


@dataclass(frozen=True)
class BuildContext:
    """What a backend needs besides the network.

    Attributes:
        model_name: for log lines.
        checksum: sha256 of the weights (keys of on-disk artefacts).
        device: ``torch.device`` the model runs on.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        cache_dir: root of the on-disk cache (:mod:`inline.inference.diskcache`).
        shape_range: k-space shapes an engine should cover (TensorRT); ``None``: each shape seen.
        intra_op_threads: ONNX Runtime intra-op threads (0: its default).
    """

    model_name: str
    checksum: str
    device: Any
    precision: str
    cache_dir: Path
    shape_range: ShapeRange | None = None
    intra_op_threads: int = 0


class Runner(Protocol):
    """A built model: ``runner(kspace, mask, acs_mask) -> kspace`` on device tensors.

    ``thread_safe`` False means concurrent calls must be serialised by the caller (CUDA graphs
    replay into static buffers)."""

    thread_safe: bool

    def __call__(self, kspace: Any, mask: Any, acs_mask: Any) -> Any: ...


class Backend:
    """Base class of the backends; subclasses set ``name`` and implement the two methods."""

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = tuple(PRECISIONS)

    def unavailable_reason(self, device: Any, precision: str) -> str | None:
        """``None`` if this backend can run on ``device`` at ``precision``, else why not."""
        raise NotImplementedError

    def build(self, net: Any, ctx: BuildContext) -> Runner:
        """A :class:`Runner` for ``net`` (a CPU ``torch.nn.Module`` in eval mode; may be moved)."""
        raise NotImplementedError


def device_reason(device: Any, precision: str) -> str | None:
    """Why ``device`` cannot run PyTorch at ``precision`` (no CUDA; no bf16 on this GPU), or ``None``."""
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to PyTorch on this machine"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bf16 support"
    elif device.type != "cpu":
        return f"device type {device.type!r} is not supported (cpu or cuda)"
    return None
