"""GRAPPA: fill the missing ky (2D) or ky/kz (3D) lines of an undersampled k-space buffer.

Source: M. A. Griswold, P. M. Jakob, R. M. Heidemann, M. Nittka, V. Jellus, J. Wang,
B. Kiefer, A. Haase, "Generalized autocalibrating partially parallel acquisitions
(GRAPPA)", Magn Reson Med 2002;47:1202-1210. Anchors (read, not copied): Gadgetron's
``GenericReconCartesianGrappaGadget`` / ``grappa2d_calib_convolution_kernel`` (calibration
as a Tikhonov-regularised least-squares fit on the ACS block, the k-space kernel turned
into a convolution kernel and then into image-domain unmixing weights) and pygrappa's
``cgrappa`` (kernel geometry around a cell of the undersampling lattice).

Method, for an undersampling lattice of spacing (Rz, Ry) with a fixed offset:

* calibration (k-space, on the fully sampled ACS block of ``reference``): for every cell
  origin in the ACS, the sources are the ``kernel_kz x kernel_ky`` lattice points around the
  cell times ``kernel_kx`` readout neighbours times all coils; the targets are the
  ``Rz*Ry - 1`` missing points of the cell, all coils. ``W = (A^H A + lam I)^-1 A^H B`` with
  ``lam = lambda_rel * ||A||_F^2 / n_sources`` (relative to the calibration matrix norm);
* application, ``method="hybrid"`` (default): a 1D inverse FFT along kx turns the kx part of
  the kernel into a per-readout-position weight, so the fill is one batched complex matmul
  ``(x, targets*coils, sources) @ (x, sources, cells)`` plus two 1D FFTs along the readout;
* application, ``method="image"``: the kernel is scattered into one k-space convolution
  kernel (identity at the acquired point) and FFT-ed to per-pixel ``(coils, coils)``
  image-domain unmixing weights, applied as ``einsum('jizyx,izyx->jzyx')`` between a full
  inverse and forward FFT.

Measured here (2 shared cores, OpenBLAS, 32 coils, 256x256 after oversampling removal, R=4,
kernel 4x5, complex64, warm, median of 7; bench/accel_grappa.py): hybrid 63 ms GRAPPA alone
(76 ms with FFT + RSS) vs image 125 ms (191 ms; its weights are 32 x 32 x 256 x 256
complex64 = 537 MB and the per-pixel mixing is memory-bound); calibration once per slice
1.1 s (hybrid) / 3.8 s (image, incl. the weight FFT). so ``hybrid`` is the default. Both give the same k-space up to the circular wrap of the kernel
at the kx edges (tests check it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from inline.backend import fft_module, get_array_module
from inline.buffers import AcquisitionIndex, EarlyReference, ReconBuffer
from inline.gadget import AccumulatingGadget, GadgetParams, Output, Text, text_message
from inline.registry import register
from inline.trace import Trace


class GrappaError(ValueError):
    """The buffer cannot be GRAPPA-reconstructed (irregular sampling, too small an ACS block, ...)."""


@dataclass(frozen=True)
class Lattice:
    """The regular undersampling lattice of a buffer.

    Attributes:
        r: (Rz, Ry) spacing of the acquired points along (kz, ky).
        offset: (oz, oy) position of one lattice point, ``0 <= o < R``.
        lo, hi: (kz, ky) first and last index of the acquired range (inclusive); lines outside
            stay zero (partial Fourier).
    """

    r: tuple[int, int]
    offset: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]


@dataclass
class GrappaWeights:
    """Calibrated GRAPPA weights.

    Attributes:
        w: ``(T*coils, taps*coils*kernel_kx)`` complex64 k-space weights; T = Rz*Ry-1 target
            offsets, rows ordered (target, coil), columns (tap_z, tap_y, coil, kx).
        targets: the T (dz, dy) target offsets from the cell origin.
        taps: the (Δz, Δy) source offsets from the cell origin (multiples of R).
        kernel_kx: readout taps (odd).
        reference: the ACS block the weights were fitted on ``(coils, az, ay, kx)``.
        image_weights, hybrid_weights: lazily built application forms (see module docstring).
    """

    w: Any
    targets: list[tuple[int, int]]
    taps: list[tuple[int, int]]
    kernel_kx: int
    reference: Any
    image_weights: Any = None
    hybrid_weights: Any = None
    hybrid_nx: int = 0
    image_shape: tuple[int, ...] = ()


@dataclass
class _Stats:
    calibrations: int = 0
    reuses: int = 0
    early: int = 0  # calibrations done from an EarlyReference and used by their buffer
    warnings: list[str] = field(default_factory=list)


def _largest_true_run(v: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a 1D bool array ((0, 0) if none)."""
    best, start = (0, 0), None
    for i, x in enumerate(list(v) + [False]):
        if x and start is None:
            start = i
        elif not x and start is not None:
            if i - start > best[1]:
                best = (start, i - start)
            start = None
    return best


def find_lattice(sampled: np.ndarray, r: tuple[int, int], extra: np.ndarray | None = None) -> Lattice:
    """The regular (Rz, Ry) lattice in a ``(kz, ky)`` sampling mask.

    The offset is the one holding the most sampled points (embedded ACS lines off the lattice
    are ignored); every lattice point inside the acquired range must be sampled. The range
    spans the lattice points and ``extra`` (e.g. the reference mask) along each axis.

    Raises:
        GrappaError: no lattice point sampled, or a lattice point in the range is missing.
    """
    rz, ry = r
    nz, ny = sampled.shape
    zz, yy = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    best = max(
        ((oz, oy) for oz in range(rz) for oy in range(ry)),
        key=lambda o: int(np.count_nonzero(sampled & (zz % rz == o[0]) & (yy % ry == o[1]))),
    )
    on = (zz % rz == best[0]) & (yy % ry == best[1])
    lat = sampled & on
    if not lat.any():
        raise GrappaError("GRAPPA: no acquired line in the buffer")
    zi, yi = np.nonzero(lat)
    lo, hi = [int(zi.min()), int(yi.min())], [int(zi.max()), int(yi.max())]
    box = np.zeros_like(sampled)
    box[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1] = True
    missing = on & box & ~sampled
    if missing.any():
        z, y = np.argwhere(missing)[0]
        raise GrappaError(
            f"GRAPPA: sampling is not a regular R=({rz}, {ry}) lattice: (kz {z}, ky {y}) is missing "
            f"inside the acquired range kz {lo[0]}..{hi[0]}, ky {lo[1]}..{hi[1]}"
        )
    if extra is not None and extra.any():
        ze, ye = np.nonzero(extra)
        lo = [min(lo[0], int(ze.min())), min(lo[1], int(ye.min()))]
        hi = [max(hi[0], int(ze.max())), max(hi[1], int(ye.max()))]
    return Lattice((rz, ry), best, (lo[0], lo[1]), (hi[0], hi[1]))


def acs_block(reference: Any, reference_sampled: np.ndarray) -> Any:
    """The largest fully sampled (kz, ky) rectangle of ``reference``: ``(coils, az, ay, kx)``.

    Rows (ky) first: the longest run of ky sampled at every kz that has any sample, then the
    longest kz run sampled over those ky.
    """
    rows = reference_sampled.any(axis=0)
    zs = reference_sampled.any(axis=1)
    full_y = reference_sampled[zs].all(axis=0) if zs.any() else rows
    y0, ay = _largest_true_run(full_y)
    z_ok = reference_sampled[:, y0 : y0 + ay].all(axis=1) if ay else zs
    z0, az = _largest_true_run(z_ok)
    return reference[:, z0 : z0 + az, y0 : y0 + ay, :]


def kernel_geometry(r: tuple[int, int], kernel: tuple[int, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Target offsets (dz, dy) in a cell and source taps (Δz, Δy) around the cell origin.

    Sources are ``kernel`` lattice points per axis, centred on the cell (for an even kernel
    size the cell lies in the middle: taps -R, 0, R, 2R for 4).
    """
    (rz, ry), (kz, ky) = r, kernel
    if rz == 1:
        kz = 1
    targets = [(dz, dy) for dz in range(rz) for dy in range(ry) if (dz, dy) != (0, 0)]
    taps = [((m - (kz - 1) // 2) * rz, (n - (ky - 1) // 2) * ry) for m in range(kz) for n in range(ky)]
    return targets, taps


def calibrate(
    acs: Any, r: tuple[int, int], kernel: tuple[int, int], kernel_kx: int, lambda_rel: float
) -> GrappaWeights:
    """Fit GRAPPA weights on a fully sampled ACS block ``(coils, az, ay, kx)`` complex64.

    Returns :class:`GrappaWeights`; raises :class:`GrappaError` when the block holds no whole
    kernel (too few ACS lines for the kernel and R).
    """
    xp = get_array_module(acs)
    acs = xp.asarray(acs, dtype=xp.complex64)
    c, az, ay, nx = acs.shape
    targets, taps = kernel_geometry(r, kernel)
    h = kernel_kx // 2
    zmin = min(min(t[0] for t in taps), 0)
    zmax = max(max(t[0] for t in taps), max(t[0] for t in targets))
    ymin = min(min(t[1] for t in taps), 0)
    ymax = max(max(t[1] for t in taps), max(t[1] for t in targets))
    nvz, nvy, nvx = az - (zmax - zmin), ay - (ymax - ymin), nx - 2 * h
    if nvz < 1 or nvy < 1 or nvx < 1:
        raise GrappaError(
            f"GRAPPA: the ACS block (kz {az}, ky {ay}, kx {nx}) is smaller than one kernel spanning "
            f"(kz {zmax - zmin + 1}, ky {ymax - ymin + 1}, kx {kernel_kx}) at R={r}"
        )
    # Equations: at most ~4x the unknowns, taken evenly along kx (the fit is over-determined
    # already; more rows only cost time).
    n_src = len(taps) * c * kernel_kx
    step = max(1, (nvz * nvy * nvx) // (4 * n_src + 1))
    xs = slice(h, h + nvx, min(step, max(nvx // 8, 1)))

    def window(dz: int, dy: int, dx: int) -> Any:
        z0, y0 = dz - zmin, dy - ymin
        return acs[:, z0 : z0 + nvz, y0 : y0 + nvy, xs.start + dx : xs.start + dx + nvx : xs.step]

    src = xp.stack([window(dz, dy, dx) for dz, dy in taps for dx in range(-h, h + 1)])  # (taps*kx, c, ...)
    src = src.reshape(len(taps), kernel_kx, c, -1).transpose(0, 2, 1, 3).reshape(n_src, -1)  # (tap, coil, kx)
    tgt = xp.stack([window(dz, dy, 0) for dz, dy in targets]).reshape(len(targets) * c, -1)
    a = src.T  # (equations, sources)
    aha = a.conj().T @ a
    lam = lambda_rel * float(xp.real(xp.trace(aha))) / n_src
    if lam == 0.0 and not xp.any(aha):
        raise GrappaError("GRAPPA: the ACS block is all zeros")
    aha[xp.diag_indices(n_src)] += lam
    ahb = a.conj().T @ tgt.T
    if xp is np:
        import scipy.linalg

        try:  # complex128: a low-rank ACS (smooth object) breaks a complex64 Cholesky
            x = scipy.linalg.solve(aha.astype(np.complex128), ahb.astype(np.complex128), assume_a="pos")
        except np.linalg.LinAlgError as e:
            raise GrappaError(f"GRAPPA: calibration matrix is singular (lambda_rel={lambda_rel})") from e
    else:
        x = xp.linalg.solve(aha, ahb)
    return GrappaWeights(
        w=x.T.astype(xp.complex64), targets=targets, taps=taps, kernel_kx=kernel_kx, reference=acs
    )


def _hybrid_weights(weights: GrappaWeights, nx: int, xp: Any) -> Any:
    """Per readout position weights ``(nx, T*coils, taps*coils)`` complex64.

    A kx shift by ``d`` (``s(kx + d)``) is, after an unshifted inverse FFT along kx, a
    multiplication by ``exp(-2i pi d x / nx)``.
    """
    if weights.hybrid_weights is None or weights.hybrid_nx != nx:
        h = weights.kernel_kx // 2
        d = xp.arange(-h, h + 1, dtype=xp.float64)
        ramp = xp.exp(-2j * xp.pi * d[:, None] * xp.arange(nx)[None, :] / nx).astype(xp.complex64)  # (kx, nx)
        w = weights.w.reshape(weights.w.shape[0], -1, weights.kernel_kx)  # (T*c, taps*c, kx)
        weights.hybrid_weights = xp.ascontiguousarray(xp.einsum("tsk,kx->xts", w, ramp))
        weights.hybrid_nx = nx
    return weights.hybrid_weights


def _image_weights(weights: GrappaWeights, shape: tuple[int, int, int], c: int, xp: Any) -> Any:
    """Per-pixel unmixing ``(coils_out, coils_in, nz, ny, nx)`` complex64 for unshifted FFTs.

    The k-space kernel is scattered into one convolution kernel ``G(δ)`` (``f(k) = Σ_δ G(δ)
    a(k + δ)``, δ = source - target; each target offset owns the δ ≡ -offset (mod R) class,
    so all targets share one kernel, identity at δ = 0); ``fftn`` of ``G`` placed at
    ``δ mod N`` is the image-domain weight.
    """
    if weights.image_weights is None or weights.image_shape != shape:
        nz, ny, nx = shape
        h = weights.kernel_kx // 2
        g = xp.zeros((c, c, nz, ny, nx), xp.complex64)
        w = weights.w.reshape(len(weights.targets), c, len(weights.taps), c, weights.kernel_kx)
        for t, (dz, dy) in enumerate(weights.targets):
            for s, (tz, ty) in enumerate(weights.taps):
                for k, dx in enumerate(range(-h, h + 1)):
                    g[:, :, (tz - dz) % nz, (ty - dy) % ny, dx % nx] += w[t, :, s, :, k]
        g[xp.arange(c), xp.arange(c), 0, 0, 0] += 1
        fft = fft_module(xp)
        weights.image_weights = fft.fftn(g, axes=(2, 3, 4), workers=-1) if xp is np else fft.fftn(g, axes=(2, 3, 4))
        weights.image_shape = shape
    return weights.image_weights


def apply_hybrid(data: Any, lattice: Lattice, weights: GrappaWeights) -> Any:
    """Fill ``data`` ``(coils, kz, ky, kx)`` (zeros off the lattice) by hybrid (x, ky, kz) GRAPPA.

    Only the lattice lines are transformed along kx (1/R of the data); the targets come out of
    one batched matmul over x and are transformed back. Returns new complex64 k-space with the
    lattice points kept and every other point of the cells filled; the caller restores
    acquired lines and zeroes outside the acquired range.
    """
    xp = get_array_module(data)
    fft = fft_module(xp)
    kw = {"workers": -1} if xp is np else {}
    c, nz, ny, nx = data.shape
    (rz, ry), (oz, oy) = lattice.r, lattice.offset
    # Cells: lattice origins covering the grid (the first one may start before index 0).
    cz0, cy0 = oz - rz * math.ceil(oz / rz), oy - ry * math.ceil(oy / ry)
    ncz, ncy = math.ceil((nz - cz0) / rz), math.ceil((ny - cy0) / ry)
    mz = [t[0] // rz for t in weights.taps]  # tap offsets in cells
    my = [t[1] // ry for t in weights.taps]
    pz0, py0 = -min(mz), -min(my)
    pz1, py1 = max(mz), max(my)
    cells = xp.zeros((c, ncz + pz0 + pz1, ncy + py0 + py1, nx), xp.complex64)
    fz, fy = (1 if cz0 < 0 else 0), (1 if cy0 < 0 else 0)  # first cell origin off the grid
    lat = data[:, oz::rz, oy::ry]
    cells[:, pz0 + fz : pz0 + fz + lat.shape[1], py0 + fy : py0 + fy + lat.shape[2]] = lat
    hyb = fft.ifft(cells, axis=-1, **kw).astype(xp.complex64, copy=False)
    hyb = xp.ascontiguousarray(hyb.transpose(3, 0, 1, 2))  # (x, c, cz, cy)
    src = xp.stack([hyb[:, :, pz0 + a : pz0 + a + ncz, py0 + b : py0 + b + ncy] for a, b in zip(mz, my)], axis=1)
    src = src.reshape(nx, len(mz) * c, ncz * ncy)
    with _one_blas_thread():
        out = xp.matmul(_hybrid_weights(weights, nx, xp), src)  # (x, T*c, cells)
    out = fft.fft(out, axis=0, **kw).reshape(nx, len(weights.targets), c, ncz, ncy)
    full = xp.zeros((c, ncz * rz, ncy * ry, nx), xp.complex64)
    for t, (dz, dy) in enumerate(weights.targets):
        full[:, dz::rz, dy::ry] = out[:, t].transpose(1, 2, 3, 0)
    full[:, 0::rz, 0::ry] = cells[:, pz0 : pz0 + ncz, py0 : py0 + ncy]
    z0, y0 = -cz0, -cy0
    return full[:, z0 : z0 + nz, y0 : y0 + ny]


def _one_blas_thread():
    """One BLAS thread for the batched matmul: its inner sizes (~100) are too small to share
    out, and OpenBLAS threads spin on a busy machine (measured 25 -> 16 ms at 32 coils)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController

            _CONTROLLER = ThreadpoolController()
        except ImportError:
            _CONTROLLER = False
    if not _CONTROLLER:
        import contextlib

        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=1, user_api="blas")


_CONTROLLER: Any = None


def apply_image(data: Any, lattice: Lattice, weights: GrappaWeights) -> Any:
    """As :func:`apply_hybrid`, by per-pixel image-domain coil unmixing."""
    xp = get_array_module(data)
    fft = fft_module(xp)
    kw = {"workers": -1} if xp is np else {}
    c, nz, ny, nx = data.shape
    iw = _image_weights(weights, (nz, ny, nx), c, xp)
    img = fft.ifftn(data, axes=(1, 2, 3), **kw)
    mixed = xp.einsum("jizyx,izyx->jzyx", iw, img)
    return fft.fftn(mixed, axes=(1, 2, 3), **kw).astype(xp.complex64, copy=False)


def reference_checksum(reference: Any) -> str:
    """SHA-1 of the reference bytes (exact change detection)."""
    from inline.backend import to_host

    return hashlib.sha1(np.ascontiguousarray(to_host(reference)).tobytes()).hexdigest()


@register
class GRAPPA(AccumulatingGadget):
    """GRAPPA reconstruction of undersampled Cartesian k-space (Griswold et al., MRM 2002;47:1202).

    Input: :class:`ReconBuffer` with ``data`` ``(coils, kz, ky, kx)`` complex64 (zeros at
    unsampled lines), ``sampled`` ``(kz, ky)`` and ``reference`` (ACS) on the same grid.
    Output: the same buffer with the missing lines filled: ``data`` complex64 of the same
    shape, ``sampled`` True over the acquired (kz, ky) range, history ``"GRAPPA R=..."``; NumPy
    in, NumPy out; CuPy in, CuPy out (``xp = get_array_module(data)``).

    * Acceleration (Rz, Ry): the header's ``parallelImaging/accelerationFactor``
      (``kspace_encoding_step_2``, ``kspace_encoding_step_1``) unless ``acceleration_ky`` /
      ``acceleration_kz`` are set. The lattice offset is read from ``sampled``.
    * Calibration: the largest fully sampled block of ``reference`` (embedded, interleaved or
      separate ACS alike); if ``reference`` is None, the largest fully sampled block of ``data``
      (all-embedded ACS). With ``calibrationMode`` embedded (or unknown) the acquired reference
      lines are copied into the output (data consistency); with ``separate`` they are not.
    * Partial Fourier: only points between the first and last acquired line (of data or
      reference) along ky and kz are filled; the rest stays zero.
    * Fully sampled (R = 1 or every line in range acquired): passed through unchanged.
    * Weights cache, per slice position and sampling geometry (grid shape, R, lattice offset,
      ACS block shape): computed on the first buffer and reused for every repetition, contrast,
      phase and set; recomputed when the ACS block changes by more than
      ``recalibrate_threshold`` (relative Frobenius norm; 0 = any bit change, a SHA-1 check).
      A buffer without reference reuses its slice's weights.
    * Early calibration: an :class:`~inline.buffers.EarlyReference` (accumulator
      ``early_reference``) is calibrated on arrival, while the scanner still acquires the
      buffer's imaging lines; its buffer then uses those weights if its ACS block has the same
      shape and is unchanged (``recalibrate_threshold``), else calibrates again.
    * No calibration data at all (no reference, no cached weights, no fully sampled centre):
      ``on_missing_reference="warn"`` (default) passes the buffer on unchanged (the image will
      be aliased, R times folded) and emits a ``WARNING`` :class:`Text` once per slice: the
      operator gets an image and is told why it is folded, rather than losing the series;
      ``"error"`` raises :class:`GrappaError` (the session reports ``ERROR`` and closes).

    Raises:
        GrappaError (a ValueError): irregular sampling, ACS too small for the kernel, singular
            calibration, or missing calibration with ``on_missing_reference="error"``.
        ValueError: ``data`` not 4-D.
    """

    class Params(GadgetParams):
        kernel_ky: int = Field(4, ge=1, le=8, description="Source lattice lines per kernel along ky (Griswold: 4).")
        kernel_kz: int = Field(2, ge=1, le=8, description="Source lattice partitions along kz (3D, Rz > 1 only).")
        kernel_kx: int = Field(5, ge=1, le=15, description="Readout taps per kernel (odd).")
        lambda_rel: float = Field(
            1e-2, ge=0.0, description="Tikhonov lambda relative to ||A||_F^2 / n_sources of the calibration matrix A."
        )
        acceleration_ky: int | None = Field(None, ge=1, description="Override of the header's ky acceleration.")
        acceleration_kz: int | None = Field(None, ge=1, description="Override of the header's kz acceleration.")
        method: Literal["hybrid", "image"] = Field(
            "hybrid", description="hybrid: per-x batched matmul in (x, ky, kz); image: per-pixel image-domain unmixing."
        )
        recalibrate_threshold: float = Field(
            0.1, ge=0.0, description="Recalibrate when ||ACS - cached ACS|| / ||cached ACS|| exceeds this (0: any change)."
        )
        on_missing_reference: Literal["warn", "error"] = Field(
            "warn", description="No calibration data: pass through with a WARNING text, or raise."
        )

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer, EarlyReference)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer, Text)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        if self.params.kernel_kx % 2 == 0:
            raise ValueError(f"GRAPPA: kernel_kx must be odd, got {self.params.kernel_kx}")
        self._cache: dict[tuple, GrappaWeights] = {}
        self._by_slice: dict[int, tuple] = {}
        self._early: dict[AcquisitionIndex, tuple[tuple, GrappaWeights]] = {}
        self._warned: set[int] = set()
        #: number of weight calibrations and of buffers that reused cached weights
        self.stats = _Stats()
        self._header_r, self._mode = self._from_header()

    def _from_header(self) -> tuple[tuple[int, int], str]:
        try:
            pi = self.header.encoding[0].parallelImaging
        except (AttributeError, IndexError, TypeError):
            pi = None
        ry = rz = 1
        mode = "embedded"
        if pi is not None:
            af = pi.accelerationFactor
            if af is not None:
                ry = int(af.kspace_encoding_step_1 or 1)
                rz = int(af.kspace_encoding_step_2 or 1)
            if pi.calibrationMode is not None:
                mode = getattr(pi.calibrationMode, "value", str(pi.calibrationMode))
        return (rz, ry), mode

    def acceleration(self) -> tuple[int, int]:
        """(Rz, Ry): params override the header."""
        rz, ry = self._header_r
        return (self.params.acceleration_kz or rz, self.params.acceleration_ky or ry)

    def _weights(self, buf: ReconBuffer, lattice: Lattice) -> GrappaWeights | None:
        p = self.params
        slice_ = buf.index.slice
        if buf.reference is not None and buf.reference_sampled is not None and buf.reference_sampled.any():
            acs = acs_block(buf.reference, buf.reference_sampled)
        else:
            # all-embedded ACS: the fully sampled centre of data
            acs = acs_block(buf.data, buf.sampled) if buf.sampled.sum() > lattice_count(lattice) else None
            if acs is not None and acs.shape[2] < 2 * lattice.r[1]:
                acs = None
        geometry = (slice_, buf.data.shape, lattice.r, lattice.offset)
        if acs is None:
            key = self._by_slice.get(slice_)
            if key is not None and key[:4] == geometry:
                self.stats.reuses += 1
                return self._cache[key]
            return None
        key = (*geometry, acs.shape)
        cached = self._cache.get(key)
        if cached is not None and not self._changed(cached.reference, acs):
            self.stats.reuses += 1
            self._by_slice[slice_] = key
            return cached
        early = self._early.pop(buf.index, None)
        if early is not None and early[0] == (lattice.r, buf.data.shape, acs.shape) and not self._changed(early[1].reference, acs):
            weights = early[1]
            self.stats.early += 1
        else:
            weights = calibrate(acs, lattice.r, (p.kernel_kz, p.kernel_ky), p.kernel_kx, p.lambda_rel)
            self.stats.calibrations += 1
        self._cache[key] = weights
        self._by_slice[slice_] = key
        return weights

    def _changed(self, old: Any, new: Any) -> bool:
        t = self.params.recalibrate_threshold
        if t == 0.0:
            return reference_checksum(old) != reference_checksum(new)
        xp = get_array_module(new)
        norm = float(xp.linalg.norm(old))
        return norm == 0.0 or float(xp.linalg.norm(new - old)) > t * norm

    def _calibrate_early(self, item: EarlyReference) -> None:
        """Calibrate on the calibration lines sent ahead of their buffer; kept until it comes."""
        r = self.acceleration()
        if r == (1, 1) or not item.reference_sampled.any():
            return
        acs = acs_block(item.reference, item.reference_sampled)
        p = self.params
        try:
            weights = calibrate(acs, r, (p.kernel_kz, p.kernel_ky), p.kernel_kx, p.lambda_rel)
        except ValueError as e:  # e.g. too few ACS lines: the complete buffer decides what to do
            self.log.debug("GRAPPA: no early calibration for %s: %s", item.index, e)
            return
        self.stats.calibrations += 1
        self._early[item.index] = ((r, item.data_shape, acs.shape), weights)

    def process(self, item: ReconBuffer | EarlyReference, trace: Trace) -> Iterator[Output]:
        if isinstance(item, EarlyReference):
            self._calibrate_early(item)
            return
        if item.data.ndim != 4:
            raise ValueError(f"GRAPPA: buffer data must be (coils, kz, ky, kx), got shape {item.data.shape}")
        r = self.acceleration()
        if r == (1, 1):
            yield item, trace
            return
        extra = item.reference_sampled if self._mode != "separate" else None
        lattice = find_lattice(item.sampled, r, _encoded_range(item, extra))
        in_range = np.zeros_like(item.sampled)
        in_range[lattice.lo[0] : lattice.hi[0] + 1, lattice.lo[1] : lattice.hi[1] + 1] = True
        consistent = item.reference is not None and item.reference_sampled is not None and self._mode != "separate"
        known = item.sampled | (item.reference_sampled if consistent else False)
        if known[in_range].all():
            yield item, trace
            return
        weights = self._weights(item, lattice)
        if weights is None:
            msg = (
                f"GRAPPA: no calibration data for slice {item.index.slice} (no reference lines, no fully sampled "
                f"centre, no earlier weights); image left undersampled (R={r[1]}x{r[0]}, aliased)"
            )
            if self.params.on_missing_reference == "error":
                raise GrappaError(msg)
            self.log.warning(msg)
            item.history = [*item.history, "GRAPPA skipped (no calibration)"]
            if item.index.slice not in self._warned:
                self._warned.add(item.index.slice)
                self.stats.warnings.append(msg)
                yield text_message("warning", msg), trace
            yield item, trace
            return
        xp = get_array_module(item.data)
        on = _lattice_mask(lattice, item.sampled.shape)
        lat_data = item.data * xp.asarray(on)[None, :, :, None]
        apply = apply_hybrid if self.params.method == "hybrid" else apply_image
        filled = apply(lat_data, lattice, weights)
        filled *= xp.asarray(in_range)[None, :, :, None]
        s = xp.asarray(item.sampled)
        filled = xp.where(s[None, :, :, None], item.data, filled)
        if consistent:
            rs = xp.asarray(item.reference_sampled)
            filled = xp.where(rs[None, :, :, None], item.reference, filled)
        yield (
            replace(
                item,
                data=filled.astype(xp.complex64, copy=False),
                sampled=in_range,
                history=[*item.history, f"GRAPPA R={r[1]}x{r[0]}"],
                since_snapshot=None,
            ),
            trace,
        )


def _encoded_range(item: ReconBuffer, extra: np.ndarray | None) -> np.ndarray:
    """``(kz, ky)`` mask of the header's encoding limits on the grid (as the accumulator places
    lines: offset ``n // 2 - centre`` clamped so ``maximum`` fits), or'ed with ``extra``.

    Lines beyond the last acquired lattice line but inside the limits are filled (a lattice
    of R rarely ends on the last line); lines outside the limits (partial Fourier) are not.
    """
    _, nz, ny, _ = item.data.shape
    enc = item.encoding
    mask = np.zeros((nz, ny), bool)
    oz = min(max(nz // 2 - enc.kz_center, 0), max(nz - 1 - enc.kz_max, 0))
    oy = min(max(ny // 2 - enc.ky_center, 0), max(ny - 1 - enc.ky_max, 0))
    mask[oz : oz + enc.kz_max + 1, oy : oy + enc.ky_max + 1] = True
    if extra is not None:
        mask |= extra
    return mask


def lattice_count(lattice: Lattice) -> int:
    """Lattice points inside the acquired range."""
    (rz, ry), (oz, oy) = lattice.r, lattice.offset
    nz = len(range(lattice.lo[0] + (oz - lattice.lo[0]) % rz, lattice.hi[0] + 1, rz))
    ny = len(range(lattice.lo[1] + (oy - lattice.lo[1]) % ry, lattice.hi[1] + 1, ry))
    return nz * ny


def _lattice_mask(lattice: Lattice, shape: tuple[int, int]) -> np.ndarray:
    zz, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (zz % lattice.r[0] == lattice.offset[0]) & (yy % lattice.r[1] == lattice.offset[1])
