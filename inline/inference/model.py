"""A loaded model: checks its inputs at the boundary, converts arrays, runs, warms up.

One :class:`LoadedModel` exists per (weights checksum, backend, device, precision) in a
server process (:mod:`inline.inference.cache`) and is shared by every session; it is safe to
call from several threads (backends that are not are serialised here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from inline.inference.arrays import array_kind, dtype_name, from_torch, to_torch
from inline.inference.shapes import Shape, as_shape, check_inputs
from inline.inference.spec import ModelSpec

log = logging.getLogger(__name__)


def dummy_inputs(shape: Shape, device: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """Warm-up inputs for k-space ``shape`` on ``device``: seeded complex noise sampled on
    every other line plus 8 centre (ACS) lines, so every code path (normalisation, data
    consistency) sees non-degenerate values."""
    import torch

    batch, coils, ky, kx = shape
    gen = torch.Generator().manual_seed(seed)
    lines = torch.arange(ky)
    acs = ((lines - ky // 2).abs() < 4).float()
    mask = torch.maximum((lines % 2 == 0).float(), acs).view(1, 1, ky, 1).expand(batch, 1, ky, 1).contiguous()
    acs_mask = acs.view(1, 1, ky, 1).expand(batch, 1, ky, 1).contiguous()
    kspace = torch.randn(shape, dtype=torch.complex64, generator=gen) * mask
    return kspace.to(device), mask.to(device), acs_mask.to(device)


class LoadedModel:
    """A network ready to run on one backend, device and precision.

    Attributes:
        spec: the :class:`ModelSpec` it was loaded from (name, weights, sha256).
        backend: name of the backend actually used (``"eager"``, ``"compile"``, ``"onnxruntime"``, ``"tensorrt"``).
        device: ``torch.device`` it runs on.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        meta: the checkpoint's ``meta`` dict (training steps, validation NRMSE, ...).
        load_s: seconds to read, verify and build it [s].
    """

    def __init__(self, spec: ModelSpec, backend: str, device: Any, precision: str, runner: Any, meta: dict, load_s: float) -> None:
        self.spec, self.backend, self.device, self.precision = spec, backend, device, precision
        self.runner, self.meta, self.load_s = runner, meta, load_s
        self._run_lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warmed: dict[Shape, float] = {}

    def __repr__(self) -> str:
        return f"LoadedModel({self.spec.name!r}, backend={self.backend!r}, device={str(self.device)!r}, precision={self.precision!r})"

    def info(self) -> dict[str, str]:
        """What an image's meta should record about the model that made it."""
        return {
            "model": self.spec.name, "sha256": self.spec.sha256, "backend": self.backend,
            "device": str(self.device), "precision": self.precision,
        }  # fmt: skip

    def run(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        """The network's completed k-space.

        Args:
            kspace: ``(batch, coils, ky, kx)`` complex64, zeros at unsampled lines, scaled so
                images are O(1) (see :class:`models.varnet.VarNet`).
            mask: ``(batch, 1, ky, 1)`` float32, 1 where a line was sampled.
            acs_mask: ``(batch, 1, ky, 1)`` float32, 1 on the calibration lines.
            Each a NumPy or CuPy array or a torch tensor; CuPy arrays and CUDA tensors are
            used in place (DLPack), host arrays are copied to the model's device.

        Returns:
            ``(batch, coils, ky, kx)`` complex64, the same kind of array as ``kspace`` on
            ``kspace``'s device.

        Raises:
            TypeError: an argument is not a NumPy/CuPy array or torch tensor.
            ValueError: shapes or dtypes other than the above (the message gives the expected ones).
        """
        for name, x in (("kspace", kspace), ("mask", mask), ("acs_mask", acs_mask)):
            try:
                array_kind(x)
            except TypeError as e:
                raise TypeError(f"{name}: {e}") from None
        check_inputs(
            tuple(kspace.shape), dtype_name(kspace),
            {"mask": tuple(mask.shape), "acs_mask": tuple(acs_mask.shape)},
            {"mask": dtype_name(mask), "acs_mask": dtype_name(acs_mask)},
        )  # fmt: skip
        out = self._call(*(to_torch(x, self.device) for x in (kspace, mask, acs_mask)))
        return from_torch(out, kspace)

    def _call(self, kspace: Any, mask: Any, acs_mask: Any) -> Any:
        if self.runner.thread_safe:
            return self.runner(kspace, mask, acs_mask)
        with self._run_lock:
            return self.runner(kspace, mask, acs_mask)

    def warm_up(self, shapes: Iterable[Shape]) -> dict[Shape, float]:
        """Run dummy inputs of each k-space shape ``(batch, coils, ky, kx)`` once, so that
        compilation, graph capture, export or engine build happen now and not on the first
        scan. Shapes warmed before (by any session) are skipped.

        Returns:
            Seconds each newly warmed shape took [s].

        Raises:
            ValueError: a shape is not four positive ints.
        """
        import torch

        done: dict[Shape, float] = {}
        for shape in map(as_shape, shapes):
            with self._warm_lock:
                if shape in self._warmed:
                    continue
                t0 = time.perf_counter()
                self._call(*dummy_inputs(shape, self.device))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self._warmed[shape] = done[shape] = time.perf_counter() - t0
            log.info("%s warmed up for %s in %.2f s", self, shape, done[shape])
        return done

    @property
    def warmed_shapes(self) -> tuple[Shape, ...]:
        """The k-space shapes warmed up so far."""
        return tuple(self._warmed)
