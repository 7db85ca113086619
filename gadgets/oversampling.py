"""Readout oversampling removal.

Source: Gadgetron ``gadgets/mri_core/RemoveROOversamplingGadget`` (centred inverse FFT
along the readout, keep the central ``1/ratio`` of the image, FFT back; header sample
counts divided by the FOV ratio).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import readout_placement, with_data
from gadgets.fft_recon import centred_fft, centred_ifft
from inline.buffers import HYBRID, EncodingInfo
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
    acquisitions when the ratio is 1 (or below 1, which is logged once) and the output is k-space.

    ``output_domain: hybrid`` skips the FFT back: the readout leaves in image space along x
    (``(coils, m)`` complex64, centred, the same values :class:`~gadgets.fft_recon.FFTRecon`
    would compute from the k-space output), marked ``acq.domain = "hybrid"`` (see
    :mod:`inline.buffers`), also when the ratio is 1. The reconstruction after the last
    readout then only transforms ky (and kz): 32 x 256 x 256, 4 ms instead of 6-9 ms here.
    Only readouts whose k-space centre is the middle sample, with nothing to discard and not
    IS_REVERSE, are transformed (the rest stay k-space; the accumulator brings a buffer's
    lines to one domain). Every later stage that takes readouts or buffers must accept
    hybrid data (``accepts_hybrid``), else the chain config is refused.

    Raises:
        ValueError: the acquisition refers to an encoding space the header does not have.
    """

    class Params(GadgetParams):
        oversampling_factor: float | None = Field(
            None,
            ge=1,
            description="Readout oversampling ratio; None: encoded FOV x / recon FOV x from the header; 1 disables.",
        )
        output_domain: Literal["kspace", "hybrid"] = Field(
            "kspace",
            description="kspace: readouts leave in k-space; hybrid: in image space along x (no FFT back; FFTRecon "
            "then only transforms ky/kz). Every later gadget taking readouts or buffers must accept hybrid data.",
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)

    @classmethod
    def emits_hybrid(cls, params: "RemoveReadoutOversampling.Params") -> bool:
        """True when readouts leave in hybrid space (checked by :func:`inline.config.validate_chain`)."""
        return params.output_domain == HYBRID

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
        data = item.data
        n = data.shape[1]
        hybrid = (
            self.params.output_domain == HYBRID
            and item.discard_pre == 0
            and item.discard_post == 0
            and readout_placement(n, item.center_sample)[1] == 0
            and not item.is_flag_set(ismrmrd.ACQ_IS_REVERSE)
        )
        if r == 1.0 and not hybrid:
            return item
        m = round(n / r)
        img = centred_ifft(data, (1,), workers=1)
        if m != n:
            start = n // 2 - m // 2
            img = img[:, start : start + m]
        if hybrid:
            out = with_data(item, img, center_sample=m // 2 if item.center_sample > 0 else 0)
            out.domain = HYBRID
            return out
        ksp = centred_fft(np.ascontiguousarray(img), (1,), workers=1)
        c = item.center_sample
        center = round(m // 2 + (c - n // 2) / r) if c > 0 else 0
        return with_data(
            item,
            ksp,
            center_sample=min(max(center, 0), m - 1),
            discard_pre=math.ceil(item.discard_pre / r),
            discard_post=math.ceil(item.discard_post / r),
        )
