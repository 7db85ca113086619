"""Partial Fourier reconstruction: fill the unacquired side of asymmetric k-space.

Sources: E. M. Haacke, E. D. Lindskog, W. Lin, "A fast, iterative, partial-Fourier
technique capable of local phase recovery", J Magn Reson 1991;92:126-145 (POCS: the image
magnitude is free, its phase is the low-resolution phase of the symmetric k-space centre,
the acquired samples are kept); D. C. Noll, D. G. Nishimura, A. Macovski, "Homodyne
detection in magnetic resonance imaging", IEEE Trans Med Imaging 1991;10:154-163
(homodyne: Hermitian-weighting filter, phase demodulation, real part). Gadgetron does the
same per coil after the accumulator (``GenericReconPartialFourierHandlingPOCSGadget`` /
``...FilterGadget``, ``mri_core_partial_fourier``) and pads asymmetric echoes in
``AsymmetricEchoAdjustROGadget``; this gadget was written from the papers, with those as
a reading reference.

Axis order as in :mod:`inline.buffers`: k-space ``(coils, kz, ky, kx)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from gadgets._common import readout_placement
from inline.backend import fft_module, get_array_module
from inline.buffers import ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register


@dataclass(frozen=True)
class AcquiredRange:
    """Acquired part ``[lo, hi]`` (inclusive) of one k-space axis of length ``n``; centre ``n // 2``."""

    n: int
    lo: int
    hi: int

    @property
    def partial(self) -> bool:
        """True when one side of the axis is missing (the acquired part is not the full axis)."""
        return self.lo > 0 or self.hi < self.n - 1

    @property
    def half_width(self) -> int:
        """Half-width of the symmetric centre ``[c - w, c + w]`` inside the acquired part."""
        c = self.n // 2
        return max(min(c - self.lo, self.hi - c), 0)


def _centred(fftmod: ModuleType, x: Any, axes: tuple[int, ...], inverse: bool) -> Any:
    """Centred orthonormal (inverse) FFT over ``axes`` (the fftshift convention of FFTRecon)."""
    y = fftmod.ifftshift(x, axes=axes)
    y = (fftmod.ifftn if inverse else fftmod.fftn)(y, axes=axes, norm="ortho")
    return fftmod.fftshift(y, axes=axes)


def _tukey_centre(xp: ModuleType, r: AcquiredRange, taper: float) -> Any:
    """``(n,)`` float32 window: a Tukey (tapered cosine) window over the symmetric centre, 0 outside.

    ``taper`` is the tapered fraction of the centre (1: Hann). An axis without partial
    Fourier gets ones (no low-pass along it).
    """
    if not r.partial:
        return xp.ones(r.n, dtype=np.float32)
    c, w = r.n // 2, r.half_width
    m = 2 * w + 1
    t = np.linspace(0.0, 1.0, m)
    win = np.ones(m)
    if taper > 0:
        edge = t < taper / 2
        win[edge] = 0.5 * (1 - np.cos(2 * np.pi * t[edge] / taper))
        edge = t > 1 - taper / 2
        win[edge] = 0.5 * (1 - np.cos(2 * np.pi * (1 - t[edge]) / taper))
    out = np.zeros(r.n)
    out[c - w : c + w + 1] = win
    return xp.asarray(out, dtype=np.float32)


def _homodyne_weight(xp: ModuleType, r: AcquiredRange, filter_name: str) -> Any:
    """``(n,)`` float32 Hermitian-weighting filter (Noll): 0 on the missing side, 2 on the acquired-only side.

    ``step``: 1 in the symmetric centre; ``ramp``: linear from 0 to 2 across it, which
    avoids the step's ringing. An axis without partial Fourier gets ones.
    """
    if not r.partial:
        return xp.ones(r.n, dtype=np.float32)
    c, w = r.n // 2, r.half_width
    k = np.arange(r.n) - c
    long_high = (r.hi - c) >= (c - r.lo)  # the acquired-only side is at high k
    s = k if long_high else -k
    if filter_name == "ramp" and w > 0:
        h = np.clip(1.0 + s / (w + 1.0), 0.0, 2.0)
    else:
        h = np.where(np.abs(s) <= w, 1.0, np.where(s > 0, 2.0, 0.0))
    inside = (np.arange(r.n) >= r.lo) & (np.arange(r.n) <= r.hi)
    return xp.asarray(np.where(inside, h, 0.0), dtype=np.float32)


def pocs(
    kspace: Any, acquired: Any, ranges: tuple[AcquiredRange, ...], iterations: int, tolerance: float, taper: float
) -> Any:
    """POCS partial Fourier fill of ``(coils, kz, ky, kx)`` k-space, per coil, all coils at once.

    Args:
        kspace: complex64 k-space, zero outside the acquired region.
        acquired: bool, broadcastable to ``kspace``: True where samples were acquired
            (they are kept exactly: data consistency).
        ranges: the acquired ranges of (kz, ky, kx).
        iterations: maximum iterations; stops earlier when the relative change of the
            filled samples falls below ``tolerance``.
        taper: Tukey taper fraction of the low-pass window of the phase estimate.

    Returns:
        complex64 k-space of the same shape with the missing side filled.
    """
    xp = get_array_module(kspace)
    fftmod = fft_module(xp)
    axes = tuple(1 + i for i, r in enumerate(ranges) if r.n > 1)
    win = xp.ones((1, 1, 1, 1), dtype=np.float32)
    for i, r in enumerate(ranges):
        shape = [1, 1, 1, 1]
        shape[1 + i] = r.n
        win = win * _tukey_centre(xp, r, taper).reshape(shape)
    low = _centred(fftmod, kspace * win, axes, inverse=True)
    phase = xp.exp(1j * xp.angle(low)).astype(np.complex64)
    k = kspace.copy()
    missing = ~acquired
    for _ in range(max(iterations, 1)):
        img = _centred(fftmod, k, axes, inverse=True)
        img = (xp.abs(img) * phase).astype(np.complex64)
        new = _centred(fftmod, img, axes, inverse=False).astype(np.complex64)
        new = xp.where(missing, new, kspace)
        change = float(xp.linalg.norm((new - k).ravel()))
        norm = float(xp.linalg.norm(new.ravel())) or 1.0
        k = new
        if change / norm < tolerance:
            break
    return k


def homodyne(kspace: Any, ranges: tuple[AcquiredRange, ...], filter_name: str, taper: float) -> Any:
    """Homodyne detection of ``(coils, kz, ky, kx)`` k-space: k-space of the real, phase-demodulated coil images.

    ``Re(IFFT(H k) * conj(phase))`` per coil, with ``H`` the Hermitian-weighting filter
    (product over the partial axes) and ``phase`` the phase of the Tukey-filtered symmetric
    centre. The result is the (Hermitian) k-space of a real image: acquired samples are
    not kept, and each coil's phase is gone.
    """
    xp = get_array_module(kspace)
    fftmod = fft_module(xp)
    axes = tuple(1 + i for i, r in enumerate(ranges) if r.n > 1)
    win = xp.ones((1, 1, 1, 1), dtype=np.float32)
    h = xp.ones((1, 1, 1, 1), dtype=np.float32)
    for i, r in enumerate(ranges):
        shape = [1, 1, 1, 1]
        shape[1 + i] = r.n
        win = win * _tukey_centre(xp, r, taper).reshape(shape)
        h = h * _homodyne_weight(xp, r, filter_name).reshape(shape)
    low = _centred(fftmod, kspace * win, axes, inverse=True)
    phase = xp.exp(1j * xp.angle(low))
    img = xp.real(_centred(fftmod, kspace * h, axes, inverse=True) * xp.conj(phase))
    return _centred(fftmod, img.astype(np.complex64), axes, inverse=False).astype(np.complex64)


def _copy_header(h: Any) -> Any:
    """An independent copy of an acquisition header (a ctypes structure, or any copyable object)."""
    try:
        return type(h).from_buffer_copy(h)
    except (AttributeError, TypeError):
        return copy.copy(h)


@register
class PartialFourier(PureGadget):
    """Fill the unacquired side of partial-Fourier k-space (ky, kz) and of asymmetric echoes (kx).

    Input and output :class:`ReconBuffer` ``(coils, kz, ky, kx)`` complex64. The gadget acts
    only when the buffer is partial Fourier; otherwise it returns the buffer untouched:

    * ky / kz: the header's encoding limits (``minimum``, ``maximum``, ``center`` of
      kspace_encoding_step_1/2; ``minimum`` from the session header, 0 if absent) put the
      acquired lines at ``[min, max] + (n // 2 - center)`` on the encoded grid (the
      accumulator's placement); partial when that range does not cover the grid. The
      filled region is then what lies outside the sampled extent (``sampled``) on the
      missing side; lines inside it (parallel-imaging gaps) are left as they are, so run
      this after a parallel-imaging gadget.
    * kx: ``header.center_sample`` not at ``kx // 2`` (asymmetric echo,
      :func:`~gadgets._common.readout_placement`): the readout is zero-padded to the
      symmetric length, filled, and ``header.center_sample`` set to its centre, so
      :class:`~gadgets.fft_recon.FFTRecon` sees a symmetric readout.

    Methods (``method``):

    * ``pocs`` (default; Haacke 1991): phase from the symmetric centre through a Tukey
      low-pass (``taper``), then ``iterations`` projections: magnitude of the current image
      with that phase, back to k-space, acquired samples restored. Keeps each coil's
      complex image, so any coil combination (RSS, Walsh, SENSE) still works.
    * ``homodyne`` (Noll 1991): Hermitian-weighting filter (``homodyne_filter``: ``ramp``
      across the symmetric centre, or ``step``), phase demodulation with the same
      low-resolution phase, real part. Each coil image becomes real-valued (coil phase
      removed, noise halved, acquired samples not kept): fine for RSS, not for
      phase-sensitive combinations or phase images.

    Per coil, all coils in one vectorised NumPy/CuPy path (the backend follows ``data``).
    """

    class Params(GadgetParams):
        method: Literal["pocs", "homodyne"] = Field("pocs", description="pocs (complex, per coil) or homodyne (real per coil).")
        iterations: int = Field(10, ge=1, le=200, description="Maximum POCS iterations.")
        tolerance: float = Field(1e-3, ge=0, description="POCS stops when the relative k-space change is below this.")
        taper: float = Field(
            1.0, ge=0, le=1, description="Tukey taper fraction of the phase low-pass over the symmetric centre (1: Hann)."
        )
        homodyne_filter: Literal["ramp", "step"] = Field("ramp", description="Homodyne Hermitian-weighting filter.")
        readout: bool = Field(True, description="Also fill asymmetric echoes along the readout.")

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer,)

    def _minimum(self, name: str) -> int:
        try:
            lim = getattr(self.header.encoding[0].encodingLimits, name)
            return int(lim.minimum or 0)
        except (AttributeError, IndexError, TypeError):
            return 0

    def phase_ranges(self, item: ReconBuffer) -> tuple[AcquiredRange, AcquiredRange]:
        """Acquired ranges of (kz, ky) on the buffer's grid; not partial when the header says symmetric."""
        enc = item.encoding
        _, nz, ny, _ = item.data.shape
        rows = np.asarray(item.sampled)
        out = []
        for n, center, maximum, name, axis in (
            (nz, enc.kz_center, enc.kz_max, "kspace_encoding_step_2", 1),
            (ny, enc.ky_center, enc.ky_max, "kspace_encoding_step_1", 0),
        ):
            offset = min(max(n // 2 - center, 0), max(n - 1 - maximum, 0))  # as the accumulator
            lo, hi = self._minimum(name) + offset, maximum + offset
            if n <= 1 or (lo <= 0 and hi >= n - 1):
                out.append(AcquiredRange(n, 0, n - 1))
                continue
            hit = np.flatnonzero(rows.any(axis=axis))
            if hit.size:  # the data's own extent, within what the header allows
                lo, hi = max(lo, int(hit[0])), min(hi, int(hit[-1]))
            out.append(AcquiredRange(n, max(lo, 0), min(hi, n - 1)))
        return out[0], out[1]

    def apply(self, item: ReconBuffer) -> ReconBuffer:
        data = item.data
        if data.ndim != 4:
            raise ValueError(f"PartialFourier: buffer data must be (coils, kz, ky, kx), got shape {data.shape}")
        xp = get_array_module(data)
        _, nz, ny, nx = data.shape
        rz, ry = self.phase_ranges(item)
        center = int(getattr(item.header, "center_sample", 0) or 0) if item.header is not None else 0
        nx_full, x0 = readout_placement(nx, center) if self.params.readout else (nx, 0)
        rx = AcquiredRange(nx_full, x0, x0 + nx - 1)
        if not (rz.partial or ry.partial or rx.partial):
            return item
        k = data
        if rx.partial:
            k = xp.zeros(data.shape[:3] + (nx_full,), dtype=np.complex64)
            k[..., x0 : x0 + nx] = data
        ranges = (rz, ry, rx)
        if self.params.method == "pocs":
            z_in = xp.zeros(nz, dtype=bool)
            z_in[rz.lo : rz.hi + 1] = True
            y_in = xp.zeros(ny, dtype=bool)
            y_in[ry.lo : ry.hi + 1] = True
            x_in = xp.zeros(nx_full, dtype=bool)
            x_in[rx.lo : rx.hi + 1] = True
            acquired = z_in[:, None, None] & y_in[None, :, None] & x_in[None, None, :]
            out = pocs(k, acquired[None], ranges, self.params.iterations, self.params.tolerance, self.params.taper)
            label = f"PF-POCS({self.params.iterations})"
        else:
            out = homodyne(k, ranges, self.params.homodyne_filter, self.params.taper)
            label = f"PF-homodyne({self.params.homodyne_filter})"
        header = item.header
        if rx.partial:
            header = _copy_header(item.header)
            header.number_of_samples = nx_full
            header.center_sample = nx_full // 2
        self.log.debug("PartialFourier: %s, acquired kz %s ky %s kx %s", label, rz, ry, rx)
        return replace(item, data=out, header=header, history=[*item.history, label], since_snapshot=None)
