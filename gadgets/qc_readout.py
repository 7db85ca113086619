"""Live quality control of raw readouts: RF spikes, coil health, coverage, motion.

A tap at the head of the chain (before :class:`~gadgets.noise.NoiseAdjust`, so it sees the
noise scan): every acquisition is yielded first, untouched, then checked; findings leave
as :class:`~inline.qc.alert.Alert` messages right behind it. Checks run per readout, so an
alert follows the readout that reveals the fault by well under a millisecond of compute.

Sources: spike detection after the herringbone/"spike" detectors of scanner QA (sample
far above its neighbours along kx *and* the same kx of a neighbouring line, which keeps
the echo peak out: it is present in neighbouring lines, a spike is not); coil noise from
the noise scan as in Gadgetron's ``NoiseAdjustGadget`` (covariance ``sum(n n^H)/(N-1)``);
k-space-centre self-navigation for motion (the "FID navigator"/"k-space centre" idea:
the central k-space of each coil is a coil-weighted projection of the object).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.motion.consistency import consistency_jump
from inline.qc.alert import Alert, AlertCode, AlertFactory, Severity, slice_label
from inline.registry import register
from inline.trace import Trace

_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
_NAV = 1 << (ismrmrd.ACQ_IS_NAVIGATION_DATA - 1)
_CAL = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)
_LAST_IN_SLICE = 1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1)
_REVERSE = 1 << (ismrmrd.ACQ_IS_REVERSE - 1)
#: Gadgetron's relative receiver noise bandwidth when the header does not give one.
_DEFAULT_RECEIVER_NOISE_BANDWIDTH = 0.793
#: E|z| / sqrt(E|z|^2) of a circular complex Gaussian sample (Rayleigh mean).
_RAYLEIGH_MEAN = float(np.sqrt(np.pi) / 2)

#: (slice, contrast, phase, repetition, set): the buffer a readout belongs to.
Key = tuple[int, int, int, int, int]


def _key(acq: ismrmrd.Acquisition) -> Key:
    i = acq.idx
    return (int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set))


def _median_last(x: np.ndarray) -> np.ndarray | float:
    """Median along the last axis (as ``np.median``), via one ``np.partition``: less call overhead per readout."""
    n = x.shape[-1]
    k = n // 2
    if n % 2:
        return np.partition(x, k, axis=-1)[..., k]
    part = np.partition(x, (k - 1, k), axis=-1)
    return 0.5 * (part[..., k - 1] + part[..., k])


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """``|<a, b>| / (|a| |b|)`` of two complex arrays: 1 for equal up to a global phase/scale."""
    na, nb = float(np.vdot(a, a).real), float(np.vdot(b, b).real)
    if na <= 0 or nb <= 0:
        return 1.0
    return float(abs(np.vdot(a, b)) / np.sqrt(na * nb))


def _robust_outliers(
    level: np.ndarray, floor: float, k: float, cap: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: its ``level`` over the median of the other channels, and the threshold for it.

    The threshold is ``exp(k * s)``, ``s`` the robust spread (1.4826 x median absolute
    deviation) of the other channels' log levels, clipped to ``[floor, cap]`` (leaving the
    channel itself out keeps a faulty channel from widening its own threshold). Two channels
    have no spread: the threshold is ``floor``, the ratio the one to the other.
    """
    lv = np.log(np.maximum(np.asarray(level, dtype=np.float64), 1e-30))
    n = lv.shape[0]
    if n < 2:
        return np.ones(n), np.full(n, np.inf)
    # row c: every channel but c (vectorised leave-one-out)
    others = np.broadcast_to(lv, (n, n))[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    m = np.median(others, axis=1)
    s = 1.4826 * np.median(np.abs(others - m[:, None]), axis=1) if n > 2 else np.zeros(n)
    t = np.maximum(np.log(floor), k * s)
    if cap is not None:
        t = np.minimum(t, np.log(max(cap, floor)))
    return np.exp(lv - m), np.exp(t)


@dataclass
class _SliceState:
    """Per buffer (slice, contrast, phase, repetition, set): lines seen, spike references, centre."""

    lines: set[tuple[int, int]] = field(default_factory=set)  # (kz, ky) acquired
    imaging_ky: set[int] = field(default_factory=set)  # ky of imaging (lattice) lines
    imaging_kz: set[int] = field(default_factory=set)
    profiles: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> sum_c |x|
    centre: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> (coils, w) complex
    band: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> (coils, 2 wx + 1) central kx
    readouts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> (coils, w) for the mid-scan check
    spiked: set[tuple[int, int]] = field(default_factory=set)  # (kz, ky) lines with an RF spike: no motion evidence
    edge_noise: list[float] = field(default_factory=list)  # per line: channel-summed readout-edge power (motion)
    dropout_done: bool = False
    motion_done: bool = False
    finished_midscan: bool = False
    finished: bool = False
    last_trace: Trace | None = None


@register
class ReadoutQC(AccumulatingGadget):
    """QC tap on raw acquisitions; place it FIRST in a chain (before NoiseAdjust).

    Every acquisition passes through untouched and is yielded before any check runs; the
    checks then yield :class:`~inline.qc.alert.Alert` messages (at most one per code and
    (slice, repetition), or per series for coil findings):

    * ``rf_spike``: imaging sample whose channel-summed magnitude exceeds ``spike_ratio``
      times both the running median along kx (``spike_median_window``) and the same kx
      (+-1 sample) of the nearest line of the same buffer already received, and
      ``spike_noise_ratio`` times the channel-summed noise mean.
    * ``coil_noise`` from the noise scan: a channel's noise std, against the median of the
      *other* channels, above ``exp(coil_noise_mad_k * s)`` where ``s`` is the robust spread
      (1.4826 x median absolute deviation) of the other channels' log std, clipped to
      [``coil_noise_min_ratio``, ``coil_noise_ratio``]: a tight array flags a 1.75x channel,
      a widely spread one only 3x. ``coil_dropout``: below ``coil_dropout_noise_ratio`` x the
      median channel.
    * ``coil_dropout`` in imaging: on the k-space centre lines, a channel whose
      centre-to-edge power ratio is below ``dropout_signal_ratio`` (noise only, or zeros)
      while it had signal before (own history) or the median channel has signal. Series-wide
      (empty ``slices``: a dead element stays dead), ``evidence.first_slice`` where it was found.
    * ``coil_noise`` in imaging (every ``noise_window_lines`` outer-ky lines): per channel a
      robust high-kx noise level (per line the median |x|^2 of the readout ends / ln 2, then
      the 20th percentile over the outer lines so far: signal at high kx only raises it).
      With a noise scan, relative to the channel's own noise-scan level (a channel whose noise
      rose during the scan), flagged by the same robust rule as the noise scan (floor
      ``coil_noise_ratio``: the imaging estimate keeps some signal); without one, the levels
      themselves against the other channels with ``coil_noise_mad_k_imaging`` and no upper
      clip (real arrays spread up to 5x without a fault); with two channels, the noisier one
      above ``2.5 x`` the other.
    * ``incomplete_coverage``: at LAST_IN_SLICE (and at close for unfinished buffers), the
      ky/kz lattice lines (header encoding limits, acceleration factor, lattice offset taken
      from the acquired imaging lines) that never arrived.
    * ``motion``: the complex k-space centre (``centre_fraction`` of the matrix in ky, kz and
      kx, all channels) of each repetition against the first, once all its centre lines are
      in: ``1 - |<a, b>| / (|a| |b|)`` above ``motion_threshold`` (insensitive to a global
      phase or scale, sensitive to translation, rotation and coil-relative motion);
      navigator readouts (IS_NAVIGATION_DATA) likewise against the first navigator. Mid-scan
      (at LAST_IN_SLICE, :meth:`_midscan`): a jump of the error of predicting each line from its
      ky neighbours across the coils (channels compressed to ``midscan_virtual_coils``), in the
      central band against the local error (``motion_jump_ratio``) and over every line outside
      the centre against the noise (``midscan_z_threshold``, :mod:`inline.motion.consistency`;
      scans with at least ``midscan_min_channels`` channels).

    Noise statistics go into ``context.shared["noise"]``: ``std`` (coils,) [scanner units,
    sqrt(E|n|^2)], ``covariance`` (coils, coils) complex128, ``dwell_time_us``,
    ``receiver_noise_bandwidth``, ``samples``, ``channels``.
    """

    class Params(GadgetParams):
        spike_ratio: float = Field(
            6.0,
            gt=1,
            description="A spike's channel-summed magnitude over the larger of its kx running median and the "
            "neighbouring line at the same kx (+-1 sample). Clean Cartesian simulated and real scans reach 2.6 "
            "(echo peak, noise), the 2-channel EPI phantom 3.3; a 0.1 x peak spike gives >= 3.7 (its channels add "
            "with random phases): configs/qc.yaml (Cartesian) uses 3.2, this conservative default suits EPI too.",
        )
        spike_noise_ratio: float = Field(
            10.0,
            gt=0,
            description="A spike must also exceed this many times the channel-summed noise floor (median of the "
            "readout's edge samples; the channel-summed Rayleigh noise of 2+ channels exceeds 5x its mean with "
            "probability < 1e-9).",
        )
        spike_median_window: int = Field(9, ge=3, description="Running-median window along kx [samples].")
        coil_noise_ratio: float = Field(
            3.0,
            gt=1,
            description="Noise std of a channel over the median channel that flags it noisy (receive chains of one "
            "array differ by < 2x; 3x is a fault). Upper clip of the robust threshold (see coil_noise_mad_k).",
        )
        coil_noise_min_ratio: float = Field(
            1.75,
            gt=1,
            description="Lower clip of the robust coil-noise threshold: a channel below this many times the median "
            "of the others is never flagged (simulated arrays span 0.7-1.5x; the real 14-channel Skyra 0.83-1.43x).",
        )
        coil_noise_mad_k: float = Field(
            3.0,
            gt=0,
            description="Noise-scan coil_noise threshold: log(std / median of the other channels) above this many "
            "robust spreads (1.4826 MAD of the other channels' log std), clipped to [coil_noise_min_ratio, "
            "coil_noise_ratio].",
        )
        coil_noise_mad_k_imaging: float = Field(
            4.0,
            gt=0,
            description="Without a noise scan: the same rule on the imaging high-kx levels, this many robust "
            "spreads, floor coil_noise_ratio, no upper clip (the real 32-channel file spans 0.5-5.5x).",
        )
        coil_dropout_noise_ratio: float = Field(
            0.05, ge=0, description="Noise-scan std below this fraction of the median channel: channel dead."
        )
        dropout_signal_ratio: float = Field(
            4.0,
            gt=0,
            description="Centre-to-edge power ratio of a k-space-centre line below which a channel carries no "
            "signal (noise only gives ~1; a live channel gives 100s).",
        )
        dropout_reference_ratio: float = Field(
            50.0,
            gt=0,
            description="The same ratio the channel had before (its maximum so far) or the median channel has "
            "now must exceed this, so a channel far from the anatomy is not called dead.",
        )
        noise_window_lines: int = Field(16, ge=2, description="Readouts per imaging noise estimate (coil_noise).")
        edge_fraction: float = Field(
            0.125, gt=0, lt=0.5, description="Fraction of the readout at each end used as the noise floor."
        )
        centre_fraction: float = Field(
            0.0625,
            gt=0,
            le=0.5,
            description="Half-width of the k-space centre region for motion and dropout, as a fraction of the "
            "matrix (1/16: +-4 lines of 64, +-8 samples of a 128-sample readout).",
        )
        motion_threshold: float = Field(
            0.02,
            gt=0,
            description="Navigator: 1 - correlation against the first navigator. Repetitions: 1 - correlation of "
            "the central k-space block against repetition 0 after removing the fitted translation (rotation and "
            "coil-relative motion), in excess of the noise-only expectation.",
        )
        motion_block_fraction: float = Field(
            0.125,
            gt=0,
            le=0.5,
            description="Half-width of the central k-space block (ky, kz and kx) compared between repetitions and "
            "checked for mid-scan consistency, as a fraction of the matrix (1/8: the central quarter).",
        )
        motion_residual_threshold: float = Field(
            0.001,
            gt=0,
            description="Repetitions: median over the (low-noise) central-block lines of 1 - correlation against "
            "repetition 0 after removing the fitted translation, in excess of the noise-only expectation, that is "
            "reported as motion (rotation, coil-relative motion). Clean repetitions: |value| < 0.0005 (100 simulated "
            "scans, the 2-channel real phantom); 2 deg rotation: >= 0.0012.",
        )
        motion_line_noise_max: float = Field(
            0.05,
            gt=0,
            description="Central-block lines whose noise-only expectation of 1 - correlation exceeds this are "
            "left out of the repetition comparison (unless fewer than 3 remain).",
        )
        motion_shift_mm: float = Field(
            1.0,
            gt=0,
            description="Translation between a repetition and repetition 0, estimated from the phase ramp of their "
            "cross-power in the central block, that is reported as motion [mm] (noise-only: < 0.1 mm).",
        )
        motion_jump_ratio: float = Field(
            6.0,
            gt=1,
            description="Mid-scan motion: a pair of lines whose prediction error from their ky neighbours across "
            "all coils (a GRAPPA-like kernel fitted on the slice) exceeds this many times the local median "
            "(clean simulated slices reach 4.5).",
        )
        midscan_virtual_coils: int = Field(
            8, ge=2, description="Mid-scan motion check: channels compressed to this many virtual coils (SVD of the "
            "central lines' channel covariance) before the kernel fit (CPU: the fit grows with its square).")
        midscan_kx_samples: int = Field(
            33, ge=5, description="Mid-scan motion check: central readout samples of the kept band used by the fit.")
        midscan_z_threshold: float = Field(
            10.0, gt=0, description="Mid-scan motion over every line outside the centre (inline.motion.consistency): a "
            "moment whose two straddling lines' prediction error both exceed their surroundings' by this many noise "
            "standard deviations, and the lines beyond them do not (clean simulated scans: <= 7.7 in 192; real phantoms "
            "with >= 14 channels <= 3.0).")
        midscan_min_channels: int = Field(
            4, ge=2, description="Mid-scan check over every line only with at least this many channels (the lines are "
            "predicted across the coils: with 2 channels a clean real phantom scored 21.6).")
        midscan_line_samples: int = Field(
            2048, ge=64, description="Mid-scan check memory: complex samples kept per line (channels x central readout "
            "samples; the whole readout while channels x samples fit: 8 x 128 does, 32 x 512 keeps 64 samples).")
        check_coverage: bool = Field(True, description="Report missing ky/kz lines.")

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    tap: ClassVar[bool] = True  # runs beside the data path: never delays the images
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition, Alert)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.alerts = AlertFactory(context)
        hdr = self.header
        enc = hdr.encoding[0] if getattr(hdr, "encoding", None) else None
        lim = getattr(enc, "encodingLimits", None)

        def limits(name: str, matrix: int) -> tuple[int, int, int]:
            lm = getattr(lim, name, None) if lim is not None else None
            if lm is None or lm.maximum is None:
                return 0, max(matrix - 1, 0), matrix // 2
            lo, hi = int(lm.minimum or 0), int(lm.maximum)
            c = int(lm.center) if lm.center is not None else (lo + hi + 1) // 2
            if c <= lo and hi > lo:  # converters that write centre 0: take the middle of the range
                c = (lo + hi + 1) // 2
            return lo, hi, c

        ms = enc.encodedSpace.matrixSize if enc is not None else None
        self._ky_lim = limits("kspace_encoding_step_1", int(getattr(ms, "y", 1) or 1))
        self._kz_lim = limits("kspace_encoding_step_2", int(getattr(ms, "z", 1) or 1))
        pi = getattr(enc, "parallelImaging", None)
        af = getattr(pi, "accelerationFactor", None) if pi is not None else None
        self._r_ky = int(getattr(af, "kspace_encoding_step_1", 1) or 1)
        self._r_kz = int(getattr(af, "kspace_encoding_step_2", 1) or 1)
        asi = getattr(hdr, "acquisitionSystemInformation", None)
        bw = getattr(asi, "relativeReceiverNoiseBandwidth", None) if asi is not None else None
        self._bw = float(bw) if bw else _DEFAULT_RECEIVER_NOISE_BANDWIDTH
        # noise scan
        self._noise_sum: np.ndarray | None = None
        self._noise_n = 0
        self._noise_dwell_us = 0.0
        self.noise_std: np.ndarray | None = None  # (coils,) sqrt(E|n|^2) of the noise scan
        # imaging
        self._slices: dict[Key, _SliceState] = {}
        self._readout_n: dict[Key, int] = {}
        self.midscan_score = 0.0  # last central-band jump ratio (tests, tuning)
        self.midscan_z: float | None = None  # last jump over every line, in noise standard deviations
        self._nav_ref: dict[int, np.ndarray] = {}
        self._dropout_hist: np.ndarray | None = None  # (coils,) max centre/edge ratio seen
        self._edge_power: list[np.ndarray] = []  # per-line (coils,) edge power, rolling window
        self._coil_lines: list[np.ndarray] = []  # per outer line (coils,) robust high-kx noise power (coil_noise)
        self._coil_pending = 0
        self._outer_seen = 0  # outer-ky imaging lines so far (every other one feeds coil_noise on long readouts)
        self._emitted: set[tuple] = set()
        self._dead: set[int] = set()
        self._noisy: set[int] = set()

    # -- helpers ------------------------------------------------------------------------
    def _once(self, key: tuple) -> bool:
        if key in self._emitted:
            return False
        self._emitted.add(key)
        return True

    def _alert(self, code: AlertCode, severity: Severity, message: str, action: str, trace: Trace, **kw) -> Alert:
        return self.alerts.make(code, severity, message, action, revealed_ns=trace.last_arrival_ns, **kw)

    @property
    def series(self) -> str:
        return self.alerts.series

    # -- noise scan ---------------------------------------------------------------------
    def _noise(self, acq: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        n = np.asarray(acq.data, dtype=np.complex128)
        if self._noise_sum is None or self._noise_sum.shape[0] != n.shape[0]:
            self._noise_sum = np.zeros((n.shape[0], n.shape[0]), np.complex128)
            self._noise_n = 0
        self._noise_sum += n @ n.conj().T
        self._noise_n += n.shape[1]
        self._noise_dwell_us = self._noise_dwell_us or float(acq.sample_time_us)
        cov = self._noise_sum / max(self._noise_n - 1, 1)
        std = np.sqrt(np.maximum(np.real(np.diag(cov)), 0.0))
        self.noise_std = std
        self.context.shared["noise"] = {
            "std": std,
            "covariance": cov,
            "dwell_time_us": self._noise_dwell_us,
            "receiver_noise_bandwidth": self._bw,
            "samples": self._noise_n,
            "channels": int(n.shape[0]),
        }
        if self._noise_n < 64 or n.shape[0] < 3:  # too few samples / channels for a median
            return
        med = float(np.median(std))
        if med <= 0:
            return
        ratio = std / med
        loo, thr = _robust_outliers(std, self.params.coil_noise_min_ratio, self.params.coil_noise_mad_k,
                                    self.params.coil_noise_ratio)
        noisy = [int(c) for c in np.flatnonzero(loo > thr) if int(c) not in self._noisy]
        dead = [int(c) for c in np.flatnonzero(ratio < self.params.coil_dropout_noise_ratio) if int(c) not in self._dead]
        if noisy:
            self._noisy.update(noisy)
            yield self._alert(
                AlertCode.COIL_NOISE, Severity.WARNING,
                f"Noisy receive channel(s) {noisy} in series {self.series}: noise scan std "
                f"{', '.join(f'{loo[c]:.1f}x' for c in noisy)} the median of the other channels.",
                "Check the coil connection and plug; if it persists deselect the element or swap the coil, "
                "and repeat the series if images look grainy.",
                trace, value=float(loo[noisy].max()), threshold=float(thr[noisy].min()), unit="x median std",
                evidence={"channels": noisy, "std_ratio": [round(float(loo[c]), 3) for c in noisy],
                          "threshold": [round(float(thr[c]), 3) for c in noisy],
                          "source": "noise_scan", "scan_counter": int(acq.scan_counter)},
            ), trace
        if dead:
            self._dead.update(dead)
            yield self._alert(
                AlertCode.COIL_DROPOUT, Severity.CRITICAL,
                f"Dead receive channel(s) {dead} in series {self.series}: no noise in the noise scan.",
                "Check that the coil is plugged in and recognised; reconnect or swap the coil and repeat the series.",
                trace, value=float(ratio[dead].min()), threshold=self.params.coil_dropout_noise_ratio,
                unit="x median std",
                evidence={"channels": dead, "std_ratio": [round(float(ratio[c]), 4) for c in dead],
                          "source": "noise_scan", "scan_counter": int(acq.scan_counter)},
            ), trace

    # -- per readout ----------------------------------------------------------------------
    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        yield item, trace  # the tap: data first, QC after
        flags = int(item.flags)
        if flags & _NOISE:
            yield from self._noise(item, trace)
            return
        if flags & _NAV:
            yield from self._navigator(item, trace)
            return
        if flags & NON_IMAGING_MASK or item.trajectory_dimensions > 0:
            return
        data = item.data
        if data.ndim != 2 or data.shape[1] < 16:
            return
        key = _key(item)
        st = self._slices.get(key)
        if st is None:
            st = self._slices[key] = _SliceState()
        ky, kz = int(item.idx.kspace_encode_step_1), int(item.idx.kspace_encode_step_2)
        st.lines.add((kz, ky))
        st.last_trace = trace
        if not flags & _CAL:
            st.imaging_ky.add(ky)
            st.imaging_kz.add(kz)
        mag = np.abs(data)  # (coils, samples) |x|; |x|^2 only where needed (CPU: one pass over the readout)
        nx = data.shape[1]
        e = max(2, int(nx * self.params.edge_fraction))
        lo_e, hi_e = mag[:, :e], mag[:, -e:]
        edge = (0.5 / e) * (np.einsum("ij,ij->i", lo_e, lo_e) + np.einsum("ij,ij->i", hi_e, hi_e))  # (coils,) edge power
        st.edge_noise.append(float(edge.sum()))
        yield from self._spike(item, trace, st, key, kz, ky, mag, edge)
        # CPU: readouts over 256 samples (256+ matrices, 128+ outer lines per slice) feed every other outer
        # line to the coil-noise estimate, still >= noise_window_lines lines per estimate within 2 windows
        if self._outer_line(ky):
            self._outer_seen += 1
            if nx <= 256 or self._outer_seen % 2:
                yield from self._imaging_noise(item, trace, key, edge)
        c0 = int(item.center_sample) if 0 < item.center_sample < nx else nx // 2  # k-space centre sample
        if self._block_line(ky, kz):
            wx = max(4, int(round(nx * self.params.motion_block_fraction)))
            st.band[(kz, ky)] = np.array(data[:, max(0, c0 - wx) : c0 + wx + 1])
        if data.shape[0] >= self.params.midscan_min_channels:
            keep = max(16, self.params.midscan_line_samples // data.shape[0])
            if nx <= keep:
                st.readouts[(kz, ky)] = np.array(data)
            else:
                start = min(max(0, c0 - keep // 2), nx - keep)
                st.readouts[(kz, ky)] = np.array(data[:, start : start + keep])
        self._readout_n[key] = nx
        lo, hi, c = self._ky_lim
        if (kz, ky) in st.band and abs(ky - c) <= max(2, int(round((hi - lo + 1) * self.params.motion_block_fraction))):
            yield from self._motion(trace, key, st, final=False)
        centre = self._centre_line(ky, kz)
        if centre:
            yield from self._dropout(item, trace, key, st, mag, edge, ky == self._ky_lim[2])
            w = max(2, int(round(nx * self.params.centre_fraction)))
            st.centre[(kz, ky)] = np.array(data[:, max(0, c0 - w) : c0 + w + 1])
        if flags & _LAST_IN_SLICE:
            for k, s in self._slices.items():
                if k[0] == key[0] and k[3] == key[3] and k[4] == key[4] and not s.finished:
                    s.finished = True
                    yield from self._motion(s.last_trace or trace, k, s, final=True)
                    yield from self._midscan(s.last_trace or trace, k, s)
                    yield from self._coverage(s.last_trace or trace, k, s)
                    s.profiles.clear()
                    s.readouts.clear()

    def _outer_line(self, ky: int) -> bool:
        """A line in the outer half of ky, whose high-kx samples are nearly noise only."""
        lo, hi, c = self._ky_lim
        return abs(ky - c) >= (hi - lo + 1) // 4

    def _block_line(self, ky: int, kz: int) -> bool:
        """Lines kept for motion: every ky (mid-scan check) of the central kz block."""
        zlo, zhi, zc = self._kz_lim
        if zhi > zlo:
            return abs(kz - zc) <= max(1, int(round((zhi - zlo + 1) * self.params.motion_block_fraction)))
        return True

    def _centre_line(self, ky: int, kz: int) -> bool:
        lo, hi, c = self._ky_lim
        w = max(1, int(round((hi - lo + 1) * self.params.centre_fraction)))
        if abs(ky - c) > w:
            return False
        zlo, zhi, zc = self._kz_lim
        if zhi > zlo:
            return abs(kz - zc) <= max(1, int(round((zhi - zlo + 1) * self.params.centre_fraction)))
        return True

    # -- RF spikes --------------------------------------------------------------------------
    def _spike(self, acq, trace, st: _SliceState, key: Key, kz: int, ky: int, mag: np.ndarray, edge) -> Iterator[Output]:
        p = self.params
        m = mag.sum(axis=0)  # (samples,) channel-summed magnitude
        nx = m.shape[0]
        half = p.spike_median_window // 2
        neighbour = None
        for d in (1, -1, 2, -2, 3, -3):
            neighbour = st.profiles.get((kz, ky + d))
            if neighbour is not None and neighbour.shape[0] == nx:
                break
            neighbour = None
        # profiles kept in forward kx order: reversed readouts (EPI, bipolar) are compared flipped
        rev = bool(int(acq.flags) & _REVERSE)
        st.profiles[(kz, ky)] = m[::-1] if rev else m
        if neighbour is not None and rev:
            neighbour = neighbour[::-1]
        # noise floor: median channel-summed magnitude of the edge (high-kx) samples (a spike among them
        # does not raise it, unlike their mean power; files without a noise scan rely on it)
        e = max(2, int(nx * p.edge_fraction))
        floor = float(_median_last(np.concatenate([m[:e], m[-e:]])))
        if self.noise_std is not None and self.noise_std.shape[0] == mag.shape[0]:
            floor = min(floor, _RAYLEIGH_MEAN * float(self.noise_std.sum())) if floor > 0 else floor
        cand = np.flatnonzero(m > p.spike_noise_ratio * floor)
        nb = None
        if cand.size and neighbour is not None:
            nb = np.maximum(neighbour, np.maximum(np.roll(neighbour, 1), np.roll(neighbour, -1)))
            cand = cand[m[cand] > p.spike_ratio * nb[cand]]
        if cand.size == 0:
            return
        # running median along kx (reflect-padded), only where the cheap tests left a candidate
        padded = np.pad(m, half, mode="reflect")
        med = np.zeros(nx)
        med[cand] = _median_last(padded[cand[:, None] + np.arange(p.spike_median_window)[None, :]])
        if nb is not None:
            cand = cand[m[cand] > p.spike_ratio * med[cand]]
            ref = np.maximum(med, nb)
        else:  # first line of a buffer: only the running median; demand twice the margin
            cand = cand[m[cand] > 2 * p.spike_ratio * med[cand]]
            ref = med
        if cand.size == 0:
            return
        st.spiked.add((kz, ky))
        s, rep = key[0], key[3]
        if not self._once((AlertCode.RF_SPIKE, s, rep)):
            return
        k = int(cand[np.argmax(m[cand] / np.maximum(ref[cand], 1e-30))])
        chan_ref = np.maximum(np.median(mag, axis=1), 1e-30)
        channels = [int(c) for c in np.flatnonzero(mag[:, k] > p.spike_ratio * chan_ref)]
        ratio = float(m[k] / max(float(ref[k]), 1e-30))
        yield self._alert(
            AlertCode.RF_SPIKE, Severity.WARNING,
            f"RF spike in series {self.series}, {slice_label([s])}, repetition {rep} (readout {acq.scan_counter}, "
            f"ky {ky}, sample {k}, {len(channels)} channel(s)): {ratio:.0f}x its neighbours; "
            "it can cause herringbone stripes.",
            "Check the images for stripes and repeat the series if they show; if spikes recur, remove loose metal "
            "from the bore, check the coil cables and call service.",
            trace, slices=[s], repetition=rep, value=ratio, threshold=p.spike_ratio, unit="x neighbours",
            evidence={"scan_counter": int(acq.scan_counter), "slice": s, "ky": ky, "kz": kz, "sample": k,
                      "samples": [int(c) for c in cand[:16]], "channels": channels,
                      "magnitude": float(m[k]), "reference": float(ref[k]), "noise_floor": floor},
        ), trace

    # -- coil health in imaging ------------------------------------------------------------
    def _imaging_noise(self, acq, trace, key: Key, edge: np.ndarray) -> Iterator[Output]:
        p = self.params
        coils = edge.shape[0]
        with_scan = self.noise_std is not None and self.noise_std.shape[0] == coils
        if with_scan:
            self._edge_power.append(edge)  # kept as before (motion's noise fallback)
            if len(self._edge_power) >= p.noise_window_lines:
                self._edge_power.clear()
        if coils < 2:
            return
        data = acq.data
        e = max(2, int(data.shape[1] * p.edge_fraction))
        step = max(1, e // 16)  # CPU: at most ~32 samples per channel and line (512-sample readouts: every 4th)
        ends = np.concatenate([data[:, :e:step], data[:, -e::step]], axis=1)
        # median |x|^2 / ln 2: the noise power of a line's readout ends, robust to a few signal samples
        level = _median_last(ends.real * ends.real + ends.imag * ends.imag) / np.log(2.0)
        if self._coil_lines and self._coil_lines[-1].shape != level.shape:
            self._coil_lines.clear()
        self._coil_lines.append(level)
        del self._coil_lines[:-512]
        self._coil_pending += 1
        if self._coil_pending < p.noise_window_lines or (not with_scan and len(self._coil_lines) < 2 * p.noise_window_lines):
            return  # without a noise scan nothing else anchors the levels: wait for two windows of lines
        self._coil_pending = 0
        # low percentile over the outer lines: lines whose ends carry signal only raise the level
        power = np.percentile(np.asarray(self._coil_lines), 20, axis=0)
        if with_scan:
            std = np.sqrt(power / np.maximum(self.noise_std**2, 1e-30))  # x own noise-scan level
            ratio, thr = _robust_outliers(std, p.coil_noise_ratio, p.coil_noise_mad_k_imaging, None)
            source, unit = "imaging_high_kx", "x noise-scan std (vs median channel)"
        else:
            std = np.sqrt(power)
            floor = 2.5 if coils == 2 else p.coil_noise_ratio
            ratio, thr = _robust_outliers(std, floor, p.coil_noise_mad_k_imaging, None)
            source, unit = "imaging_high_kx_no_noise_scan", "x median channel std"
        self.imaging_noise_ratio = ratio
        noisy = [int(c) for c in np.flatnonzero((ratio > thr) & (power > 0)) if int(c) not in self._noisy
                 and int(c) not in self._dead]
        if not noisy:
            return
        self._noisy.update(noisy)
        s, rep = key[0], key[3]
        ref = "its noise-scan level (relative to the other channels)" if with_scan else "the other channels"
        yield self._alert(
            AlertCode.COIL_NOISE, Severity.WARNING,
            f"Noisy receive channel(s) {noisy} in series {self.series} from {slice_label([s])}, repetition {rep}: "
            f"imaging noise {', '.join(f'{ratio[c]:.1f}x' for c in noisy)} {ref}.",
            "Check the coil plug and cable and for electronic devices near the bore; repeat the series if images "
            "look grainy or striped.",
            trace, slices=[s], repetition=rep, value=float(ratio[noisy].max()), threshold=float(thr[noisy].min()),
            unit=unit,
            evidence={"channels": noisy, "std_ratio": [round(float(ratio[c]), 3) for c in noisy],
                      "threshold": [round(float(thr[c]), 3) for c in noisy], "lines": len(self._coil_lines),
                      "source": source, "scan_counter": int(acq.scan_counter)},
        ), trace

    def _dropout(self, acq, trace, key: Key, st: _SliceState, mag: np.ndarray, edge: np.ndarray, at_centre: bool
                 ) -> Iterator[Output]:
        """Decide once per buffer, on the k-space-centre line (kz centre in 3D) alone: lines off the centre
        can cancel in one channel (coil phase), the centre line carries every channel's full signal."""
        p = self.params
        kz_ok = self._kz_lim[1] <= self._kz_lim[0] or int(acq.idx.kspace_encode_step_2) == self._kz_lim[2]
        if st.dropout_done or not (at_centre and kz_ok):
            return
        st.dropout_done = True
        nx = mag.shape[1]
        c0 = int(acq.center_sample) if 0 < acq.center_sample < nx else nx // 2
        w = max(2, int(round(nx * p.centre_fraction)))
        cm = mag[:, max(0, c0 - w) : c0 + w + 1]
        centre = (cm * cm).mean(axis=1)
        silent = (centre <= 0) & (edge <= 0)  # a live receiver always has noise
        ratio = centre / np.maximum(edge, 1e-30)
        ratio[silent] = 0.0
        hist = self._dropout_hist
        if hist is None or hist.shape != ratio.shape:
            hist = np.zeros_like(ratio)
        live = ratio[~silent]
        med = float(np.median(live)) if live.size else 0.0
        weak = ratio < p.dropout_signal_ratio
        dead_now = silent | (weak & ((hist > p.dropout_reference_ratio) | (med > p.dropout_reference_ratio)))
        self._dropout_hist = np.maximum(hist, np.where(dead_now, 0.0, ratio))
        new = [int(c) for c in np.flatnonzero(dead_now) if int(c) not in self._dead]
        if not new or ratio.shape[0] < 2:
            return
        self._dead.update(new)
        s, rep = key[0], key[3]
        # a dead element stays dead: series-wide (empty slices), the slice where it was first seen in the evidence
        yield self._alert(
            AlertCode.COIL_DROPOUT, Severity.CRITICAL,
            f"Receive channel(s) {new} dropped out in series {self.series}, first seen at {slice_label([s])}, "
            f"repetition {rep}: no signal above noise at the k-space centre; every later slice is affected.",
            "Check the coil plug and that the patient has not moved off the coil; reconnect or swap the coil and "
            "repeat the series (shading or signal voids expected).",
            trace, value=float(ratio[new].max()), threshold=p.dropout_signal_ratio,
            unit="centre/edge power",
            evidence={"channels": new, "first_slice": s, "first_repetition": rep,
                      "centre_to_edge": [round(float(ratio[c]), 3) for c in new],
                      "history": [round(float(hist[c]), 1) for c in new], "median_channel": round(med, 1),
                      "zeros": [int(c) for c in np.flatnonzero(silent)], "scan_counter": int(acq.scan_counter),
                      "ky": int(acq.idx.kspace_encode_step_1)},
        ), trace

    # -- motion ---------------------------------------------------------------------------
    def _pixel_mm(self) -> tuple[float, float]:
        """Encoded pixel size (readout incl. oversampling, phase) [mm]."""
        enc = self.header.encoding[0] if getattr(self.header, "encoding", None) else None
        es = getattr(enc, "encodedSpace", None)
        fov, ms = getattr(es, "fieldOfView_mm", None), getattr(es, "matrixSize", None)
        try:
            return float(fov.x) / float(ms.x), float(fov.y) / float(ms.y)
        except (AttributeError, TypeError, ZeroDivisionError):
            return 1.0, 1.0

    def _block_keys(self, st: _SliceState) -> list[tuple[int, int]]:
        """Lines of the central block (ky and kz within ``motion_block_fraction``) that ``st`` holds."""
        lo, hi, c = self._ky_lim
        wy = max(2, int(round((hi - lo + 1) * self.params.motion_block_fraction)))
        return sorted(k for k in st.band if abs(k[1] - c) <= wy)

    def _noise_power(self, coils: int) -> float | None:
        """Sum over channels of the per-sample noise power ``E|n|^2`` (noise scan, else imaging edges)."""
        if self.noise_std is not None and self.noise_std.shape[0] == coils:
            return float((self.noise_std**2).sum())
        if self._edge_power:
            return float(np.median(np.asarray(self._edge_power), axis=0).sum())
        return None

    def _motion(self, trace: Trace, key: Key, st: _SliceState, final: bool) -> Iterator[Output]:
        """Repetition ``key[3]`` against repetition 0: estimated translation and residual change."""
        if st.motion_done or key[3] == 0:
            return
        ref = self._slices.get((key[0], key[1], key[2], 0, key[4]))
        if ref is None or not ref.band:
            return
        ref_keys = self._block_keys(ref)
        common = [k for k in ref_keys if k in st.band]
        if not final and len(common) < len(ref_keys):
            return  # wait for every block line the first repetition had
        if len(common) < 2:
            return
        st.motion_done = True
        try:
            a = np.stack([ref.band[k] for k in common]).astype(np.complex128)  # (lines, coils, w)
            b = np.stack([st.band[k] for k in common]).astype(np.complex128)
        except ValueError:
            return
        r = np.einsum("lcw,lcw->lw", a.conj(), b)  # cross-power per k
        nx = max(int(self._readout_n.get(key, 0)), a.shape[2])
        ny = self._ky_lim[1] - self._ky_lim[0] + 1
        # translation from the phase ramp of the cross-power: shift d [px] gives exp(-2 pi i k d / n)
        dx = -float(np.angle(np.sum(r[:, 1:] * r[:, :-1].conj()))) * nx / (2 * np.pi)
        kys = np.array([k[1] for k in common])
        pairs = [(i, i + 1) for i in range(len(common) - 1)
                 if common[i + 1][0] == common[i][0] and kys[i + 1] == kys[i] + 1]
        dy = 0.0
        if pairs:
            i0, i1 = np.array(pairs).T
            dy = -float(np.angle(np.sum(r[i1] * r[i0].conj()))) * ny / (2 * np.pi)
        kx = np.arange(r.shape[1]) - r.shape[1] // 2
        ramp = np.exp(2j * np.pi * (kx[None, :] * dx / nx + (kys - self._ky_lim[2])[:, None] * dy / ny))
        # residual change per line (each line weighted alike: the k-space centre would dominate and hide
        # rotation), in excess of what the noise alone gives (1 - corr ~ N / S)
        sa = (np.abs(a) ** 2).sum(axis=(1, 2))
        sb = (np.abs(b) ** 2).sum(axis=(1, 2))
        if np.any(sa <= 0) or np.any(sb <= 0):
            return
        corr = np.abs((r * ramp).sum(axis=1)) / np.sqrt(sa * sb)
        npow = self._noise_power(a.shape[1])
        if not npow and (ref.edge_noise or st.edge_noise):  # no noise scan: the readout edges (median line)
            npow = float(np.median(ref.edge_noise + st.edge_noise))
        expected = 0.5 * a.shape[2] * npow * (1 / sa + 1 / sb) if npow else np.zeros_like(sa)
        # lines whose noise-only change is small: noisy outer lines would dominate the median
        good = expected <= self.params.motion_line_noise_max
        if good.sum() < 3:
            good = np.ones_like(good)
        excess = float(np.median((1.0 - corr - expected)[good]))
        expected = float(np.median(expected[good]))
        px, py = self._pixel_mm()
        shift_mm = float(np.hypot(dx * px, dy * py))
        p = self.params
        if shift_mm < p.motion_shift_mm and excess <= p.motion_residual_threshold:
            return
        yield from self._motion_alert(
            trace, key,
            f"shifted by {shift_mm:.1f} mm against repetition 0 "
            f"(k-space centre otherwise changed by {100 * max(excess, 0):.1f}%)",
            "repetitions", value=shift_mm, threshold=p.motion_shift_mm, unit="mm",
            evidence={"reference_repetition": 0, "block_lines": len(common), "shift_mm": [round(dx * px, 3),
                      round(dy * py, 3)], "residual_change": round(excess, 5), "noise_expected": round(expected, 5),
                      "source": "kspace_centre"},
        )

    def _motion_alert(self, trace: Trace, key: Key, finding: str, affected: str, **kw) -> Iterator[Output]:
        """One motion alert per (slice, repetition): what was found and what to repeat."""
        s, rep = key[0], key[3]
        if not self._once((AlertCode.MOTION, s, rep)):
            return
        yield self._alert(
            AlertCode.MOTION, Severity.WARNING,
            f"Motion in series {self.series}, {slice_label([s])}, repetition {rep}: {finding}.",
            f"Ask the patient to keep still and repeat the series (or the affected {affected}).",
            trace, slices=[s], repetition=rep, **kw,
        ), trace

    def _midscan(self, trace: Trace, key: Key, st: _SliceState) -> Iterator[Output]:
        """Motion within one buffer: the central band's jump ratio, then every line against the noise."""
        yield from self._central_jump(trace, key, st)
        yield from self._outer_jump(trace, key, st)

    def _midscan_plane(self, lines: dict[tuple[int, int], np.ndarray]) -> int:
        """The kz plane the mid-scan checks look at: the centre plane of a 3D scan, else the best-filled one."""
        zs = Counter(k[0] for k in lines)
        lo, hi, c = self._kz_lim
        return c if hi > lo and c in zs else zs.most_common(1)[0][0]

    def _outer_jump(self, trace: Trace, key: Key, st: _SliceState) -> Iterator[Output]:
        """Every line outside the centre predicted from its ky neighbours, the error against the noise
        (:func:`inline.motion.consistency.consistency_jump`)."""
        if len(st.readouts) < 20:
            return
        z = self._midscan_plane(st.readouts)
        # a line with an RF spike is left out: its error (and its neighbours') is the spike's, not motion's
        keys = sorted(k for k in st.readouts if k[0] == z and k not in st.spiked)
        shapes = {st.readouts[k].shape for k in keys}
        if len(shapes) != 1:
            return
        p = self.params
        try:
            jump = consistency_jump(np.stack([st.readouts[k] for k in keys]), np.array([k[1] for k in keys]),
                                    self._ky_lim[2], virtual_coils=p.midscan_virtual_coils)
        except ValueError:
            return
        if jump is None:
            return
        self.midscan_z = jump.score
        if jump.score <= p.midscan_z_threshold:
            return
        yield from self._motion_alert(
            trace, key,
            f"k-space lines from ky {jump.ky + 1} on are inconsistent with the lines before "
            f"(prediction error {jump.score:.0f} noise standard deviations above the neighbouring lines')",
            "slices", value=float(jump.score), threshold=p.midscan_z_threshold, unit="noise standard deviations",
            evidence={"ky": jump.ky + 1, "kz": z, "lines_scored": jump.targets, "source": "kspace_consistency_noise"},
        )

    def _central_jump(self, trace: Trace, key: Key, st: _SliceState) -> Iterator[Output]:
        """Motion within one buffer: lines inconsistent with their ky neighbours across the coils.

        A kernel predicting each line from its two ky neighbours (3 kx samples, all coils; the
        coil sensitivities make fully sampled multi-coil k-space redundant, as GRAPPA uses) is
        fitted on the buffer's central kx band; after a rigid motion the lines on either side of
        the motion are predicted from data of the other object position and their error jumps.
        """
        if st.finished_midscan or len(st.band) < 12:
            return
        st.finished_midscan = True
        z = self._midscan_plane(st.band)
        kys = sorted(k[1] for k in st.band if k[0] == z)
        have = set(kys)
        targets = [y for y in kys if y - 1 in have and y + 1 in have]
        try:
            lines = {y: st.band[(z, y)] for y in kys}
            shape = next(iter(lines.values())).shape
            if len(targets) < 10 or any(v.shape != shape for v in lines.values()) or shape[0] < 2:
                return
        except StopIteration:
            return
        coils, w = shape
        # cost: coil compression (SVD of the centre lines' channel Gram, BART cc -S style) to
        # midscan_virtual_coils and the central midscan_kx_samples: 32 channels x 129 samples would
        # cost ~1 s of least squares per slice, compressed a few ms, with the same per-line errors
        p = self.params
        half = p.midscan_kx_samples // 2
        arr = np.stack([lines[y] for y in kys])  # (lines, coils, w), ky ascending
        if w > 2 * half + 1:
            c0 = w // 2
            arr = arr[:, :, c0 - half : c0 + half + 1]
            w = 2 * half + 1
        if coils > p.midscan_virtual_coils:
            mid = arr[max(0, len(kys) // 2 - 4) : len(kys) // 2 + 5].transpose(1, 0, 2).reshape(coils, -1)
            _, vec = np.linalg.eigh(mid @ mid.conj().T)
            u = vec[:, ::-1][:, : p.midscan_virtual_coils].conj().T.astype(np.complex64)  # (virtual, coils)
            arr = np.matmul(u, arr.astype(np.complex64, copy=False))  # (lines, virtual, w)
            coils = p.midscan_virtual_coils
        pos = {y: i for i, y in enumerate(kys)}
        lo = arr[[pos[y - 1] for y in targets]]
        hi = arr[[pos[y + 1] for y in targets]]
        x = np.concatenate([lo[:, :, :-2], lo[:, :, 1:-1], lo[:, :, 2:], hi[:, :, :-2], hi[:, :, 1:-1], hi[:, :, 2:]],
                           axis=1)  # (t, 6 coils, w - 2)
        yv = arr[[pos[y] for y in targets]][:, :, 1:-1]  # (t, coils, w - 2)
        # products in complex64 (CPU), the small normal equations solved in complex128
        xm = x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.complex64)
        ym = yv.transpose(0, 2, 1).reshape(-1, coils).astype(np.complex64)
        xh = xm.conj().T
        g = (xh @ xm).astype(np.complex128)
        lam = 1e-4 * float(np.real(np.trace(g))) / g.shape[0]
        kern = np.linalg.solve(g + lam * np.eye(g.shape[0]), (xh @ ym).astype(np.complex128)).astype(np.complex64)
        res = (ym - xm @ kern).reshape(len(targets), w - 2, coils)
        err = np.median((np.abs(res) ** 2).sum(axis=2), axis=1)  # robust to a spike at one kx
        sig = np.median((np.abs(ym.reshape(len(targets), w - 2, coils)) ** 2).sum(axis=2), axis=1)
        e = err / np.maximum(sig, 1e-30)
        t = np.array(targets)
        # local reference of each target: the median error of the targets 2-6 ky lines away
        offs = np.array([-6, -5, -4, -3, -2, 2, 3, 4, 5, 6])
        want = t[:, None] + offs[None, :]
        at = np.clip(np.searchsorted(t, want), 0, len(t) - 1)
        valid = t[at] == want
        local = np.where(valid, e[at], np.nan)
        enough = valid.sum(axis=1) >= 3
        med = np.nanmedian(np.where(enough[:, None], local, 1.0), axis=1)
        z_scores = np.where(enough, e / np.maximum(med, 1e-30), 1.0)
        pair = [(min(z_scores[i], z_scores[i + 1]), int(t[i])) for i in range(len(t) - 1) if t[i + 1] == t[i] + 1]
        if not pair:
            return
        score, last_before = max(pair)
        at = last_before + 1  # the pair straddles the moment: targets ky - 1 and ky, the object moved from ky on
        self.midscan_score = score
        if score <= p.motion_jump_ratio:
            return
        yield from self._motion_alert(
            trace, key,
            f"k-space lines from ky {at} on are inconsistent with the lines before "
            f"({score:.1f}x the local prediction error)",
            "slices", value=float(score), threshold=p.motion_jump_ratio, unit="x local prediction error",
            evidence={"ky": at, "kz": z, "source": "kspace_consistency"},
        )

    def _navigator(self, acq: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        s = int(acq.idx.slice)
        data = np.array(acq.data)
        ref = self._nav_ref.get(s)
        if ref is None or ref.shape != data.shape:
            self._nav_ref[s] = data
            return
        change = 1.0 - _correlation(ref, data)
        if change <= self.params.motion_threshold:
            return
        rep = int(acq.idx.repetition)
        if not self._once((AlertCode.MOTION, s, rep)):
            return
        yield self._alert(
            AlertCode.MOTION, Severity.WARNING,
            f"Motion in series {self.series}, {slice_label([s])}, repetition {rep}: the navigator changed by "
            f"{100 * change:.1f}% against the first one.",
            "Ask the patient to keep still and repeat the series.",
            trace, slices=[s], repetition=rep, value=change, threshold=self.params.motion_threshold,
            unit="1 - correlation", evidence={"source": "navigator", "scan_counter": int(acq.scan_counter)},
        ), trace

    # -- coverage -------------------------------------------------------------------------
    def _lattice(self, lim: tuple[int, int, int], r: int, seen: set[int]) -> set[int]:
        lo, hi, c = lim
        if r <= 1:
            return set(range(lo, hi + 1))
        # lattice offset: the residue most of the acquired imaging lines share (else the centre's)
        counts = np.bincount([v % r for v in seen], minlength=r) if seen else None
        off = int(np.argmax(counts)) if counts is not None and counts.max() > 0 else c % r
        return {v for v in range(lo, hi + 1) if v % r == off}

    def _coverage(self, trace: Trace, key: Key, st: _SliceState) -> Iterator[Output]:
        if not self.params.check_coverage or not st.lines:
            return
        kys = self._lattice(self._ky_lim, self._r_ky, st.imaging_ky)
        kzs = self._lattice(self._kz_lim, self._r_kz, st.imaging_kz) if self._kz_lim[1] > self._kz_lim[0] else {0}
        if self._kz_lim[1] <= self._kz_lim[0]:
            kzs = {min(z for z, _ in st.lines)} if st.lines else {0}
        missing = sorted((z, y) for z in kzs for y in kys if (z, y) not in st.lines)
        if not missing:
            return
        s, rep = key[0], key[3]
        if not self._once((AlertCode.INCOMPLETE_COVERAGE, s, rep, key[1], key[4])):
            return
        expected = len(kys) * len(kzs)
        frac = len(missing) / max(expected, 1)
        near_centre = any(abs(y - self._ky_lim[2]) <= 4 for _, y in missing)
        severity = Severity.CRITICAL if frac > 0.05 or near_centre else Severity.WARNING
        three_d = len(kzs) > 1
        shown = [f"{z}/{y}" if three_d else f"{y}" for z, y in missing[:20]]
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        yield self._alert(
            AlertCode.INCOMPLETE_COVERAGE, severity,
            f"Incomplete k-space in series {self.series}, {slice_label([s])}, repetition {rep}: "
            f"{len(missing)} of {expected} {'kz/ky' if three_d else 'ky'} lines missing ({', '.join(shown)}{more}).",
            "Check whether the scan was stopped or data were lost; repeat the series if the images show artefacts.",
            trace, slices=[s], repetition=rep, value=float(len(missing)), threshold=1.0, unit="lines",
            evidence={"missing": [[int(z), int(y)] for z, y in missing[:256]], "expected": expected,
                      "contrast": key[1], "phase": key[2], "set": key[4],
                      "acceleration": [self._r_ky, self._r_kz]},
        ), trace

    def close(self) -> Iterator[Output]:
        for k, s in self._slices.items():
            if not s.finished and s.last_trace is not None:
                s.finished = True
                yield from self._motion(s.last_trace, k, s, final=True)
                yield from self._midscan(s.last_trace, k, s)
                yield from self._coverage(s.last_trace, k, s)
