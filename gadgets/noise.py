"""Noise prewhitening from the scan's own noise measurement.

Source: Gadgetron ``gadgets/mri_core/NoiseAdjustGadget`` (covariance from
IS_NOISE_MEASUREMENT readouts, Cholesky whitening, dwell-time / receiver-bandwidth
scaling); same maths as BART's ``whiten`` (covariance normalised by ``N - 1``, inverse of
the lower Cholesky factor).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import with_data
from inline.gadget import AccumulatingGadget, GadgetParams, Output, Text, text_message
from inline.registry import register
from inline.trace import Trace

#: Gadgetron's relative receiver noise bandwidth when the header does not give one.
DEFAULT_RECEIVER_NOISE_BANDWIDTH = 0.793

#: Largest coils * coils * samples of one matrix product in :func:`apply_matrix`.
_GEMM_SIZE = 16384


def apply_matrix(w: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``w @ data`` for a ``(coils, coils)`` matrix and one ``(coils, samples)`` readout.

    Done in column blocks small enough that OpenBLAS runs each product on the calling
    thread: a readout-sized product split across BLAS threads waits a scheduler time slice
    (measured 8-16 ms instead of 0.03 ms) whenever the cores are busy, as in a threaded chain.
    """
    step = max(1, _GEMM_SIZE // (w.shape[0] * w.shape[1]))
    if step >= data.shape[1]:
        return w @ data
    out = np.empty((w.shape[0], data.shape[1]), np.result_type(w, data))
    for s in range(0, data.shape[1], step):
        np.matmul(w, data[:, s : s + step], out=out[:, s : s + step])
    return out


def bandwidth_scale(
    acquisition_dwell_time_us: float, noise_dwell_time_us: float, receiver_noise_bandwidth: float
) -> float:
    """Gadgetron's noise-bandwidth scale factor applied with the prewhitening matrix.

    ``sqrt(2 * acquisition_dwell_time_us / noise_dwell_time_us * receiver_noise_bandwidth)``;
    1.0 when either dwell time is 0 (unknown), as Gadgetron does.
    """
    if acquisition_dwell_time_us <= 0 or noise_dwell_time_us <= 0:
        return 1.0
    return float(np.sqrt(2.0 * acquisition_dwell_time_us / noise_dwell_time_us * receiver_noise_bandwidth))


@register
class NoiseAdjust(AccumulatingGadget):
    """Noise covariance from the noise scan, then prewhitening of every later acquisition.

    IS_NOISE_MEASUREMENT acquisitions are consumed (never forwarded). Their samples give
    the channel noise covariance ``C = sum(n n^H) / (N - 1)`` over all ``N`` noise samples
    (``noise_covariance``, ``(coils, coils)`` complex128, kept as an attribute for QC).
    From the first non-noise acquisition on, each ``(coils, samples)`` complex64 readout
    ``x`` is replaced by ``s * L^-1 x`` with ``C = L L^H`` (lower Cholesky factor) and
    ``s = bandwidth_scale(acq.sample_time_us, noise dwell [us], receiver_noise_bandwidth)``,
    so whitened noise has covariance ``s^2 I`` (Gadgetron's convention: 2 * 0.793 for equal
    dwell times). The output stays complex64; headers are unchanged.

    Without a noise scan the acquisitions pass through unchanged (logged once). Noise
    that arrives after imaging data has started is consumed and ignored (logged once).

    Raises:
        ValueError: an acquisition's channel count differs from the noise scan's.

    A noise covariance that is not positive definite (a dead element) does not stop the
    series: a ``WARNING`` text naming the channels goes to the scanner and the data pass
    unwhitened.
    """

    class Params(GadgetParams):
        perform_noise_adjust: bool = Field(
            True,
            description="Prewhiten acquisitions; when false noise scans are still consumed and data pass unchanged.",
        )
        receiver_noise_bandwidth: float | None = Field(
            None,
            gt=0,
            description="Relative receiver noise bandwidth; None: header acquisitionSystemInformation."
            "relativeReceiverNoiseBandwidth, else 0.793 (Gadgetron default).",
        )
        noise_dwell_time_us: float | None = Field(
            None, gt=0, description="Dwell time of the noise scan [us]; None: sample_time_us of the noise acquisitions."
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition, Text)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        bw = self.params.receiver_noise_bandwidth
        if bw is None:
            asi = getattr(self.header, "acquisitionSystemInformation", None)
            bw = getattr(asi, "relativeReceiverNoiseBandwidth", None) if asi is not None else None
        #: relative receiver noise bandwidth in use
        self.receiver_noise_bandwidth: float = float(bw) if bw else DEFAULT_RECEIVER_NOISE_BANDWIDTH
        #: noise covariance ``(coils, coils)`` complex128, None until computed
        self.noise_covariance: np.ndarray | None = None
        #: unscaled prewhitening matrix ``L^-1`` ``(coils, coils)`` complex128, or None
        self.prewhitening_matrix: np.ndarray | None = None
        #: dwell time of the noise scan in use [us] (0 when unknown)
        self.noise_dwell_time_us: float = 0.0
        #: number of noise samples (per channel) the covariance is made from
        self.number_of_noise_samples: int = 0
        self._sum: np.ndarray | None = None
        self._noise_trace: Trace | None = None
        self._frozen = False  # imaging data seen: covariance fixed
        self._scaled: dict[float, np.ndarray] = {}
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(msg, *args)

    def _add_noise(self, acq: ismrmrd.Acquisition, trace: Trace) -> None:
        if self._frozen:
            self._warn_once(
                "late", "NoiseAdjust: noise acquisition after imaging data ignored (scan_counter %d)", acq.scan_counter
            )
            return
        n = np.asarray(acq.data, dtype=np.complex128)
        if self._sum is None:
            self._sum = np.zeros((n.shape[0], n.shape[0]), np.complex128)
            self._noise_trace = trace
        elif self._sum.shape[0] != n.shape[0]:
            raise ValueError(
                f"NoiseAdjust: noise acquisition {acq.scan_counter} has {n.shape[0]} channels, earlier ones {self._sum.shape[0]}"
            )
        self._sum += n @ n.conj().T
        self.number_of_noise_samples += n.shape[1]
        if self.params.noise_dwell_time_us is not None:
            self.noise_dwell_time_us = self.params.noise_dwell_time_us
        elif not self.noise_dwell_time_us:
            self.noise_dwell_time_us = float(acq.sample_time_us)

    def _compute(self) -> Iterator[Output]:
        """Fix the covariance at the first imaging line; yields a warning Text when unusable."""
        self._frozen = True
        if self._sum is None or self.number_of_noise_samples < 2:
            return
        self.noise_covariance = self._sum / (self.number_of_noise_samples - 1)
        try:
            chol = np.linalg.cholesky(self.noise_covariance)
        except np.linalg.LinAlgError:
            # A dead element (zero noise) must not cost the patient the series: reconstruct
            # without prewhitening and tell the operator which channels are suspect.
            power = np.real(np.diag(self.noise_covariance))
            dead = np.flatnonzero(power <= 1e-6 * max(float(np.median(power)), np.finfo(float).tiny))
            msg = (
                f"NoiseAdjust: noise covariance of {self.noise_covariance.shape[0]} channels from "
                f"{self.number_of_noise_samples} samples is not positive definite "
                f"(channels without noise: {dead.tolist() or 'none found'}); images are not prewhitened"
            )
            self.log.warning(msg)
            yield text_message("WARNING", msg), self._noise_trace
            return
        self.prewhitening_matrix = np.linalg.inv(chol)
        # tells image-level QC whether image noise is white with the known scale
        self.context.shared["prewhitened"] = bool(self.params.perform_noise_adjust)

    def scaled_matrix(self, acquisition_dwell_time_us: float) -> np.ndarray:
        """Prewhitening matrix times :func:`bandwidth_scale` for this dwell time, complex64."""
        if self.prewhitening_matrix is None:
            raise RuntimeError("NoiseAdjust: no prewhitening matrix (no noise scan seen)")
        key = float(acquisition_dwell_time_us)
        if key not in self._scaled:
            s = bandwidth_scale(key, self.noise_dwell_time_us, self.receiver_noise_bandwidth)
            self.log.info(
                "NoiseAdjust: noise dwell %.4g us, acquisition dwell %.4g us, receiver bandwidth %.4g -> scale %.5g",
                self.noise_dwell_time_us,
                key,
                self.receiver_noise_bandwidth,
                s,
            )
            self._scaled[key] = (s * self.prewhitening_matrix).astype(np.complex64)
        return self._scaled[key]

    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            self._add_noise(item, trace)
            return
        if not self._frozen:
            yield from self._compute()
        if not self.params.perform_noise_adjust:
            yield item, trace
            return
        if self.prewhitening_matrix is None:
            self._warn_once("none", "NoiseAdjust: no noise scan before imaging data; acquisitions pass unwhitened")
            yield item, trace
            return
        nch = item.data.shape[0]
        if nch != self.prewhitening_matrix.shape[0]:
            raise ValueError(
                f"NoiseAdjust: acquisition {item.scan_counter} has {nch} channels, "
                f"noise scan {self.prewhitening_matrix.shape[0]}"
            )
        w = self.scaled_matrix(item.sample_time_us)
        yield with_data(item, apply_matrix(w, item.data)), trace

    def close(self) -> Iterator[Output]:
        if not self._frozen:  # a noise-only stream: still compute the covariance for QC
            yield from self._compute()
