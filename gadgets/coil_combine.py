"""Coil combination: root-sum-of-squares or Walsh adaptive combination.

Sources: Gadgetron ``gadgets/mri_core/CombineGadget`` (RSS); D. O. Walsh, A. F. Gmitro,
M. W. Marcellin, "Adaptive reconstruction of phased array MR imagery", Magn Reson Med
2000;43:682-690 (per-pixel dominant eigenvector of the locally smoothed coil correlation
matrix; noise assumed white, i.e. data prewhitened by :class:`~gadgets.noise.NoiseAdjust`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from inline.backend import get_array_module, ndimage_module
from inline.buffers import ImageBuffer
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register

#: Upper bound on the per-chunk correlation-matrix memory of the Walsh combination [bytes].
_WALSH_CHUNK_BYTES = 128 * 1024 * 1024
#: Power iterations for the dominant eigenvector of the Walsh correlation matrices.
_POWER_ITERATIONS = 4


def rss(images: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over axis 0: ``(coils, ...)`` complex -> ``(1, ...)`` float32.

    One pass over the data: the complex64 array is read as interleaved float32 (re, im)
    and reduced over coils with ``einsum``, then re and im squares are added with two strided
    views (0.6 ms for 32 x 256 x 256 instead of 4.7 ms with ``abs(x) ** 2``, which makes four
    temporaries, and 1.3 ms with a ``reshape(..., 2).sum(-1)``, a reduction over length-2 rows).
    """
    xp = get_array_module(images)
    x = xp.ascontiguousarray(images, dtype=np.complex64)
    v = x.view(np.float32)  # (coils, ..., 2 * nx)
    sq = xp.einsum("c...,c...->...", v, v)
    sq = sq[..., 0::2] + sq[..., 1::2]
    return xp.sqrt(sq, out=sq)[np.newaxis]


def walsh_weights(images: np.ndarray, kernel_size: int, iterations: int = _POWER_ITERATIONS) -> np.ndarray:
    """Walsh combination weights for ``(coils, y, x)`` complex images, same shape, complex64.

    Per pixel: ``R = box_k(x x^H)`` over a ``kernel_size``-square neighbourhood (reflecting
    edges); the weights are R's dominant unit eigenvector, phase-referenced to the coil with
    the most energy (``ref``) so the combined phase is smooth. The eigenvector comes from
    ``iterations`` power iterations started at R's ``ref`` column, which is already the
    answer for a rank-one R (one dominant source per neighbourhood), instead of a full
    eigendecomposition per pixel (about 20x slower at 32 coils). Rows are processed in chunks
    to bound the memory of the ``(coils, coils, rows, x)`` correlation stack.
    """
    xp = get_array_module(images)
    ndi = ndimage_module(xp)
    c, ny, nx = images.shape
    x = images.astype(np.complex64, copy=False)
    ref = int(xp.argmax(xp.sum(xp.abs(x) ** 2, axis=(1, 2))))
    half = kernel_size // 2
    rows = max(1, _WALSH_CHUNK_BYTES // (c * c * nx * 8) - 2 * half)
    out = xp.empty_like(x)
    iu, ju = np.triu_indices(c)
    for r0 in range(0, ny, rows):
        r1 = min(ny, r0 + rows)
        a0, a1 = max(0, r0 - half), min(ny, r1 + half)
        sub = x[:, a0:a1]
        corr = xp.empty((c, c, a1 - a0, nx), np.complex64)
        for i, j in zip(iu, ju):  # Hermitian: filter the upper triangle, mirror the rest
            corr[i, j] = ndi.uniform_filter(sub[i] * xp.conj(sub[j]), size=kernel_size, mode="reflect")
            corr[j, i] = xp.conj(corr[i, j])
        corr = corr[:, :, r0 - a0 : r1 - a0]
        v = corr[:, ref].copy()
        for _ in range(iterations):
            w = corr[:, 0] * v[0]
            for j in range(1, c):
                w += corr[:, j] * v[j]
            v = w / xp.maximum(xp.sqrt(xp.sum(xp.abs(w) ** 2, axis=0)), np.finfo(np.float32).tiny)
        phase = v[ref]
        mag = xp.abs(phase)
        unit = xp.where(mag > 0, phase / xp.where(mag > 0, mag, 1), 1)
        out[:, r0:r1] = v * xp.conj(unit)
    return out


@register
class CoilCombine(PureGadget):
    """Combine coil images ``(coils, z, y, x)`` complex64 into ``(1, z, y, x)``.

    ``method="rss"``: ``sqrt(sum_c |x_c|^2)``, float32 magnitude.
    ``method="walsh"``: ``sum_c conj(w_c) x_c`` with :func:`walsh_weights` computed per z
    plane, complex64 (object phase relative to the strongest coil). For a noiseless
    single source ``x_c = s * c_c`` both give ``|s| * ||c||``; with noise Walsh keeps the
    SNR-optimal weighting and avoids RSS's noise bias at low SNR.

    An input that already has one coil passes through unchanged (e.g. after
    :class:`~gadgets.fft_recon.FFTRecon` ``coil_combine: rss``, which fuses the RSS into the
    transform).

    Raises:
        ValueError: ``data`` is not 4-D ``(coils, z, y, x)``, or ``walsh`` is asked for an
            image that an earlier stage already combined by RSS (set that stage's
            ``coil_combine: none``).
    """

    class Params(GadgetParams):
        method: Literal["rss", "walsh"] = Field("rss", description="rss (root-sum-of-squares) or walsh (adaptive).")
        walsh_kernel_size: int = Field(
            7, ge=1, description="Side of the square smoothing window for the Walsh correlation matrices [pixels]."
        )

    accepts: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer,)

    def apply(self, item: ImageBuffer) -> ImageBuffer:
        x = item.data
        if x.ndim != 4:
            raise ValueError(f"CoilCombine: image data must be (coils, z, y, x), got shape {x.shape}")
        if x.shape[0] == 1:
            if self.params.method == "walsh" and "RSS" in item.history:
                raise ValueError(
                    "CoilCombine: method walsh, but the coils were already combined by RSS (history "
                    f"{item.history}); set FFTRecon coil_combine: none"
                )
            return item
        if self.params.method == "rss":
            out = rss(x)
            step = "RSS"
        else:
            xp = get_array_module(x)
            out = xp.empty((1,) + x.shape[1:], np.complex64)
            for z in range(x.shape[1]):
                w = walsh_weights(x[:, z], self.params.walsh_kernel_size)
                out[0, z] = xp.sum(xp.conj(w) * x[:, z], axis=0)
            step = "WALSH"
        return ImageBuffer(
            data=out,
            index=item.index,
            header=item.header,
            field_of_view_mm=item.field_of_view_mm,
            history=[*item.history, step],
            meta=dict(item.meta),
        )
