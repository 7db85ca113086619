"""SENSE reconstruction of undersampled Cartesian k-space with a conjugate-gradient solver.

Sources: K. P. Pruessmann, M. Weiger, P. Boernert, P. Boesiger, "Advances in sensitivity
encoding with arbitrary k-space trajectories", Magn Reson Med 2001;46:638-651 (CG-SENSE:
``min_x ||M F S x - y||^2``, solved on the normal equations); Tikhonov term ``lambda ||x||^2``
as BART ``pics -l2 -r lambda`` (normal operator ``A^H A + lambda I``); coil maps from
:mod:`gadgets.espirit` (ESPIRiT, Uecker et al. MRM 2014;71:990, or low-resolution ACS maps).

Two things make it fast on Cartesian data:

* the readout is fully sampled, so one inverse FFT along kx up front leaves a problem that
  is independent per readout column ``x``: each CG iteration only transforms along ky (kz);
  the arrays are kept with ky last (contiguous) for those FFTs;
* since the columns are independent, CG runs per column (step sizes ``alpha``, ``beta``
  and the stopping test per column, all columns in one vectorised loop): every column gets
  the convergence of its own small system rather than that of the worst one.

FFT centring is folded into the (cached) maps and mask: the solver works on ``ifftshift``-ed
images and k-space, so no shifts are done per iteration.

The gadget emits the reconstructed image as the centred k-space of one virtual coil on the
buffer's grid, so :class:`~gadgets.fft_recon.FFTRecon` applies its readout placement and
FOV adjustment to it unchanged and :class:`~gadgets.coil_combine.CoilCombine` passes it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from gadgets.espirit import CalibrationError, CoilMaps, acs_maps, calibration_region, espirit_maps
from inline.backend import fft_module, get_array_module
from inline.buffers import ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register


@dataclass
class CGResult:
    """Outcome of :func:`sense_cg`.

    Attributes:
        image: ``(z, y, x)`` complex64 solution.
        residuals: relative residual ``||b - N x|| / ||b||`` (all columns) before the first
            iteration and after each one.
        iterations: iterations run.
    """

    image: Any
    residuals: list[float] = field(default_factory=list)
    iterations: int = 0


@dataclass
class SenseOperator:
    """Cached, solver-ready form of the coil maps: ``ifftshift``-ed along (z, y), axes ``(coils, z, x, y)``."""

    maps: Any
    maps_conj: Any
    shape: tuple[int, int, int]  # (z, y, x) of the image

    @classmethod
    def from_maps(cls, maps: Any) -> "SenseOperator":
        xp = get_array_module(maps)
        fft = fft_module(xp)
        _, nz, ny, nx = maps.shape
        axes = (1, 2) if nz > 1 else (2,)
        m = fft.ifftshift(maps, axes=axes).transpose(0, 1, 3, 2)
        m = xp.ascontiguousarray(m, dtype=np.complex64)
        return cls(maps=m, maps_conj=xp.conj(m), shape=(nz, ny, nx))


def sense_cg(
    kspace: Any,
    sampled: Any,
    op: SenseOperator,
    lambda_l2: float = 0.0,
    iterations: int = 20,
    tolerance: float = 1e-3,
    workers: int = -1,
) -> CGResult:
    """Solve ``(A^H A + lambda I) x = A^H y``, ``A = M F S``, by conjugate gradients per readout column.

    Args:
        kspace: ``(coils, kz, ky, kx)`` complex64, 0 at unsampled lines (``y``).
        sampled: ``(kz, ky)`` bool mask ``M``.
        op: the coil maps ``S`` (:meth:`SenseOperator.from_maps`) on the same grid.
        lambda_l2: Tikhonov weight ``lambda`` (same meaning as BART ``pics -l2 -r``).
        iterations: most CG iterations.
        tolerance: stop when every column's relative residual ``||r|| / ||b||`` is below it.
        workers: ``scipy.fft`` threads (NumPy backend).

    Returns:
        :class:`CGResult` with the image ``(z, y, x)`` complex64 (centred, not shifted).
    """
    xp = get_array_module(kspace)
    fft = fft_module(xp)
    kw = {"workers": workers} if xp is np else {}
    coils, nz, ny, nx = kspace.shape
    if op.shape != (nz, ny, nx) or op.maps.shape[0] != coils:
        raise ValueError(f"SENSE: k-space {kspace.shape} does not match the coil maps {op.maps.shape} (coils, z, x, y)")
    three_d = nz > 1
    k_axes = (1, 3) if three_d else (3,)  # (coils, kz, x, ky)
    red = (0, 2) if three_d else (2,)  # per column: reduce over (z, y) of (z, x, y)

    # hybrid space (kx -> x), ky last, k-space ifftshift-ed along ky (kz)
    yh = fft.fftshift(fft.ifft(fft.ifftshift(kspace, axes=(3,)), axis=3, norm="ortho", **kw), axes=(3,))
    yh = xp.ascontiguousarray(yh.transpose(0, 1, 3, 2))
    yh = fft.ifftshift(yh, axes=k_axes)
    mask = fft.ifftshift(xp.asarray(sampled, bool), axes=(0, 1) if three_d else (1,))
    mask = mask[:, None, :].astype(np.float32)  # (kz, 1, ky)
    lam = np.float32(lambda_l2)

    def normal(x: Any) -> Any:
        t = op.maps * x
        t = fft.fftn(t, axes=k_axes, norm="ortho", overwrite_x=True, **kw)
        t *= mask
        t = fft.ifftn(t, axes=k_axes, norm="ortho", overwrite_x=True, **kw)
        out = xp.einsum("czxy,czxy->zxy", op.maps_conj, t)
        if lam:
            out += lam * x
        return out

    def dot(a: Any, b: Any) -> Any:
        return xp.real(xp.sum(xp.conj(a) * b, axis=red, keepdims=True))

    b = fft.ifftn(yh * mask, axes=k_axes, norm="ortho", overwrite_x=True, **kw)
    b = xp.einsum("czxy,czxy->zxy", op.maps_conj, b)
    x = xp.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = dot(r, r)
    bb = xp.maximum(rr, np.float32(1e-30))
    b_norm = float(xp.sqrt(xp.sum(bb)))
    result = CGResult(image=None, residuals=[1.0 if b_norm > 0 else 0.0])
    tol2 = np.float32(tolerance) ** 2
    for it in range(iterations):
        if b_norm == 0 or bool(xp.all(rr <= tol2 * bb)):
            break
        ap = normal(p)
        pap = dot(p, ap)
        alpha = xp.where(pap > 0, rr / xp.where(pap > 0, pap, 1), 0).astype(np.float32)
        x += alpha * p
        r -= alpha * ap
        rr_new = dot(r, r)
        beta = xp.where(rr > 0, rr_new / xp.where(rr > 0, rr, 1), 0).astype(np.float32)
        rr = rr_new
        p *= beta
        p += r
        result.iterations = it + 1
        result.residuals.append(float(xp.sqrt(xp.sum(rr))) / b_norm)
    # back to (z, y, x), centred
    img = xp.ascontiguousarray(x.transpose(0, 2, 1))
    result.image = fft.fftshift(img, axes=(0, 1) if three_d else (1,)).astype(np.complex64, copy=False)
    return result


def _centred_fft(x: Any, axes: tuple[int, ...], workers: int) -> Any:
    xp = get_array_module(x)
    fft = fft_module(xp)
    kw = {"workers": workers} if xp is np else {}
    return fft.fftshift(fft.fftn(fft.ifftshift(x, axes=axes), axes=axes, norm="ortho", **kw), axes=axes)


@dataclass
class _CacheEntry:
    maps: CoilMaps
    op: SenseOperator


@register
class SENSE(PureGadget):
    """CG-SENSE of an undersampled :class:`ReconBuffer` to one virtual coil (k-space of the combined image).

    Input ``ReconBuffer``: ``data`` ``(coils, kz, ky, kx)`` with zeros at unsampled lines,
    ``sampled`` ``(kz, ky)``, calibration in ``reference`` (or, without one, the fully
    sampled centre of ``data``). With embedded calibration (the header's
    ``calibrationMode`` is ``embedded``, or the buffer has no header information and
    ``reference`` is on the same grid) the calibration-only lines are measured lines of the
    same image and join ``data`` (``use_acs_in_data``).

    Output ``ReconBuffer``: ``data`` ``(1, kz, ky, kx)`` = centred orthonormal FFT of the
    SENSE image ``x`` on the same grid, ``sampled`` all True, ``reference`` None, history +
    ``"SENSE"``. Follow it with ``FFTRecon`` (FOV adjustment) and ``CoilCombine``.

    Coil maps are computed once per slice position (``index.slice``) and reused for the
    following repetitions/contrasts/phases; they are recomputed when a buffer brings a
    calibration block whose shape differs or whose relative change exceeds
    ``recalibrate_threshold``. ESPIRiT maps have unit root-sum-of-squares, so ``|x|`` is
    on the scale of the RSS of the coil images.

    Raises:
        CalibrationError: no maps cached for the slice and no calibration region in the buffer.
        ValueError: ``data`` is not 4-D.
    """

    class Params(GadgetParams):
        iterations: int = Field(30, ge=1, description="Most conjugate-gradient iterations (BART pics' default).")
        tolerance: float = Field(
            1e-2, ge=0, description="Stop when every readout column's relative CG residual ||r|| / ||A^H y|| is below it."
        )
        lambda_l2: float = Field(
            0.001, ge=0, description="Tikhonov weight lambda in ||M F S x - y||^2 + lambda ||x||^2 (BART pics -l2 -r)."
        )
        map_method: Literal["espirit", "acs"] = Field(
            "espirit", description="Coil maps: espirit (ESPIRiT, first map set) or acs (low-resolution ACS image / RSS)."
        )
        espirit_kernel_width: int = Field(6, ge=2, description="ESPIRiT kernel size w (w x w) [samples].")
        espirit_calib_width: int = Field(24, ge=4, description="Largest calibration region along ky and kx [samples].")
        espirit_threshold: float = Field(
            0.02, gt=0, lt=1, description="Singular values above threshold * max span the ESPIRiT kernel space."
        )
        espirit_crop: float = Field(0.8, ge=0, le=1, description="Zero the maps where the ESPIRiT eigenvalue is below it.")
        espirit_grid: int = Field(
            64, ge=8, description="Side of the coarse grid the ESPIRiT eigenproblem is solved on [pixels]; maps are interpolated."
        )
        acs_floor: float = Field(0.05, ge=0, lt=1, description="acs maps: zero where the ACS RSS is below floor * max.")
        recalibrate_threshold: float = Field(
            0.3,
            ge=0,
            description="Recompute cached maps when ||calib_new - calib_old|| / ||calib_old|| exceeds it (0: on every calibration).",
        )
        use_acs_in_data: bool = Field(True, description="With embedded calibration, use calibration-only lines as data too.")
        fft_workers: int = Field(-1, description="Threads for scipy.fft (-1: all CPUs).")

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._cache: dict[int, _CacheEntry] = {}
        #: number of coil-map computations (for tests and logs)
        self.map_computations = 0
        #: the last solve's :class:`CGResult` (residual history)
        self.last_result: CGResult | None = None
        self._embedded = self._calibration_mode() in (None, "embedded")

    def _calibration_mode(self) -> str | None:
        try:
            mode = self.header.encoding[0].parallelImaging.calibrationMode
        except (AttributeError, IndexError, TypeError):
            return None
        return None if mode is None else str(getattr(mode, "value", mode))

    # -- coil maps ------------------------------------------------------------------
    def _calibration(self, item: ReconBuffer) -> Any | None:
        kx_centre = getattr(item.header, "center_sample", None) if item.header is not None else None
        p = self.params
        sources = []
        if item.reference is not None and item.reference_sampled is not None:
            sources.append((item.reference, item.reference_sampled))
        sources.append((item.data, item.sampled))
        for k, s in sources:
            try:
                return calibration_region(k, s, p.espirit_calib_width, kx_centre, min_lines=p.espirit_kernel_width)
            except CalibrationError:
                continue
        return None

    def _compute_maps(self, calib: Any, shape: tuple[int, int, int]) -> CoilMaps:
        p = self.params
        if p.map_method == "espirit":
            if shape[0] > 1 or calib.shape[1] > 1:
                raise CalibrationError("SENSE: ESPIRiT maps are implemented for 2D buffers (kz = 1); use map_method: acs")
            maps, lam = espirit_maps(
                calib[:, 0], shape[1:], p.espirit_kernel_width, p.espirit_threshold, p.espirit_crop, p.espirit_grid
            )
            maps, lam = maps[:, None], lam[None]
        else:
            maps, lam = acs_maps(calib, shape, p.acs_floor)
        return CoilMaps(maps=maps, eigenvalues=lam, method=p.map_method, calibration=calib)

    def coil_maps(self, item: ReconBuffer) -> _CacheEntry:
        """Cached maps of the buffer's slice position, recomputed when its calibration changed."""
        xp = get_array_module(item.data)
        key = item.index.slice
        entry = self._cache.get(key)
        calib = self._calibration(item)
        shape = tuple(item.data.shape[1:])
        if entry is not None and calib is not None and entry.op.shape == shape:
            old = entry.maps.calibration
            if old.shape == calib.shape:
                change = float(xp.linalg.norm(calib - old) / max(float(xp.linalg.norm(old)), 1e-30))
                if change <= self.params.recalibrate_threshold:
                    return entry
                self.log.info("SENSE: slice %d calibration changed by %.3f; new coil maps", key, change)
        elif entry is not None and entry.op.shape == shape:
            return entry
        if calib is None:
            raise CalibrationError(
                f"SENSE: slice {key} has no cached coil maps and no calibration region "
                f"(no reference lines and fewer than {self.params.espirit_kernel_width} contiguous centre lines)"
            )
        maps = self._compute_maps(calib, shape)
        entry = self._cache[key] = _CacheEntry(maps=maps, op=SenseOperator.from_maps(maps.maps))
        self.map_computations += 1
        return entry

    # -- reconstruction -------------------------------------------------------------
    def apply(self, item: ReconBuffer) -> ReconBuffer:
        k = item.data
        if k.ndim != 4:
            raise ValueError(f"SENSE: buffer data must be (coils, kz, ky, kx), got shape {k.shape}")
        xp = get_array_module(k)
        entry = self.coil_maps(item)
        sampled = xp.asarray(item.sampled, bool)
        if (
            self.params.use_acs_in_data
            and self._embedded
            and item.reference is not None
            and item.reference_sampled is not None
            and item.reference.shape == k.shape
        ):
            extra = xp.asarray(item.reference_sampled, bool) & ~sampled
            if bool(xp.any(extra)):
                k = xp.where(extra[None, :, :, None], item.reference, k)
                sampled = sampled | extra
        p = self.params
        result = sense_cg(k, sampled, entry.op, p.lambda_l2, p.iterations, p.tolerance, p.fft_workers)
        self.last_result = result
        nz = k.shape[1]
        axes = (1, 2, 3) if nz > 1 else (2, 3)
        out = _centred_fft(result.image[None], axes, p.fft_workers).astype(np.complex64, copy=False)
        return item.completed(out, "SENSE")
