"""Cartesian FFT reconstruction with field-of-view adjustment to the recon matrix.

Sources: Gadgetron ``gadgets/mri_core/FFTGadget`` / ``GenericReconCartesianFFTGadget``
(centred orthonormal inverse FFT of the buffer) and
``GenericReconFieldOfViewAdjustmentGadget`` (reach the recon pixel size by k-space
zero-padding or cropping, then cut the image to the recon matrix), done here in k-space
before the single inverse FFT, which gives the same result with one transform.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Literal

import numpy as np
import scipy.fft
from pydantic import Field, field_validator

from gadgets._common import centred_resize, readout_placement
from inline.backend import fft_module, get_array_module
from inline.buffers import HYBRID, EncodingInfo, ImageBuffer, ReconBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register


def kspace_grid(current_fov_mm: float, current_n: int, recon_fov_mm: float, recon_n: int) -> int:
    """Number of k-space samples that give the recon pixel size over the current FOV.

    ``round(current_fov_mm / (recon_fov_mm / recon_n))``; the current size when the recon
    FOV or matrix is not set (0).
    """
    if recon_fov_mm <= 0 or recon_n <= 0 or current_fov_mm <= 0:
        return current_n
    return max(round(float(current_fov_mm) * recon_n / float(recon_fov_mm)), 1)


def _checkerboards(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``prod_axes (-1)^n`` over a grid of even sizes (float32), and the same times
    ``prod_axes (-1)^(N/2)``, the shift theorem's constant, applied once. A size of 1 stands
    for an axis that is not transformed (broadcast)."""
    sign = np.ones((), np.float32)
    for n in shape:
        ramp = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
        sign = sign[..., np.newaxis] * ramp
    constant = np.float32((-1.0) ** sum(n // 2 for n in shape))
    return sign, sign * constant


_CHECKERBOARDS: dict[tuple[str, tuple[int, ...]], tuple] = {}


def _board_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Sizes from the first transformed axis to the last axis, 1 where an axis is not transformed."""
    axes = tuple(sorted(a % len(shape) for a in axes))
    return tuple(shape[a] if a in axes else 1 for a in range(axes[0], len(shape)))


def _centred(k: np.ndarray, axes: tuple[int, ...], workers: int, inverse: bool) -> np.ndarray:
    xp = get_array_module(k)
    fft = fft_module(xp)
    kw = {"workers": workers} if xp is np else {}
    transform = fft.ifftn if inverse else fft.fftn
    if any(k.shape[a] % 2 for a in axes):
        img = fft.ifftshift(k, axes=axes)
        img = transform(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
        return fft.fftshift(img, axes=axes)
    key = (xp.__name__, _board_shape(k.shape, axes))
    boards = _CHECKERBOARDS.get(key)
    if boards is None:
        boards = _CHECKERBOARDS.setdefault(key, tuple(xp.asarray(b) for b in _checkerboards(key[1])))
    before, after = boards
    img = k * before
    img = transform(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
    img *= after
    return img


def centred_ifft(k: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """``fftshift(ifftn(ifftshift(k)), norm="ortho")`` over ``axes``, complex64 in, complex64 out.

    For even sizes the two shifts equal a multiplication by ``(-1)^(n + N/2)`` before and
    after the transform (the shift theorem), which is done in place: 5.5 ms instead of
    11.4 ms for 32 x 256 x 256 here. Odd sizes use the shifts. ``k`` is not modified.
    ``workers``: scipy.fft threads (NumPy input only).
    """
    return _centred(k, axes, workers, inverse=True)


def centred_fft(x: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """``fftshift(fftn(ifftshift(x)), norm="ortho")`` over ``axes`` (image -> k-space), the
    inverse of :func:`centred_ifft`; same dtype rules and shift-theorem path."""
    return _centred(x, axes, workers, inverse=False)


#: complex64 bytes per chunk of coils in :func:`rss_ifft`: 1 MiB, the L2 cache of one core here.
_RSS_CHUNK_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers(workers: int) -> int:
    """Helper threads besides the caller for ``workers`` (-1: one per CPU)."""
    cpus = os.cpu_count() or 1
    n = cpus if workers < 0 else workers
    return max(0, min(n, cpus) - 1)


def _helper_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="inline-fft")
        return _pool


def rss_ifft(k: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """Root-sum-of-squares over coils of the centred inverse FFT: ``(coils, ...)`` complex64 ->
    ``(1, ...)`` float32, equal to ``rss(centred_ifft(k, axes))``.

    Fused for speed: the magnitude of a centred transform is the plain transform's
    magnitude circularly shifted by ``n // 2`` along each transformed axis (the input
    ``ifftshift`` only multiplies the output by a unit-modulus phase ramp), so no shift or
    checkerboard pass touches the coil images; the shift is applied to the one combined
    image. Coils go in chunks of about 1 MiB, each transformed and squared while it is in
    cache (32 x 256 x 256 hybrid, ky transform only: 4.8 ms in one thread against 6.5 ms for
    :func:`centred_ifft` + 1.3 ms for the separate RSS, measured here). With NumPy input and
    ``workers`` != 1, up to ``workers - 1`` (-1: CPUs - 1) threads of a process-wide pool take
    chunks too (2.7 ms on 2 idle cores); the caller never waits for a helper that has not
    started (it is cancelled), so a busy pool or core only costs the parallel speed-up.
    ``axes`` must not include 0 (coils).
    """
    xp = get_array_module(k)
    fft = fft_module(xp)
    if 0 in (a % k.ndim for a in axes):
        raise ValueError("rss_ifft: axis 0 is the coil axis and cannot be transformed")
    coils = k.shape[0]
    per_coil = max(int(np.prod(k.shape[1:])) * 8, 1)
    step = max(1, min(coils, _RSS_CHUNK_BYTES // per_coil))
    starts = list(range(0, coils, step))
    kw = {"workers": 1} if xp is np else {}
    lock = threading.Lock()

    def work() -> np.ndarray | None:
        acc = None
        while True:
            with lock:
                if not starts:
                    return acc
                c0 = starts.pop()
            x = fft.ifftn(k[c0 : c0 + step], axes=axes, norm="ortho", **kw)
            v = x.view(np.float32)  # (chunk, ..., 2 * nx): re, im interleaved
            sq = xp.einsum("c...,c...->...", v, v)
            if acc is None:
                acc = sq
            else:
                acc += sq

    helpers = _helpers(workers) if xp is np else 0
    futures = [_helper_pool().submit(work) for _ in range(min(helpers, len(starts) - 1))]
    total = work()
    for f in futures:
        if f.cancel():
            continue
        part = f.result()
        if part is not None:
            total = part if total is None else xp.add(total, part, out=total)
    sq = total[..., 0::2] + total[..., 1::2]
    xp.sqrt(sq, out=sq)
    shifts = tuple(k.shape[a] // 2 for a in axes)
    return xp.roll(sq, shifts, axis=tuple(a % k.ndim - 1 for a in axes))[np.newaxis]


@register
class FFTRecon(PureGadget):
    """Centred inverse FFT of a k-space buffer to coil images on the recon matrix and FOV.

    Input ``ReconBuffer.data`` ``(coils, kz, ky, kx)`` complex64, in k-space or hybrid
    space (``domain`` :data:`~inline.buffers.HYBRID`: ``(coils, kz, ky, x)``, the readout
    already transformed); output ``ImageBuffer.data`` ``(coils, z, y, x)`` complex64 with
    ``(x, y, z)`` = the header's recon matrix (``z`` = 1 for 2D encodings) and
    ``field_of_view_mm`` = the recon FOV; with ``coil_combine: rss``, ``(1, z, y, x)`` float32,
    the root-sum-of-squares over coils (:func:`rss_ifft`, history ``FFT``, ``RSS``: the same
    image :class:`~gadgets.coil_combine.CoilCombine` ``rss`` makes from the coil images).

    Steps:

    1. readout placement: a readout whose ``header.center_sample`` is not ``kx // 2``
       (asymmetric echo) is zero-padded to the symmetric length around that centre;
    2. FOV adjustment, per axis (x over ``readout_fov_mm``, y and, for 3D, z over the
       encoded FOV): k-space is centred-cropped or zero-padded to
       :func:`kspace_grid` samples so the pixel size equals the recon one; image values
       are kept (scaled by ``sqrt(new / old)`` per resized axis, band-limited
       interpolation), where Gadgetron scales only its zero-padding branch;
    3. ``fftshift(ifftn(ifftshift(k), norm="ortho"))`` over (ky, kx) or (kz, ky, kx) with
       ``scipy.fft`` (``fft_workers`` threads; complex64 stays complex64), see
       :func:`centred_ifft`; over ky (and kz) only for a hybrid buffer. A hybrid buffer
       whose readout needs step 1 or an x resize in step 2 is first taken back to k-space
       along x (:func:`centred_fft`), so the result does not depend on the domain;
    4. centred crop / zero-pad in the image domain to the recon matrix.

    The orthonormal transform keeps whitened noise at its per-sample variance and equals
    BART's ``fft -u -i`` (for even sizes).

    Raises:
        ValueError: ``data`` is not 4-D ``(coils, kz, ky, kx)``.
    """

    class Params(GadgetParams):
        fft_workers: int = Field(-1, description="Threads for scipy.fft and the fused RSS (-1: all CPUs; not 0).")
        coil_combine: Literal["none", "rss"] = Field(
            "none",
            description="none: coil images; rss: root-sum-of-squares fused into the transform (one pass, "
            "float32 magnitude, as CoilCombine rss; leave CoilCombine walsh chains at none).",
        )

        @field_validator("fft_workers")
        @classmethod
        def _not_zero(cls, v: int) -> int:
            if v == 0:
                raise ValueError("fft_workers must be >= 1 or negative (-1: all CPUs)")
            return v

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    accepts_hybrid: ClassVar[bool] = True

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._warm_up()

    def _warm_up(self) -> None:
        """Transform zeros of the header's shapes once, at session start.

        The first transform of a shape pays for FFT plans, worker threads and fresh pages
        (measured 40-70 ms instead of 12 ms for 32 x 256 x 256); the first slice should not.
        Both readout lengths (with and without oversampling removal) and both the full and
        the hybrid (ky/kz only) transform are warmed.
        """
        try:
            enc = EncodingInfo.from_header(self.header)
            coils = int(self.header.acquisitionSystemInformation.receiverChannels or 1)
        except (AttributeError, TypeError, ValueError):
            return
        ex, ey, ez = enc.encoded_matrix
        rx, ry, rz = enc.recon_matrix
        fx, fy, fz = enc.recon_fov_mm
        if min(ex, ey) <= 0 or coils * ex * ey * max(ez, 1) > 2**26:
            return
        ny = kspace_grid(enc.encoded_fov_mm[1], ey, fy, ry)
        nz = kspace_grid(enc.encoded_fov_mm[2], ez, fz, rz) if ez > 1 else 1
        workers = self.params.fft_workers
        for n_read, fov_read in {(ex, enc.encoded_fov_mm[0]), (ex // 2, enc.encoded_fov_mm[0] / 2)}:
            nx = kspace_grid(fov_read, n_read, fx, rx)
            k = np.zeros((coils, nz, ny, nx), np.complex64)
            for axes in ((1, 2, 3), (1, 2)) if nz > 1 else ((2, 3), (2,)):
                if self.params.coil_combine == "rss":
                    rss_ifft(k, axes, workers)
                else:
                    scipy.fft.ifftn(k, axes=axes, norm="ortho", workers=workers)

    def apply(self, item: ReconBuffer) -> ImageBuffer:
        k = item.data
        if k.ndim != 4:
            raise ValueError(f"FFTRecon: buffer data must be (coils, kz, ky, kx), got shape {k.shape}")
        enc = item.encoding
        _, nz, ny, nx = k.shape
        three_d = nz > 1
        center = getattr(item.header, "center_sample", 0) if item.header is not None else 0
        nx_full, x_offset = readout_placement(nx, center)

        rx, ry, rz = enc.recon_matrix
        fx, fy, fz = enc.recon_fov_mm
        target = [
            kspace_grid(enc.encoded_fov_mm[2], nz, fz, rz) if three_d else 1,
            kspace_grid(enc.encoded_fov_mm[1], ny, fy, ry),
            kspace_grid(item.readout_fov_mm, nx_full, fx, rx),
        ]
        gain = float(np.sqrt(np.prod(target) / (nz * ny * nx_full)))
        workers = self.params.fft_workers

        hybrid = item.domain == HYBRID
        if hybrid and (nx_full != nx or target[2] != nx):  # the readout needs k-space work: go back
            k = centred_fft(k, (3,), workers)
            hybrid = False
        if nx_full != nx:  # asymmetric echo: zero-fill the missing side
            full = get_array_module(k).zeros(k.shape[:3] + (nx_full,), np.complex64)
            full[..., x_offset : x_offset + nx] = k
            k = full
        if hybrid:
            k = centred_resize(k, target[:2], (1, 2))
            axes = (1, 2) if three_d else (2,)
        else:
            k = centred_resize(k, target, (1, 2, 3))
            axes = (1, 2, 3) if three_d else (2, 3)
        if self.params.coil_combine == "rss" and k.shape[0] > 1:
            img = rss_ifft(k, axes, workers)
            steps = ["FFT", "RSS"]
        else:
            img = centred_ifft(k, axes, workers)
            steps = ["FFT"]
        if gain != 1.0:
            img *= np.float32(gain)
        out_shape = (
            rz if three_d and rz > 0 else img.shape[1],
            ry if ry > 0 else img.shape[2],
            rx if rx > 0 else img.shape[3],
        )
        img = centred_resize(img, out_shape, (1, 2, 3))
        return ImageBuffer(
            data=img if img.dtype == np.float32 else img.astype(np.complex64, copy=False),
            index=item.index,
            header=item.header,
            field_of_view_mm=(
                float(fx or item.readout_fov_mm),
                float(fy or enc.encoded_fov_mm[1]),
                float(fz or enc.encoded_fov_mm[2]),
            ),
            history=[*item.history, *steps],
            meta=dict(item.meta),
        )
