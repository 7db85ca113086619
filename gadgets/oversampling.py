"""Readout oversampling removal.

Source: Gadgetron ``gadgets/mri_core/RemoveROOversamplingGadget`` (centred inverse FFT
along the readout, keep the central ``1/ratio`` of the image, FFT back; header sample
counts divided by the FOV ratio).
"""

from __future__ import annotations

import math
from typing import ClassVar

import ismrmrd
import numpy as np
import scipy.fft
from pydantic import Field

from gadgets._common import centred_resize, with_data
from inline.buffers import EncodingInfo
from inline.gadget import GadgetParams, PureGadget
from inline.registry import register


@register
class RemoveReadoutOversampling(PureGadget):
    """Crop the readout field of view to the recon one in the image domain, per acquisition.

    The oversampling ratio is ``encoded FOV x / recon FOV x`` of the acquisition's encoding
    space (``encoding_space_ref``), e.g. 2 for Siemens data (encoded 2x the recon FOV).
    For a ratio > 1, each ``(coils, n)`` complex64 readout is inverse-FFT'd along the
    readout (centred, orthonormal), the central ``m = round(n / ratio)`` samples are kept and
    FFT'd back (orthonormal), as Gadgetron does; whitened noise keeps its per-sample
    variance. Header: ``number_of_samples = m``; ``center_sample`` moves to the sample
    nearest the k-space centre on the coarser grid (``m//2 + (c - n//2) / ratio``, i.e.
    ``c / ratio`` for ``m = n / ratio``); ``discard_pre``/``discard_post`` are divided by the
    ratio and rounded up, so nothing of a discarded region survives.

    Untouched: noise acquisitions, acquisitions with a trajectory (non-Cartesian), and all
    acquisitions when the ratio is 1 (or below 1, which is logged once).

    Raises:
        ValueError: the acquisition refers to an encoding space the header does not have.
    """

    class Params(GadgetParams):
        oversampling_factor: float | None = Field(
            None,
            ge=1,
            description="Readout oversampling ratio; None: encoded FOV x / recon FOV x from the header; 1 disables.",
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._ratios: dict[int, float] = {}

    def ratio(self, encoding_space: int = 0) -> float:
        """Oversampling ratio for an encoding space (1.0: nothing to remove)."""
        if encoding_space not in self._ratios:
            if self.params.oversampling_factor is not None:
                r = float(self.params.oversampling_factor)
            else:
                enc = EncodingInfo.from_header(self.header, encoding_space)
                r = enc.encoded_fov_mm[0] / enc.recon_fov_mm[0] if enc.recon_fov_mm[0] > 0 else 1.0
                if r < 1.0 - 1e-3:
                    self.log.warning(
                        "RemoveReadoutOversampling: recon FOV x > encoded FOV x (ratio %.3f); nothing removed", r
                    )
            self._ratios[encoding_space] = r if r > 1.0 + 1e-3 else 1.0
        return self._ratios[encoding_space]

    def apply(self, item: ismrmrd.Acquisition) -> ismrmrd.Acquisition:
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) or item.trajectory_dimensions > 0:
            return item
        r = self.ratio(item.encoding_space_ref)
        if r == 1.0:
            return item
        data = item.data
        n = data.shape[1]
        m = round(n / r)
        img = scipy.fft.fftshift(scipy.fft.ifft(scipy.fft.ifftshift(data, axes=-1), axis=-1, norm="ortho"), axes=-1)
        img = centred_resize(img, (m,), (-1,))
        ksp = scipy.fft.fftshift(scipy.fft.fft(scipy.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"), axes=-1)
        c = item.center_sample
        center = round(m // 2 + (c - n // 2) / r) if c > 0 else 0
        return with_data(
            item,
            ksp.astype(np.complex64, copy=False),
            center_sample=min(max(center, 0), m - 1),
            discard_pre=math.ceil(item.discard_pre / r),
            discard_post=math.ceil(item.discard_post / r),
        )
