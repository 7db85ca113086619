"""EPI readout reversal and Nyquist (N/2) ghost correction from phase-correction navigators.

Sources: Gadgetron ``gadgets/epi/EPIReconXGadget`` (reversed readouts flipped before the
correction) and ``EPICorrGadget`` (NYU CBI, Velasco and Inati: three navigators before each
shot, the odd-even phase difference in hybrid x-ky space from ``conj(nav0 + nav2) * nav1``
summed over coils, its slope from the lag-one autocorrelation, its intercept after removing
the slope, half the correction to each readout polarity); T. Feiweier, "Magnetic resonance
method and apparatus to determine phase correction parameters", US patent 8,497,681 (2013)
(constant + linear odd-even phase by correlation of the navigators); H. Bruder et al., MRM
1992;23:311 (the N/2 ghost of an odd-even phase error). Written from these descriptions,
with Gadgetron's code as a reading reference.

Readout axis only: one acquisition is ``(coils, samples)`` complex64; "x" is the hybrid
(image-domain) readout coordinate of the centred orthonormal inverse FFT of a readout, in
pixels from ``n // 2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK, with_data
from inline.backend import fft_module, get_array_module
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.registry import register
from inline.trace import Trace

_REVERSE = 1 << (ismrmrd.ACQ_IS_REVERSE - 1)


def to_hybrid(lines: Any) -> Any:
    """Centred orthonormal inverse FFT along the last axis (readout k -> x)."""
    xp = get_array_module(lines)
    f = fft_module(xp)
    return f.fftshift(f.ifft(f.ifftshift(lines, axes=-1), axis=-1, norm="ortho"), axes=-1)


def to_kspace(lines: Any) -> Any:
    """Centred orthonormal FFT along the last axis (x -> readout k)."""
    xp = get_array_module(lines)
    f = fft_module(xp)
    return f.fftshift(f.fft(f.ifftshift(lines, axes=-1), axis=-1, norm="ortho"), axes=-1)


@dataclass(frozen=True)
class OddEvenPhase:
    """Phase of the positive-polarity echoes relative to the negative ones, ``a + b * (x - n // 2)``.

    Attributes:
        constant_rad: ``a`` [rad].
        slope_rad_per_pixel: ``b`` [rad / pixel of the hybrid readout].
        samples: readout length ``n`` it was estimated on.
    """

    constant_rad: float
    slope_rad_per_pixel: float
    samples: int

    def phase(self) -> np.ndarray:
        """``(samples,)`` float64 phase difference [rad]."""
        x = np.arange(self.samples) - self.samples // 2
        return self.constant_rad + self.slope_rad_per_pixel * x


def estimate_odd_even_phase(
    positive: Any, negative: Any, mode: Literal["linear", "mean"] = "linear", refine: bool = True
) -> OddEvenPhase:
    """Constant + linear phase difference between positive and negative readouts.

    Args:
        positive, negative: ``(navigators, coils, n)`` complex navigators of each polarity,
            already in acquisition order (reversed ones flipped), in k-space. Navigators of
            one polarity are averaged first, which for +/-/+ cancels a B0 drift linear in
            time (Gadgetron's ``nav0 + nav2``).
        mode: ``linear`` (constant + slope) or ``mean`` (constant only).
        refine: after the correlation estimate, a magnitude-weighted least-squares fit of
            the residual phase (unwrapped around the first estimate).

    The correlation ``c(x) = sum_coils P(x) conj(N(x))`` weights each coil and position by
    its signal. Slope: ``arg(sum_x conj(c(x)) c(x + 1))`` (lag-one autocorrelation; no phase
    unwrapping needed); constant: ``arg(sum_x c(x) exp(-i b x))``.
    """
    xp = get_array_module(positive)
    p = to_hybrid(xp.mean(xp.asarray(positive), axis=0))
    q = to_hybrid(xp.mean(xp.asarray(negative), axis=0))
    c = xp.sum(p * xp.conj(q), axis=0)  # (n,)
    n = int(c.shape[-1])
    x = xp.arange(n, dtype=np.float64) - n // 2
    b = float(xp.angle(xp.sum(xp.conj(c[:-1]) * c[1:]))) if mode == "linear" and n > 1 else 0.0
    a = float(xp.angle(xp.sum(c * xp.exp(-1j * b * x))))
    if refine:
        w = xp.abs(c)
        w = xp.where(w > 0.05 * float(w.max() or 1.0), w, 0.0)  # noise-only pixels out
        r = xp.angle(c * xp.exp(-1j * (a + b * x)))
        if mode == "linear":
            design = xp.stack([w, w * x], axis=1)
            sol = xp.linalg.lstsq(design, w * r, rcond=None)[0]
            a, b = a + float(sol[0]), b + float(sol[1])
        else:
            a += float(xp.sum(w * r) / (xp.sum(w) or 1.0))
    return OddEvenPhase(float(np.angle(np.exp(1j * a))), b, n)


@dataclass
class _SliceState:
    navigators: list[tuple[bool, np.ndarray]]
    correction: OddEvenPhase | None = None
    factors: dict[bool, np.ndarray] | None = None


@register
class EPICorrection(AccumulatingGadget):
    """Flip reversed EPI readouts and remove the odd-even (Nyquist N/2 ghost) phase error.

    Input: acquisitions (before the accumulator; after oversampling removal, which treats
    navigators and imaging lines alike). Output: the imaging acquisitions, every readout in
    positive sample order with IS_REVERSE cleared, so the accumulator must not flip again
    (``flip_reversed_lines: false``); noise and other non-imaging lines pass untouched.

    Navigators: phase-correction lines (IS_PHASECORR_DATA, typically 3 per shot with
    alternating polarity, +/-/+ or -/+/-, sent before the shot's echoes; IS_REVERSE marks
    the negative ones) are collected per (encoding space, slice) and consumed. When the
    first imaging line after a group of navigators arrives, the positive-minus-negative
    phase ``phi(x) = a + b x`` is estimated (:func:`estimate_odd_even_phase`) and every
    following readout of that slice is corrected in hybrid x-ky space, half to each
    polarity: positive lines ``* exp(-i phi / 2)``, negative ``* exp(+i phi / 2)``. The
    estimates are in :attr:`estimates` (last per slice). Lines before any navigator of their
    slice are only flipped (logged once).

    Ramp sampling: not regridded. Regridding needs the readout gradient shape
    (ISMRMRD ``trajectoryDescription`` ``ConventionalEPI`` ramp times, or per-sample
    trajectories); a header that has it gets a warning that it is ignored.
    (``twix_epi_2ch_phantom.h5`` has neither: Cartesian trajectory, no description.)
    """

    class Params(GadgetParams):
        phase_correction: Literal["linear", "mean", "none"] = Field(
            "linear", description="Odd-even phase model: linear (constant + slope in x), mean (constant), none."
        )
        refine: bool = Field(True, description="Magnitude-weighted least-squares refinement of the correlation estimate.")
        reverse_lines: bool = Field(True, description="Flip IS_REVERSE readouts into positive order (and clear the flag).")

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._slices: dict[tuple[int, int], _SliceState] = {}
        #: last odd-even phase estimate per (encoding space, slice)
        self.estimates: dict[tuple[int, int], OddEvenPhase] = {}
        self._warned_uncorrected = False
        self._check_ramp_sampling()

    def _check_ramp_sampling(self) -> None:
        try:
            enc = self.header.encoding[0]
        except (AttributeError, IndexError, TypeError):
            return
        desc = getattr(enc, "trajectoryDescription", None)
        if desc is not None and any(
            "ramp" in (p.name or "").lower() for p in (getattr(desc, "userParameterLong", None) or [])
            + (getattr(desc, "userParameterDouble", None) or [])
        ):
            self.log.warning("EPICorrection: the header describes ramp sampling; ramp-sampling regridding is not done")

    def _state(self, acq: ismrmrd.Acquisition) -> _SliceState:
        key = (acq.encoding_space_ref, acq.idx.slice)
        st = self._slices.get(key)
        if st is None:
            st = self._slices[key] = _SliceState(navigators=[])
        return st

    def _compute(self, key: tuple[int, int], st: _SliceState) -> None:
        navs, st.navigators = st.navigators, []
        if self.params.phase_correction == "none":
            return
        pos = [d for r, d in navs if not r]
        neg = [d for r, d in navs if r]
        shapes = {d.shape for _, d in navs}
        if not pos or not neg or len(shapes) != 1:
            self.log.warning(
                "EPICorrection: slice %s: %d positive / %d negative navigators of shapes %s; correction kept as before",
                key, len(pos), len(neg), sorted(shapes),
            )
            return
        est = estimate_odd_even_phase(np.stack(pos), np.stack(neg), self.params.phase_correction, self.params.refine)
        half = 0.5 * est.phase()
        st.correction = est
        st.factors = {False: np.exp(-1j * half).astype(np.complex64), True: np.exp(1j * half).astype(np.complex64)}
        self.estimates[key] = est
        self.log.debug("EPICorrection: slice %s: odd-even phase %.4f rad + %.5f rad/pixel", key, est.constant_rad,
                       est.slope_rad_per_pixel)

    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        flags = item.flags
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            yield item, trace
            return
        reversed_ = bool(flags & _REVERSE)
        if item.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA):
            data = item.data[:, ::-1] if reversed_ else item.data
            self._state(item).navigators.append((reversed_, np.array(data, dtype=np.complex64)))
            return
        if flags & NON_IMAGING_MASK:
            yield item, trace
            return
        st = self._state(item)
        if st.navigators:
            self._compute((item.encoding_space_ref, item.idx.slice), st)
        flip = reversed_ and self.params.reverse_lines
        if not flip and st.factors is None:
            yield item, trace
            return
        data = item.data[:, ::-1] if reversed_ else item.data
        if st.factors is not None:
            factor = st.factors[reversed_]
            if factor.shape[0] == data.shape[1]:
                data = to_kspace(to_hybrid(data) * factor)
            elif not self._warned_uncorrected:
                self._warned_uncorrected = True
                self.log.warning("EPICorrection: readout of %d samples, navigators of %d; line not phase-corrected",
                                 data.shape[1], factor.shape[0])
        elif not self._warned_uncorrected and self.params.phase_correction != "none":
            self._warned_uncorrected = True
            self.log.warning("EPICorrection: imaging lines before any navigator of their slice; flipped only")
        if reversed_ and not flip:  # corrected in positive order, sent back in acquisition order
            data = data[:, ::-1]
        out = with_data(item, np.asarray(data, dtype=np.complex64))
        if flip:
            out.clear_flag(ismrmrd.ACQ_IS_REVERSE)
        yield out, trace
