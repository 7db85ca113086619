"""Coil sensitivity maps from calibration (ACS) k-space: ESPIRiT and a low-resolution ACS estimate.

Sources: M. Uecker, P. Lai, M. J. Murphy, P. Virtue, M. Elad, J. M. Pauly, S. S. Vasanawala,
M. Lustig, "ESPIRiT -- an eigenvalue approach to autocalibrating parallel MRI: where SENSE
meets GRAPPA", Magn Reson Med 2014;71:990-1001 (calibration matrix, its SVD, the per-pixel
eigen-decomposition of the kernel-space projection, eigenvalue crop); BART ``ecalib``
(phase rotated to the first principal component, crop 0.8); sigpy ``mri.app.EspiritCalib``
(normalisation of the per-pixel matrix so the signal eigenvalue is ~1). The ACS option is the
classic low-resolution SENSE estimate: a windowed, zero-padded ACS image of each coil divided
by the root-sum-of-squares (Pruessmann et al., MRM 1999;42:952).

Why not ``sigpy.mri.app.EspiritCalib``: it forms one coil x coil outer product per kernel
and pixel on the full grid (``kernels x pixels x coils**2``), then 100 power iterations per
pixel; for 32 coils on 256 x 256 that is ~10**10 complex multiply-adds per slice, tens of
seconds here (``bench/accel_sense.py`` measures it). The per-pixel matrix
``G(r) = sum_k a_k(r) a_k(r)^H`` is a trigonometric polynomial whose coefficients (the
kernels' cross-correlations) span only ``(2 w - 1)**2`` k-space samples for a kernel of
width ``w``; we compute those coefficients once (``coils**2 x (2w-1)**2``), evaluate G exactly
on a coarse grid by one small FFT, take the dominant eigenvector per coarse pixel, and
interpolate the (smooth) maps and eigenvalues to the full grid with periodic cubic
interpolation. The image-domain result matches the full-grid computation closely
(``tests/gadgets/test_sense.py`` compares with sigpy's) at a few percent of the cost.

Axes (:mod:`inline.buffers`): calibration k-space ``(coils, kz, ky, kx)``, maps
``(coils, z, y, x)`` complex64. ESPIRiT here is 2D (``kz == 1``); 3D buffers use ``acs``.
All functions take NumPy or CuPy arrays and return the same kind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from inline.backend import fft_module, get_array_module

try:  # installed with nilearn (scikit-learn); optional
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

#: Squarings of the per-pixel matrix before the power iterations (G -> G**16).
_SQUARINGS = 4
#: Power iterations with G after the squarings.
_POWER_ITERATIONS = 3


def _single_blas():
    """One BLAS thread: our matrices are small (<= coils**2), and OpenBLAS threads spin on a
    busy host (measured: eigh of 2304 32x32 matrices 1.9-3.4 s with 2 threads, 0.37 s with 1)."""
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def dominant_eigenvectors(g: Any) -> tuple[Any, Any]:
    """Dominant eigenvalue and unit eigenvector of each Hermitian PSD matrix in ``g`` ``(..., c, c)``.

    Repeated squaring (``G**16``, rescaled each time) then a few power iterations from its
    strongest column: about 4x faster than ``eigh`` of the whole stack here, and exact to
    float32 precision where the dominant eigenvalue is separated (inside the object; where
    it is not, the ESPIRiT crop removes the pixel).
    """
    xp = get_array_module(g)
    h = g
    for _ in range(_SQUARINGS):
        h = h @ h
        h /= xp.maximum(xp.max(xp.abs(h), axis=(-2, -1), keepdims=True), np.float32(1e-30))
    diag = xp.real(xp.diagonal(h, axis1=-2, axis2=-1))  # (..., c)
    col = xp.argmax(diag, axis=-1)
    v = xp.take_along_axis(h, col[..., None, None], axis=-1)  # (..., c, 1)
    for _ in range(_POWER_ITERATIONS):
        v = v / xp.maximum(xp.linalg.norm(v, axis=-2, keepdims=True), np.float32(1e-30))
        v = g @ v
    v = v / xp.maximum(xp.linalg.norm(v, axis=-2, keepdims=True), np.float32(1e-30))
    lam = xp.real(xp.sum(xp.conj(v) * (g @ v), axis=(-2, -1)))
    return lam.astype(np.float32), v[..., 0]


class CalibrationError(ValueError):
    """No usable calibration region: too few contiguous fully sampled lines around the centre."""


@dataclass
class CoilMaps:
    """Coil sensitivities of one slice position.

    Attributes:
        maps: ``(coils, z, y, x)`` complex64 on the grid of the buffer's ``data``; unit
            root-sum-of-squares where the eigenvalue passes the crop (ESPIRiT), 0 outside.
        eigenvalues: ``(z, y, x)`` float32 ESPIRiT eigenvalue (ACS: normalised RSS), or None.
        method: ``"espirit"`` or ``"acs"``.
        calibration: ``(coils, kz, cy, cx)`` calibration block the maps came from (kept to
            detect a changed calibration).
    """

    maps: Any
    eigenvalues: Any
    method: str
    calibration: Any


def _centred_run(sampled_1d: np.ndarray, centre: int) -> tuple[int, int]:
    """``[start, stop)`` of the contiguous True run containing ``centre`` (empty if it is False)."""
    if not sampled_1d[centre]:
        return centre, centre
    lo = centre
    while lo > 0 and sampled_1d[lo - 1]:
        lo -= 1
    hi = centre + 1
    while hi < sampled_1d.size and sampled_1d[hi]:
        hi += 1
    return lo, hi


def calibration_region(
    kspace: Any, sampled: np.ndarray, calib_width: int, kx_centre: int | None = None, min_lines: int = 4
) -> Any:
    """The fully sampled block around the k-space centre, at most ``calib_width`` wide per axis.

    Args:
        kspace: ``(coils, kz, ky, kx)`` complex64 (``reference`` or ``data`` of a ReconBuffer).
        sampled: ``(kz, ky)`` bool, True where a line was acquired.
        calib_width: largest extent of the block along ky and kx (and kz in 3D) [samples].
        kx_centre: readout sample of k-space centre (``header.center_sample``); ``kx // 2`` if None.
        min_lines: fewest contiguous ky lines accepted.

    Returns:
        ``(coils, kz_c, ky_c, kx_c)`` copy of the block.

    Raises:
        CalibrationError: fewer than ``min_lines`` contiguous sampled lines around ky centre.
    """
    _, nz, ny, nx = kspace.shape
    sampled = np.asarray(sampled, bool)
    cz, cy = nz // 2, ny // 2
    # ky run through the centre, then the kz run of fully sampled planes
    ky_lo, ky_hi = _centred_run(sampled[cz], cy)
    if ky_hi - ky_lo < min_lines:
        raise CalibrationError(
            f"calibration: {ky_hi - ky_lo} contiguous sampled ky lines around the centre line {cy}; "
            f"at least {min_lines} are needed"
        )
    half = calib_width // 2
    ky_lo, ky_hi = max(ky_lo, cy - half), min(ky_hi, cy - half + calib_width)
    kz_lo, kz_hi = 0, 1
    if nz > 1:
        kz_lo, kz_hi = _centred_run(np.all(sampled[:, ky_lo:ky_hi], axis=1), cz)
        kz_lo, kz_hi = max(kz_lo, cz - half), min(kz_hi, cz - half + calib_width)
    cx = nx // 2 if kx_centre is None else int(kx_centre)
    kx_lo, kx_hi = max(cx - half, 0), min(cx - half + calib_width, nx)
    return kspace[:, kz_lo:kz_hi, ky_lo:ky_hi, kx_lo:kx_hi].copy()


def _keys_weights(n_fine: int, n_coarse: int) -> np.ndarray:
    """``(n_fine, n_coarse)`` periodic cubic-convolution (Keys, a = -0.5) interpolation matrix.

    Coarse sample ``j`` of a centred grid sits at fine position ``(j - n_coarse // 2) * n_fine /
    n_coarse + n_fine // 2``; the fine grid is the centred FFT grid of the buffer.
    """
    if n_fine == n_coarse:
        return np.eye(n_fine, dtype=np.float32)
    t = (np.arange(n_fine) - n_fine // 2) * (n_coarse / n_fine) + n_coarse // 2
    base = np.floor(t).astype(int)
    w = np.zeros((n_fine, n_coarse), np.float64)
    for offset in (-1, 0, 1, 2):
        d = np.abs(t - (base + offset))
        k = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1, np.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0.0))
        np.add.at(w, (np.arange(n_fine), (base + offset) % n_coarse), k)
    return w.astype(np.float32)


def _kernel_correlation(vh: Any, coils: int, w: int) -> Any:
    """Kernel cross-correlations ``P[c, c', dy, dx] = sum_k sum_r K_kc(r + d) conj(K_kc'(r))``.

    ``vh``: ``(kernels, coils * w * w)`` rows of the calibration matrix's right singular
    vectors (the kernels). Returns ``(coils, coils, 2w - 1, 2w - 1)``, ``d`` at index ``w - 1``.
    """
    xp = get_array_module(vh)
    m = (vh.T @ xp.conj(vh)).reshape(coils, w, w, coils, w, w)
    p = xp.zeros((coils, coils, 2 * w - 1, 2 * w - 1), vh.dtype)
    for ry in range(w):
        for sy in range(w):
            block = m[:, ry, :, :, sy, :]  # (c, rx, c', sx)
            for rx in range(w):
                p[:, :, ry - sy + w - 1, rx - np.arange(w) + w - 1] += block[:, rx, :, :]
    return p


def espirit_maps(
    calib: Any,
    image_shape: tuple[int, int],
    kernel_width: int = 6,
    threshold: float = 0.02,
    crop: float = 0.8,
    grid: int = 64,
) -> tuple[Any, Any]:
    """ESPIRiT maps (first set, ``m = 1``) of a 2D calibration block.

    Args:
        calib: ``(coils, cy, cx)`` complex fully sampled calibration k-space.
        image_shape: ``(ny, nx)`` of the image grid the maps are for.
        kernel_width: ESPIRiT kernel size ``w`` (``w x w``) [samples].
        threshold: singular values of the calibration matrix above ``threshold * max`` span
            the kernel (signal) space.
        crop: maps are zeroed where the eigenvalue is below ``crop``.
        grid: side of the coarse grid the per-pixel eigenproblem is solved on (capped at the
            image size); maps are interpolated from it.

    Returns:
        ``maps`` ``(coils, ny, nx)`` complex64 (unit norm per pixel inside the crop) and
        ``eigenvalues`` ``(ny, nx)`` float32.
    """
    coils, cy, cx = calib.shape
    ny, nx = image_shape
    w = int(kernel_width)
    if cy < w or cx < w:
        raise CalibrationError(f"ESPIRiT: calibration block {cy} x {cx} is smaller than the {w} x {w} kernel")
    with _single_blas():
        return _espirit_maps(calib.astype(np.complex64, copy=False), ny, nx, w, threshold, crop, grid)


def _espirit_maps(calib: Any, ny: int, nx: int, w: int, threshold: float, crop: float, grid: int) -> tuple[Any, Any]:
    xp = get_array_module(calib)
    fft = fft_module(xp)
    coils = calib.shape[0]
    # calibration (Hankel) matrix: one row per w x w patch, columns (coil, ky, kx)
    win = xp.lib.stride_tricks.sliding_window_view(calib, (w, w), axis=(1, 2))  # (c, py, px, w, w)
    a = win.transpose(1, 2, 0, 3, 4).reshape(-1, coils * w * w)
    _, s, vh = xp.linalg.svd(a, full_matrices=False)
    vh = vh[s > threshold * s[0]]
    p = _kernel_correlation(vh, coils, w)

    gy, gx = min(grid, ny), min(grid, nx)
    if gy < 2 * w - 1 or gx < 2 * w - 1:  # G has (2w-1)^2 coefficients: sample at least that finely
        gy, gx = min(ny, max(gy, 2 * w - 1)), min(nx, max(gx, 2 * w - 1))
    pg = xp.zeros((coils, coils, gy, gx), np.complex64)
    oy, ox = gy // 2 - (w - 1), gx // 2 - (w - 1)
    for dy in range(2 * w - 1):  # wrap coefficients that do not fit a small grid
        for dx in range(2 * w - 1):
            pg[:, :, (oy + dy) % gy, (ox + dx) % gx] += p[:, :, dy, dx]
    # G(r) = (1 / w^2) sum_d P(d) exp(2 pi i d r / N): unnormalised centred inverse DFT
    g = fft.fftshift(fft.ifft2(fft.ifftshift(pg, axes=(-2, -1)), norm="forward"), axes=(-2, -1))
    g = g.transpose(2, 3, 0, 1) / np.float32(w * w)  # (gy, gx, c, c) Hermitian
    g = 0.5 * (g + xp.conj(g.swapaxes(-1, -2)))
    lam, v = dominant_eigenvectors(xp.ascontiguousarray(g))  # (gy, gx), (gy, gx, c)
    # phase relative to the first principal component over the image (BART ecalib), so the
    # maps vary smoothly and can be interpolated
    flat = v.reshape(-1, coils)
    _, _, pc = xp.linalg.svd(flat * lam.reshape(-1, 1), full_matrices=False)
    ref = flat @ xp.conj(pc[0])
    ref = ref / xp.maximum(xp.abs(ref), np.float32(1e-12))
    v = (flat * xp.conj(ref)[:, None]).reshape(gy, gx, coils).transpose(2, 0, 1)

    wy, wx = xp.asarray(_keys_weights(ny, gy)), xp.asarray(_keys_weights(nx, gx))
    maps = (wy @ v @ wx.T).astype(np.complex64)  # (c, ny, nx)
    lam_full = (wy @ lam @ wx.T).astype(np.float32)
    norm = xp.sqrt(xp.sum(xp.abs(maps) ** 2, axis=0))
    keep = lam_full >= crop
    maps *= (keep / xp.maximum(norm, np.float32(1e-12))).astype(np.float32)
    return maps, lam_full


def acs_maps(calib: Any, image_shape: tuple[int, int] | tuple[int, int, int], floor: float = 0.05) -> tuple[Any, Any]:
    """Low-resolution SENSE maps: Hann-windowed ACS image per coil divided by its RSS.

    Args:
        calib: ``(coils, kz_c, ky_c, kx_c)`` calibration k-space.
        image_shape: ``(nz, ny, nx)`` of the image grid.
        floor: maps are zeroed where the RSS is below ``floor * max`` (background).

    Returns:
        ``maps`` ``(coils, nz, ny, nx)`` complex64 and ``rss / max`` ``(nz, ny, nx)`` float32.
    """
    xp = get_array_module(calib)
    fft = fft_module(xp)
    coils = calib.shape[0]
    block = calib.astype(np.complex64, copy=True)
    for axis in (1, 2, 3):
        n = block.shape[axis]
        if n > 1:
            shape = [1, 1, 1, 1]
            shape[axis] = n
            block *= xp.asarray(np.hanning(n + 2)[1:-1].astype(np.float32)).reshape(shape)
    full = xp.zeros((coils, *image_shape), np.complex64)
    starts = [image_shape[i] // 2 - block.shape[i + 1] // 2 for i in range(3)]
    full[:, starts[0] : starts[0] + block.shape[1], starts[1] : starts[1] + block.shape[2], starts[2] : starts[2] + block.shape[3]] = block
    axes = tuple(a for a in (1, 2, 3) if full.shape[a] > 1)
    img = fft.fftshift(fft.ifftn(fft.ifftshift(full, axes=axes), axes=axes), axes=axes)
    rss = xp.sqrt(xp.sum(xp.abs(img) ** 2, axis=0))
    peak = float(rss.max()) or 1.0
    keep = rss >= floor * peak
    maps = (img * (keep / xp.maximum(rss, np.float32(1e-30)))).astype(np.complex64)
    return maps, (rss / peak).astype(np.float32)
