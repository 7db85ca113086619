"""Cartesian FFT reconstruction with field-of-view adjustment to the recon matrix.

Sources: Gadgetron ``gadgets/mri_core/FFTGadget`` / ``GenericReconCartesianFFTGadget``
(centred orthonormal inverse FFT of the buffer) and
``GenericReconFieldOfViewAdjustmentGadget`` (reach the recon pixel size by k-space
zero-padding or cropping, then cut the image to the recon matrix), done here in k-space
before the single inverse FFT, which gives the same result with one transform.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.fft
from pydantic import Field, field_validator

from gadgets._common import centred_resize, readout_placement
from inline.backend import fft_module, get_array_module
from inline.buffers import EncodingInfo, ImageBuffer, ReconBuffer
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
    ``prod_axes (-1)^(N/2)``, the shift theorem's constant, applied once."""
    sign = np.ones((), np.float32)
    for n in shape:
        ramp = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
        sign = sign[..., np.newaxis] * ramp
    constant = np.float32((-1.0) ** sum(n // 2 for n in shape))
    return sign, sign * constant


_CHECKERBOARDS: dict[tuple[str, tuple[int, ...]], tuple] = {}


def centred_ifft(k: np.ndarray, axes: tuple[int, ...], workers: int = -1) -> np.ndarray:
    """``fftshift(ifftn(ifftshift(k)), norm="ortho")`` over ``axes`` (the last ones), complex64.

    For even sizes the two shifts equal a multiplication by ``(-1)^(n + N/2)`` before and
    after the transform (the shift theorem), which is done in place: 5.5 ms instead of
    11.4 ms for 32 x 256 x 256 here. Odd sizes use the shifts. ``k`` is not modified.
    """
    xp = get_array_module(k)
    fft = fft_module(xp)
    kw = {"workers": workers} if xp is np else {}
    shape = tuple(k.shape[a] for a in axes)
    if any(n % 2 for n in shape):
        img = fft.ifftshift(k, axes=axes)
        img = fft.ifftn(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
        return fft.fftshift(img, axes=axes)
    key = (xp.__name__, shape)
    boards = _CHECKERBOARDS.get(key)
    if boards is None:
        boards = _CHECKERBOARDS.setdefault(key, tuple(xp.asarray(b) for b in _checkerboards(shape)))
    before, after = boards
    img = k * before
    img = fft.ifftn(img, axes=axes, norm="ortho", overwrite_x=True, **kw)
    img *= after
    return img


@register
class FFTRecon(PureGadget):
    """Centred inverse FFT of a k-space buffer to coil images on the recon matrix and FOV.

    Input ``ReconBuffer.data`` ``(coils, kz, ky, kx)`` complex64; output
    ``ImageBuffer.data`` ``(coils, z, y, x)`` complex64 with ``(x, y, z)`` = the header's
    recon matrix (``z`` = 1 for 2D encodings) and ``field_of_view_mm`` = the recon FOV.

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
       :func:`centred_ifft`;
    4. centred crop / zero-pad in the image domain to the recon matrix.

    The orthonormal transform keeps whitened noise at its per-sample variance and equals
    BART's ``fft -u -i`` (for even sizes).

    Raises:
        ValueError: ``data`` is not 4-D ``(coils, kz, ky, kx)``.
    """

    class Params(GadgetParams):
        fft_workers: int = Field(-1, description="Threads for scipy.fft (-1: all CPUs; not 0).")

        @field_validator("fft_workers")
        @classmethod
        def _not_zero(cls, v: int) -> int:
            if v == 0:
                raise ValueError("fft_workers must be >= 1 or negative (-1: all CPUs)")
            return v

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._warm_up()

    def _warm_up(self) -> None:
        """Transform zeros of the header's shapes once, at session start.

        The first transform of a shape pays for FFT plans, worker threads and fresh pages
        (measured 40-70 ms instead of 12 ms for 32 x 256 x 256); the first slice should not.
        Both readout lengths (with and without oversampling removal) are warmed.
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
        for n_read, fov_read in {(ex, enc.encoded_fov_mm[0]), (ex // 2, enc.encoded_fov_mm[0] / 2)}:
            nx = kspace_grid(fov_read, n_read, fx, rx)
            k = np.zeros((coils, nz, ny, nx), np.complex64)
            axes = (1, 2, 3) if nz > 1 else (2, 3)
            scipy.fft.ifftn(k, axes=axes, norm="ortho", workers=self.params.fft_workers, overwrite_x=True)

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

        if nx_full != nx:  # asymmetric echo: zero-fill the missing side
            full = get_array_module(k).zeros(k.shape[:3] + (nx_full,), np.complex64)
            full[..., x_offset : x_offset + nx] = k
            k = full
        k = centred_resize(k, target, (1, 2, 3))
        axes = (1, 2, 3) if three_d else (2, 3)
        img = centred_ifft(k, axes, self.params.fft_workers)
        if gain != 1.0:
            img *= np.float32(gain)
        out_shape = (
            rz if three_d and rz > 0 else img.shape[1],
            ry if ry > 0 else img.shape[2],
            rx if rx > 0 else img.shape[3],
        )
        img = centred_resize(img, out_shape, (1, 2, 3))
        return ImageBuffer(
            data=img.astype(np.complex64, copy=False),
            index=item.index,
            header=item.header,
            field_of_view_mm=(
                float(fx or item.readout_fov_mm),
                float(fy or enc.encoded_fov_mm[1]),
                float(fz or enc.encoded_fov_mm[2]),
            ),
            history=[*item.history, "FFT"],
            meta=dict(item.meta),
        )
