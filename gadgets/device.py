"""Device transfer: move a scan's buffers to the GPU once, early in the chain, and back once.

One code path serves both devices (:mod:`inline.backend`): gadgets pick NumPy or CuPy from
the arrays they receive, so where the data live is decided here and only here.
``ToDevice`` goes right after accumulation (k-space buffers, one copy per slice through
pinned host memory); images come back in ``ImageFinish`` or an explicit ``ToHost``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from inline.backend import BackendUnavailable, cupy_available, to_device, to_host
from inline.buffers import EarlySnapshot, ImageBuffer, ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register


def _move(item: Any, fields: tuple[str, ...], move) -> Any:
    if isinstance(item, EarlySnapshot):
        if move is to_host and isinstance(item.buffer.data, np.ndarray):
            return item  # already on the host: nothing to copy
        if not item.begin_read():
            return item  # revoked: nobody reads it
        try:
            buf = _move(item.buffer, _ARRAY_FIELDS[ReconBuffer], move)
        finally:
            item.release()  # copied: the accumulator's array is free again
        return EarlySnapshot(buf, item.token)
    changes = {f: move(getattr(item, f)) for f in fields if getattr(item, f, None) is not None}
    return dataclasses.replace(item, **changes)


_ARRAY_FIELDS = {
    ReconBuffer: ("data", "sampled", "reference", "reference_sampled"),
    ImageBuffer: ("data",),
    EarlySnapshot: (),  # its buffer's
}


@register
class ToDevice(PureGadget):
    """Copy ReconBuffer / ImageBuffer / EarlySnapshot arrays to the current CUDA device (CuPy).

    Shapes and dtypes are unchanged. Without CuPy or a GPU the buffers stay on the host
    and the chain runs on NumPy (logged once), unless ``required`` is set.

    Raises:
        BackendUnavailable: ``required`` is true and there is no CuPy/GPU.
    """

    class Params(GadgetParams):
        required: bool = Field(False, description="Fail the session when no GPU is available instead of running on the CPU.")

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer, ImageBuffer, EarlySnapshot)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer, ImageBuffer, EarlySnapshot)
    accepts_hybrid: ClassVar[bool] = True
    forwards_snapshots: ClassVar[bool] = True  # moves early snapshots on (inline.config.check_early_snapshots)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.on_gpu = cupy_available()
        self.moves_arrays_to = "device" if self.on_gpu else None  # without a GPU nothing moves
        if not self.on_gpu:
            if self.params.required:
                raise BackendUnavailable("ToDevice: required GPU not available (CuPy with a CUDA device)")
            self.log.warning("ToDevice: no CuPy/GPU on this host; the chain runs on the CPU")

    def apply(self, item):
        if not self.on_gpu:
            return item
        return _move(item, _ARRAY_FIELDS[type(item)], to_device)


@register
class ToHost(PureGadget):
    """Copy ReconBuffer / ImageBuffer / EarlySnapshot arrays back to host memory (NumPy); a no-op for host arrays."""

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer, ImageBuffer, EarlySnapshot)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer, ImageBuffer, EarlySnapshot)
    accepts_hybrid: ClassVar[bool] = True
    forwards_snapshots: ClassVar[bool] = True  # moves early snapshots on (inline.config.check_early_snapshots)
    moves_arrays_to: ClassVar[str | None] = "host"

    def apply(self, item):
        return _move(item, _ARRAY_FIELDS[type(item)], to_host)
