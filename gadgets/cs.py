"""Compressed sensing: L1-wavelet regularised parallel imaging (BART ``pics -l1`` style).

Solves, per buffer,

    min_x  1/2 || M F S x - y / s ||_2^2 + lambda || W x ||_1

with ``S`` ESPIRiT coil maps (:func:`espirit_maps` on the ACS lines), ``F`` the centred
orthonormal FFT, ``M`` the sampling mask, ``W`` BART's Daubechies-2 wavelet and ``s`` a data
scaling; the image returned is ``s * x``. This is the problem ``bart pics -l1 -r lambda -S``
solves (Uecker et al., BART; ``src/pics.c``, ``src/iter/italgos.c: fista``,
``src/wavelet/wavelet.c``), reproduced here step for step so the same ``lambda`` gives the
same image:

* wavelet (:class:`BartWavelet`): Daubechies-2 (4 taps) with BART's filters and
  half-sample symmetric boundary (``coord()`` in ``wavelet.c``: band length
  ``(n + 3) // 2``, so it is a redundant frame, not an orthogonal transform); the inverse is
  BART's synthesis (``wavelet_up3``), the left inverse, not the adjoint; levels: an axis is
  decomposed while its length is >= 16 (``minsize``); every band, the coarse one too, is
  soft-thresholded;
* random cycle spinning: before each thresholding the image is circularly shifted by a
  random ``0..2^levels`` per axis, drawn with glibc's ``rand_r`` from seed 1, as BART's
  ``wavthresh.c`` does, so a run reproduces BART's shift sequence;
* FISTA (``italgos.c``): ``x0 = 0``; per iteration ``x = prox(x, step * lambda)``, the
  FISTA extrapolation (``ravine``), ``x += step * (A^H y - A^H A x)``; ``step = 0.95``
  (``pics``' default, valid because ESPIRiT maps have norm <= 1 per pixel);
* scaling: ``s`` is the ``scaling`` parameter when given (``pics -w s``); else BART's
  ``estimate_scaling`` (:func:`bart_scaling`): RSS of the orthonormal inverse FFT of the
  fully sampled k-space centre (at most 32 per axis), divided by ``sqrt(N / N_cal)`` per
  axis, then the 90th percentile of its magnitudes unless the maximum is an outlier
  (``max - p90 >= 2 (p90 - median)``), then the maximum. Checked equal to the value
  ``bart pics -d5`` prints (33.891331 on the 128 x 128 Shepp-Logan test case).

Speed: the sampling is Cartesian with kx always fully sampled, so ``F^H M F`` needs FFTs
along ky (and kz) only: the readout FFT cancels. Internally images are stored
``(x, z, y)`` so those FFTs run along contiguous axes. Measured on this machine (2 cores
shared with other jobs, scipy.fft, 32 coils, 256 x 256, R = 4, 30 iterations, lambda 0.005;
bench/accel_cs.py, bench/results/accel_cs_cpu.json): this solver 0.83 s (NRMSE 0.0131 vs
the fully sampled image); sigpy.mri.app.L1WaveletRecon (sigpy 0.1.27: pywt db4 'zero'
mode, 2D FFTs, a different problem) 3.04 s (NRMSE 0.0214); ``bart pics -l1`` 2.30 s
(NRMSE 0.0131). Maps: :mod:`gadgets.espirit` in 2D (about 0.4 s for 32 coils at
256 x 256; sigpy's ``EspiritCalib`` took 29 s and ``bart ecalib`` 7.1 s), sigpy's
``EspiritCalib`` in 3D; cached per slice position.

Backends: one code path for NumPy and CuPy (``get_array_module`` on the buffer data);
the 3D EspiritCalib runs on the array's device through sigpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field

from inline.backend import fft_module, get_array_module, to_host
from inline.buffers import ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register

#: BART ``wavelet.c`` filters ``[analysis|synthesis][low|high][tap]``.
WAVELET_FILTERS: dict[str, np.ndarray] = {
    "dau2": np.array(
        [
            [
                [-0.1294095225512603, +0.2241438680420134, +0.8365163037378077, +0.4829629131445341],
                [-0.4829629131445341, +0.8365163037378077, -0.2241438680420134, -0.1294095225512603],
            ],
            [
                [+0.4829629131445341, +0.8365163037378077, +0.2241438680420134, -0.1294095225512603],
                [-0.1294095225512603, -0.2241438680420134, +0.8365163037378077, -0.4829629131445341],
            ],
        ]
    ),
    "haar": np.array(
        [
            [[+0.7071067811865475, +0.7071067811865475], [-0.7071067811865475, +0.7071067811865475]],
            [[+0.7071067811865475, +0.7071067811865475], [+0.7071067811865475, -0.7071067811865475]],
        ]
    ),
}
#: BART's smallest length of an axis that is still decomposed (``optreg.c``: ``MIN(dim, 16)``).
WAVELET_MIN_SIZE = 16
#: FISTA step of ``pics`` when none is given.
BART_STEP = 0.95
_RAND_MAX = 2**31 - 1


# -- BART's wavelet ------------------------------------------------------------------------
def _bandsize(n: int, flen: int) -> int:
    return (n + flen - 1) // 2


def wavelet_levels(n: int, min_size: int = WAVELET_MIN_SIZE, flen: int = 4) -> int:
    """Decompositions BART applies to an axis of length ``n`` (0 when ``n < min_size``)."""
    levels = 0
    while n >= min_size and n >= 2:
        levels += 1
        n = _bandsize(n, flen)
    return levels


class BartRand:
    """glibc ``rand_r`` and BART's ``rand_lim``: the shift sequence of ``wavthresh.c``."""

    def __init__(self, seed: int = 1):
        self.state = seed & 0xFFFFFFFF

    def rand_r(self) -> int:
        nxt = self.state
        nxt = (nxt * 1103515245 + 12345) & 0xFFFFFFFF
        result = (nxt // 65536) % 2048
        nxt = (nxt * 1103515245 + 12345) & 0xFFFFFFFF
        result = (result << 10) ^ ((nxt // 65536) % 1024)
        nxt = (nxt * 1103515245 + 12345) & 0xFFFFFFFF
        result = (result << 10) ^ ((nxt // 65536) % 1024)
        self.state = nxt
        return result

    def lim(self, limit: int) -> int:
        divisor = _RAND_MAX // (limit + 1)
        while True:
            r = self.rand_r() // divisor
            if r <= limit:
                return r


class BartWavelet:
    """BART's multi-level separable wavelet transform over some axes of a complex array.

    Coefficients are kept as a nested list per level: ``[details_1, ..., details_L, coarse]``
    where ``details_l`` holds the ``2^d - 1`` high-pass bands of level ``l`` (``d`` axes
    still decomposed there). Works on NumPy and CuPy arrays.
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], name: str = "dau2", min_size: int = WAVELET_MIN_SIZE):
        if name not in WAVELET_FILTERS:
            raise ValueError(f"wavelet must be one of {sorted(WAVELET_FILTERS)}, got {name!r}")
        self.shape = tuple(shape)
        self.filters = WAVELET_FILTERS[name].astype(np.float32)
        self.flen = self.filters.shape[-1]
        # BART (optreg.c): every axis longer than 1 is transformed, minsize = MIN(length, 16)
        self.min_sizes = {a: min(shape[a], min_size) for a in axes if shape[a] > 2}
        self.axes = tuple(self.min_sizes)
        #: per axis: the number of decompositions (BART's shift range is ``0..2^(levels+1)``)
        self.levels = {a: wavelet_levels(shape[a], self.min_sizes[a], self.flen) for a in self.axes}

    # one level along one axis ----------------------------------------------------------
    def _down(self, x, axis: int, band: int):
        xp = get_array_module(x)
        n = x.shape[axis]
        bs = _bandsize(n, self.flen)
        left = self.flen - 2
        right = 2 * bs + self.flen - 2 - n - left
        pad = [(0, 0)] * x.ndim
        pad[axis] = (left, max(right, 0))
        xe = xp.pad(x, pad, mode="symmetric")
        f = self.filters[0, band]
        out = None
        for tap in range(self.flen):  # out[j] = sum_l f[flen-1-l] x[2j + 2 - flen + l]
            sl = [slice(None)] * x.ndim
            sl[axis] = slice(tap, tap + 2 * bs - 1, 2)
            term = xe[tuple(sl)] * f[self.flen - 1 - tap]
            out = term if out is None else out + term
        return out

    def _up(self, low, high, axis: int, n: int):
        xp = get_array_module(low)
        shape = list(low.shape)
        shape[axis] = n
        out = xp.zeros(shape, low.dtype)
        bs = low.shape[axis]
        for band, c in ((0, low), (1, high)):
            g = self.filters[1, band]
            for tap in range(self.flen):
                parity = (tap + 1) % 2  # n = 2k + parity receives c[k + (parity + tap - 1) // 2]
                offset = (parity + tap - 1) // 2
                count = (n - parity + 1) // 2
                k0 = max(0, -offset)
                k1 = min(count, bs - offset)
                if k1 <= k0:
                    continue
                dst = [slice(None)] * low.ndim
                dst[axis] = slice(2 * k0 + parity, 2 * (k1 - 1) + parity + 1, 2)
                src = [slice(None)] * low.ndim
                src[axis] = slice(k0 + offset, k1 + offset)
                out[tuple(dst)] += c[tuple(src)] * g[self.flen - 1 - tap]
        return out

    # multi-level -----------------------------------------------------------------------
    def forward(self, x) -> list:
        coeffs = []
        current = x
        axes = list(self.axes)
        while axes:
            bands = [current]
            for a in axes:
                bands = [b for src in bands for b in (self._down(src, a, 0), self._down(src, a, 1))]
            coeffs.append((tuple(axes), tuple(current.shape), bands[1:]))
            current = bands[0]
            axes = [a for a in axes if current.shape[a] >= self.min_sizes[a]]
        coeffs.append(current)
        return coeffs

    def inverse(self, coeffs: list):
        current = coeffs[-1]
        for axes, shape, details in reversed(coeffs[:-1]):
            bands = [current, *details]
            for a in reversed(axes):
                bands = [self._up(bands[i], bands[i + 1], a, shape[a]) for i in range(0, len(bands), 2)]
            current = bands[0]
        return current

    def l1(self, x) -> float:
        xp = get_array_module(x)
        coeffs = self.forward(x)
        total = float(xp.sum(xp.abs(coeffs[-1])))
        for _, _, details in coeffs[:-1]:
            total += sum(float(xp.sum(xp.abs(d))) for d in details)
        return total


def _soft(x, threshold: float):
    xp = get_array_module(x)
    mag = xp.abs(x)
    return x * (xp.maximum(mag - threshold, 0) / xp.maximum(mag, np.float32(1e-30)))


def wavelet_threshold(wav: BartWavelet, x, threshold: float, shifts: dict[int, int] | None = None):
    """BART's ``wavelet_thresh``: circular shift, transform, complex soft threshold, inverse, unshift."""
    xp = get_array_module(x)
    if shifts:
        x = xp.roll(x, tuple(shifts.values()), axis=tuple(shifts))
    coeffs = wav.forward(x)
    coeffs = [
        (axes, shape, [_soft(d, threshold) for d in details]) for axes, shape, details in coeffs[:-1]
    ] + [_soft(coeffs[-1], threshold)]
    out = wav.inverse(coeffs)
    if shifts:
        out = xp.roll(out, tuple(-s for s in shifts.values()), axis=tuple(shifts))
    return out


# -- the SENSE operator on (x, z, y) images ------------------------------------------------
def _estimate_scaling(img_abs: np.ndarray) -> float:
    """BART ``estimate_scaling_norm``: p90 of ``|x|`` unless the maximum is an outlier."""
    v = np.sort(img_abs.ravel())
    med, p90, mx = v[int(v.size * 0.5)], v[int(v.size * 0.9)], v[-1]
    return float(p90 if (mx - p90) < 2 * (p90 - med) else mx)


def _centre_width(sampled_1d: np.ndarray, cap: int) -> int:
    """Width of the fully sampled block centred on ``n // 2`` (even, at most ``cap``)."""
    n = sampled_1d.size
    c = n // 2
    w = 0
    while w + 2 <= min(cap, n) and bool(np.all(sampled_1d[c - (w + 2) // 2 : c + (w + 2) // 2])):
        w += 2
    return w


def bart_scaling(kspace, sampled, cal_size: int = 32) -> float:
    """BART's automatic ``pics`` scaling (``estimate_scaling`` in ``src/sense/optcom.c``).

    The fully sampled centre block (at most ``cal_size`` per axis) of ``kspace``
    ``(coils, kz, ky, kx)`` is transformed with an orthonormal inverse FFT, combined by RSS,
    and :func:`_estimate_scaling`'s rule applied to its magnitudes divided by
    ``sqrt(N / N_cal)`` per axis.
    """
    xp = get_array_module(kspace)
    s = to_host(xp.asarray(sampled)).astype(bool)
    _, nz, ny, nx = kspace.shape
    wz = 1 if nz == 1 else _centre_width(np.all(s, axis=1), cal_size)
    wy = _centre_width(np.all(s, axis=0), cal_size)
    wx = min(cal_size, nx - nx % 2)
    if wy == 0 or wz == 0:
        raise ValueError("bart_scaling: no fully sampled k-space centre")
    block = kspace[:, nz // 2 - wz // 2 : nz // 2 - wz // 2 + wz, ny // 2 - wy // 2 : ny // 2 + wy // 2,
                   nx // 2 - wx // 2 : nx // 2 + wx // 2]
    img = fft_module(xp).ifftn(xp.asarray(block, xp.complex64), axes=(1, 2, 3), norm="ortho")
    rss = to_host(xp.sqrt(xp.sum(xp.abs(img) ** 2, axis=0)))
    rescale = math.sqrt(nx / wx) * math.sqrt(ny / wy) * math.sqrt(nz / wz)
    return _estimate_scaling(rss / rescale)


@dataclass
class CSResult:
    """Reconstruction output: ``image`` ``(z, y, x)`` complex64 in data units, and diagnostics."""

    image: Any
    scaling: float
    objective: list[float]


class SenseL1Wavelet:
    """FISTA for ``1/2||M F S x - y||^2 + lambda ||W x||_1`` (``pics -l1`` defaults), Cartesian ky/kz masks.

    Args:
        maps: ``(coils, z, y, x)`` complex64 sensitivities (ESPIRiT, norm <= 1 per pixel).
        sampled: ``(kz, ky)`` bool mask (kx fully sampled).
    """

    def __init__(self, maps, sampled, wavelet: str = "dau2", fft_workers: int = -1):
        xp = get_array_module(maps)
        self.xp = xp
        self.fft = fft_module(xp)
        self.workers = fft_workers
        c, nz, ny, nx = maps.shape
        self.three_d = nz > 1
        self.fft_axes = (-2, -1) if self.three_d else (-1,)
        # internal layout (coils, x, z, y): the FFT axes z, y are the last, contiguous ones
        m = xp.ascontiguousarray(xp.transpose(maps, (0, 3, 1, 2))).astype(xp.complex64)
        # keep maps in ifftshifted coordinates along the FFT axes; mask unshifted to match
        self.maps = xp.fft.ifftshift(m, axes=(2, 3))
        self.maps_conj = xp.conj(self.maps)
        mask = xp.asarray(sampled, dtype=bool)  # (kz, ky)
        self.sampled = mask
        self.mask = xp.fft.ifftshift(mask.astype(xp.float32))  # (z, y), broadcast over (c, x)
        self.shape = (nx, nz, ny)
        self.wavelet = BartWavelet(self.shape, (0, 1, 2), wavelet)

    # image (x, z, y) in natural coordinates <-> shifted
    def _shift(self, img):
        return self.xp.fft.ifftshift(img, axes=(1, 2))

    def _unshift(self, img):
        return self.xp.fft.fftshift(img, axes=(1, 2))

    def adjoint_data(self, kspace):
        """``A^H y`` for ``(coils, kz, ky, kx)`` k-space (zeros where unsampled): ``(x, z, y)``."""
        xp = self.xp
        k = xp.transpose(xp.asarray(kspace, xp.complex64), (0, 3, 1, 2))  # (c, x, kz, ky)
        k = xp.fft.ifftshift(k, axes=(2, 3)) * self.mask
        # centred inverse FFT along x (the readout), then the y/z inverse FFT
        k = self.fft.ifft(xp.fft.ifftshift(k, axes=1), axis=1, norm="ortho", workers=self.workers)
        k = xp.fft.fftshift(k, axes=1)
        img = self.fft.ifftn(k, axes=self.fft_axes, norm="ortho", workers=self.workers)
        return self._unshift(xp.sum(self.maps_conj * img, axis=0))

    def normal(self, x):
        """``A^H A x`` for an ``(x, z, y)`` image; FFTs along (z,) y only."""
        xp = self.xp
        coil = self.maps * self._shift(x)[None]
        k = self.fft.fftn(coil, axes=self.fft_axes, norm="ortho", workers=self.workers, overwrite_x=True)
        k *= self.mask
        coil = self.fft.ifftn(k, axes=self.fft_axes, norm="ortho", workers=self.workers, overwrite_x=True)
        coil *= self.maps_conj
        return self._unshift(xp.sum(coil, axis=0))

    def objective(self, x, aty, yty: float, lam: float) -> float:
        """``1/2||Ax - y||^2 + lam ||Wx||_1`` from ``A^H y`` and ``||y||^2`` (no k-space needed)."""
        xp = self.xp
        ata = self.normal(x)
        quad = float(xp.real(xp.vdot(x, ata))) - 2 * float(xp.real(xp.vdot(x, aty))) + yty
        return 0.5 * quad + lam * self.wavelet.l1(x)

    def solve(
        self,
        kspace,
        lam: float,
        iterations: int = 30,
        step: float = BART_STEP,
        scaling: float | None = None,
        random_shifts: bool = True,
        track_objective: bool = False,
    ) -> CSResult:
        xp = self.xp
        aty = self.adjoint_data(kspace)
        if scaling is None:
            try:
                scaling = bart_scaling(kspace, self.sampled)
            except ValueError:  # no fully sampled centre: the rule on |A^H y| (pics, non-Cartesian)
                scaling = _estimate_scaling(to_host(xp.abs(aty)))
        if not scaling > 0:
            scaling = 1.0
        aty = aty / np.float32(scaling)
        yty = float(xp.sum(xp.abs(xp.asarray(kspace) * xp.asarray(self._mask_kspace_layout())) ** 2)) / scaling**2
        rng = BartRand(1)
        x = xp.zeros(self.shape, xp.complex64)
        old = x.copy()
        t = 1.0
        history = []
        for _ in range(iterations):
            if track_objective:
                history.append(self.objective(x, aty, yty, lam))
            if lam > 0:
                # BART draws the shifts of the axes in its own order: x (readout) first, then y, z
                shifts = {}
                if random_shifts:
                    for axis in (0, 2, 1):
                        if axis in self.wavelet.levels:
                            shifts[axis] = rng.lim(1 << (self.wavelet.levels[axis] + 1))
                x = wavelet_threshold(self.wavelet, x, lam * step, shifts)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta = np.float32((t - 1) / t_new)
            new = x
            x = new + beta * (new - old)
            old, t = new, t_new
            x = x + np.float32(step) * (aty - self.normal(x))
        if track_objective:
            history.append(self.objective(x, aty, yty, lam))
        image = xp.transpose(x, (1, 2, 0)) * np.float32(scaling)  # (z, y, x)
        return CSResult(image=xp.ascontiguousarray(image), scaling=float(scaling), objective=history)

    def _mask_kspace_layout(self):
        xp = self.xp
        return xp.fft.fftshift(self.mask)[None, :, :, None]


# -- ESPIRiT maps ----------------------------------------------------------------------------
def espirit_maps(calib, sampled, calib_width: int, kernel_width: int, threshold: float, crop: float) -> Any:
    """ESPIRiT maps ``(coils, kz, ky, kx)`` from k-space ``(coils, kz, ky, kx)`` with its centre sampled.

    One set of maps (Uecker et al., MRM 2014;71:990), pixels whose top eigenvalue is below
    ``crop`` set to 0. 2D: :func:`gadgets.espirit.espirit_maps` on the fully sampled centre
    (``sampled`` ``(kz, ky)`` says where); 0.5 s for 32 coils at 256 x 256 where sigpy's
    ``EspiritCalib`` took 27-29 s. 3D: sigpy's ``EspiritCalib``.
    """
    xp = get_array_module(calib)
    if calib.shape[1] == 1:
        from gadgets.espirit import calibration_region
        from gadgets.espirit import espirit_maps as espirit_2d

        block = calibration_region(calib, sampled, calib_width)
        maps, _ = espirit_2d(block[:, 0], tuple(calib.shape[2:]), kernel_width, threshold, crop)
        return xp.asarray(maps, dtype=xp.complex64)[:, None]
    import sigpy
    from sigpy.mri.app import EspiritCalib

    device = sigpy.Device(-1 if xp is np else 0)
    maps = EspiritCalib(
        calib, calib_width=calib_width, kernel_width=kernel_width, thresh=threshold, crop=crop, device=device, show_pbar=False
    ).run()
    return xp.asarray(maps, dtype=xp.complex64)


def centred_fft(img, axes: tuple[int, ...], xp: ModuleType, workers: int = -1):
    """Centred orthonormal forward FFT (image -> k-space) over ``axes``."""
    fft = fft_module(xp)
    k = xp.fft.ifftshift(img, axes=axes)
    k = fft.fftn(k, axes=axes, norm="ortho", workers=workers)
    return xp.fft.fftshift(k, axes=axes)


@dataclass
class _CachedMaps:
    calibration: Any  # the ACS k-space the maps came from
    maps: Any


@register
class CompressedSensing(PureGadget):
    """L1-wavelet compressed-sensing SENSE reconstruction of an undersampled buffer (``bart pics -l1``).

    Input :class:`ReconBuffer` ``(coils, kz, ky, kx)`` with zeros at unsampled lines; the
    calibration lines (``reference``, or the fully sampled centre of ``data`` when there is
    none) give ESPIRiT maps, cached per (slice, position, shape) and recomputed when the
    calibration k-space changes by more than ``recalibration_threshold`` (relative norm);
    ACS lines not among the imaging lines are used as data too.

    Output :class:`ReconBuffer` with one virtual coil: ``data`` ``(1, kz, ky, kx)`` = the
    centred orthonormal FFT of the reconstructed image, ``sampled`` all True, no
    reference, history + ``"CS-L1WAVELET"``; FFTRecon, CoilCombine and ImageFinish follow
    unchanged. The solver and its BART equivalence are described in the module docstring.

    Raises:
        ValueError: ``data`` is not 4-D, or no calibration region is found.
    """

    class Params(GadgetParams):
        model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

        lam: float = Field(
            0.005, alias="lambda", ge=0, description="L1-wavelet weight, BART pics -r convention (after data scaling)."
        )
        iterations: int = Field(30, ge=1, le=10000, description="FISTA iterations (pics -i; default 30 as pics).")
        wavelet: Literal["dau2", "haar"] = Field("dau2", description="BART wavelet (pics --wavelet).")
        scaling: float | None = Field(
            None, gt=0, description="Inverse data scaling (pics -w); None: BART's p90/max rule on |A^H y|."
        )
        step: float = Field(BART_STEP, gt=0, le=1.99, description="FISTA step (pics -s; maps must have norm <= 1).")
        random_shifts: bool = Field(True, description="BART's random wavelet cycle spinning (False = pics -n).")
        calib_width: int = Field(24, ge=4, description="ESPIRiT calibration region width [lines].")
        kernel_width: int = Field(6, ge=2, description="ESPIRiT kernel width [samples].")
        espirit_threshold: float = Field(0.02, gt=0, lt=1, description="ESPIRiT singular-value threshold (relative).")
        espirit_crop: float = Field(0.95, ge=0, lt=1, description="ESPIRiT eigenvalue crop: maps are 0 below it.")
        recalibration_threshold: float = Field(
            0.1, ge=0, description="Relative change of the ACS k-space that triggers new maps."
        )
        fft_workers: int = Field(-1, description="Threads for scipy.fft (-1: all CPUs).")

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._maps: dict[tuple, _CachedMaps] = {}
        #: number of ESPIRiT calibrations run (for tests and logs)
        self.calibrations = 0
        #: the last solve's scaling (diagnostics)
        self.last_scaling: float | None = None

    def _key(self, item: ReconBuffer) -> tuple:
        pos = getattr(item.header, "position", None) if item.header is not None else None
        pos = tuple(round(float(p), 3) for p in pos) if pos is not None else ()
        return (item.index.slice, pos, item.data.shape)

    def _calibration(self, item: ReconBuffer):
        xp = get_array_module(item.data)
        if item.reference is not None:
            return xp.asarray(item.reference)
        return xp.asarray(item.data)

    def maps_for(self, item: ReconBuffer):
        """ESPIRiT maps ``(coils, z, y, x)`` for ``item``, from the cache when its calibration is unchanged."""
        xp = get_array_module(item.data)
        calib = self._calibration(item)
        key = self._key(item)
        cached = self._maps.get(key)
        if cached is not None:
            ref = cached.calibration
            change = float(xp.linalg.norm(calib - ref)) / max(float(xp.linalg.norm(ref)), 1e-30)
            if change <= self.params.recalibration_threshold:
                return cached.maps
        p = self.params
        sampled = item.reference_sampled if item.reference is not None and item.reference_sampled is not None else item.sampled
        maps = espirit_maps(calib, sampled, p.calib_width, p.kernel_width, p.espirit_threshold, p.espirit_crop)
        self.calibrations += 1
        self._maps[key] = _CachedMaps(calibration=calib.copy(), maps=maps)
        return maps

    def reconstruct(self, item: ReconBuffer, maps=None) -> CSResult:
        """The CS image of ``item`` with ``maps`` (ESPIRiT of its calibration when None)."""
        if item.data.ndim != 4:
            raise ValueError(f"CompressedSensing: buffer data must be (coils, kz, ky, kx), got shape {item.data.shape}")
        xp = get_array_module(item.data)
        if maps is None:
            maps = self.maps_for(item)
        data, sampled = item.data, xp.asarray(item.sampled)
        if item.reference is not None and item.reference_sampled is not None:
            extra = xp.asarray(item.reference_sampled) & ~sampled
            if bool(xp.any(extra)):
                data = xp.where(extra[None, :, :, None], xp.asarray(item.reference), data)
                sampled = sampled | extra
        p = self.params
        op = SenseL1Wavelet(xp.asarray(maps), sampled, p.wavelet, p.fft_workers)
        return op.solve(data, p.lam, p.iterations, p.step, p.scaling, p.random_shifts)

    def apply(self, item: ReconBuffer) -> ReconBuffer:
        xp = get_array_module(item.data)
        result = self.reconstruct(item)
        self.last_scaling = result.scaling
        three_d = item.data.shape[1] > 1
        axes = (0, 1, 2) if three_d else (1, 2)
        k = centred_fft(result.image, axes, xp, self.params.fft_workers).astype(xp.complex64)
        return item.completed(k[None], "CS-L1WAVELET")
