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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.qc.alert import Alert, AlertCode, AlertFactory, Severity, slice_label
from inline.registry import register
from inline.trace import Trace

_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
_NAV = 1 << (ismrmrd.ACQ_IS_NAVIGATION_DATA - 1)
_CAL = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)
_LAST_IN_SLICE = 1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1)
#: Gadgetron's relative receiver noise bandwidth when the header does not give one.
_DEFAULT_RECEIVER_NOISE_BANDWIDTH = 0.793
#: E|z| / sqrt(E|z|^2) of a circular complex Gaussian sample (Rayleigh mean).
_RAYLEIGH_MEAN = float(np.sqrt(np.pi) / 2)

#: (slice, contrast, phase, repetition, set): the buffer a readout belongs to.
Key = tuple[int, int, int, int, int]


def _key(acq: ismrmrd.Acquisition) -> Key:
    i = acq.idx
    return (int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """``|<a, b>| / (|a| |b|)`` of two complex arrays: 1 for equal up to a global phase/scale."""
    na, nb = float(np.vdot(a, a).real), float(np.vdot(b, b).real)
    if na <= 0 or nb <= 0:
        return 1.0
    return float(abs(np.vdot(a, b)) / np.sqrt(na * nb))


@dataclass
class _SliceState:
    """Per buffer (slice, contrast, phase, repetition, set): lines seen, spike references, centre."""

    lines: set[tuple[int, int]] = field(default_factory=set)  # (kz, ky) acquired
    imaging_ky: set[int] = field(default_factory=set)  # ky of imaging (lattice) lines
    imaging_kz: set[int] = field(default_factory=set)
    profiles: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> sum_c |x|
    centre: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (kz, ky) -> (coils, w) complex
    dropout_done: bool = False
    motion_done: bool = False
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
    * ``coil_noise`` / ``coil_dropout`` from the noise scan: a channel's noise std above
      ``coil_noise_ratio`` or below ``coil_dropout_noise_ratio`` times the median channel.
    * ``coil_dropout`` in imaging: on the k-space centre lines, a channel whose
      centre-to-edge power ratio is below ``dropout_signal_ratio`` (noise only, or zeros)
      while it had signal before (own history) or the median channel has signal.
    * ``coil_noise`` in imaging: a channel's high-kx noise power, relative to its noise scan,
      above ``coil_noise_ratio**2`` times that of the median channel (over
      ``noise_window_lines`` lines).
    * ``incomplete_coverage``: at LAST_IN_SLICE (and at close for unfinished buffers), the
      ky/kz lattice lines (header encoding limits, acceleration factor, lattice offset taken
      from the acquired imaging lines) that never arrived.
    * ``motion``: the complex k-space centre (``centre_fraction`` of the matrix in ky, kz and
      kx, all channels) of each repetition against the first, once all its centre lines are
      in: ``1 - |<a, b>| / (|a| |b|)`` above ``motion_threshold`` (insensitive to a global
      phase or scale, sensitive to translation, rotation and coil-relative motion);
      navigator readouts (IS_NAVIGATION_DATA) likewise against the first navigator.

    Noise statistics go into ``context.shared["noise"]``: ``std`` (coils,) [scanner units,
    sqrt(E|n|^2)], ``covariance`` (coils, coils) complex128, ``dwell_time_us``,
    ``receiver_noise_bandwidth``, ``samples``, ``channels``.
    """

    class Params(GadgetParams):
        spike_ratio: float = Field(
            6.0,
            gt=1,
            description="A spike's channel-summed magnitude over the larger of its kx running median and the "
            "neighbouring line at the same kx. Echo-peak lines differ from their neighbours by < 3x; 6 keeps a margin.",
        )
        spike_noise_ratio: float = Field(
            10.0,
            gt=0,
            description="A spike must also exceed this many times the channel-summed noise mean (noise-only samples "
            "of 8+ channels fluctuate by ~20%, so 10x never fires on noise).",
        )
        spike_median_window: int = Field(9, ge=3, description="Running-median window along kx [samples].")
        coil_noise_ratio: float = Field(
            3.0,
            gt=1,
            description="Noise std of a channel over the median channel that flags it noisy (receive chains of one "
            "array differ by < 2x; 3x is a fault).",
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
            description="1 - correlation of the k-space centre against the first repetition; clean repetitions "
            "give < 0.002 at SNR 10+, a 1-pixel shift ~0.02-0.05.",
        )
        check_coverage: bool = Field(True, description="Report missing ky/kz lines.")

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
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
        self._nav_ref: dict[int, np.ndarray] = {}
        self._dropout_hist: np.ndarray | None = None  # (coils,) max centre/edge ratio seen
        self._edge_power: list[np.ndarray] = []  # per-line (coils,) edge power, rolling window
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
        noisy = [int(c) for c in np.flatnonzero(ratio > self.params.coil_noise_ratio) if int(c) not in self._noisy]
        dead = [int(c) for c in np.flatnonzero(ratio < self.params.coil_dropout_noise_ratio) if int(c) not in self._dead]
        if noisy:
            self._noisy.update(noisy)
            yield self._alert(
                AlertCode.COIL_NOISE, Severity.WARNING,
                f"Noisy receive channel(s) {noisy} in series {self.series}: noise scan std "
                f"{', '.join(f'{ratio[c]:.1f}x' for c in noisy)} the median channel.",
                "Check the coil connection and plug; if it persists deselect the element or swap the coil, "
                "and repeat the series if images look grainy.",
                trace, value=float(ratio[noisy].max()), threshold=self.params.coil_noise_ratio, unit="x median std",
                evidence={"channels": noisy, "std_ratio": [round(float(ratio[c]), 3) for c in noisy],
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
        power = data.real * data.real + data.imag * data.imag  # (coils, samples) |x|^2
        nx = data.shape[1]
        e = max(2, int(nx * self.params.edge_fraction))
        edge = 0.5 * (power[:, :e].mean(axis=1) + power[:, -e:].mean(axis=1))  # (coils,)
        yield from self._spike(item, trace, st, key, kz, ky, np.sqrt(power), edge)
        if self._outer_line(ky):
            yield from self._imaging_noise(item, trace, key, edge)
        centre = self._centre_line(ky, kz)
        if centre:
            yield from self._dropout(item, trace, key, st, power, edge, ky == self._ky_lim[2])
            c0 = int(item.center_sample) if 0 < item.center_sample < nx else nx // 2
            w = max(2, int(round(nx * self.params.centre_fraction)))
            st.centre[(kz, ky)] = np.array(data[:, max(0, c0 - w) : c0 + w + 1])
            yield from self._motion(trace, key, st, final=False)
        if flags & _LAST_IN_SLICE:
            for k, s in self._slices.items():
                if k[0] == key[0] and k[3] == key[3] and k[4] == key[4] and not s.finished:
                    s.finished = True
                    yield from self._motion(s.last_trace or trace, k, s, final=True)
                    yield from self._coverage(s.last_trace or trace, k, s)
                    s.profiles.clear()

    def _outer_line(self, ky: int) -> bool:
        """A line in the outer half of ky, whose high-kx samples are nearly noise only."""
        lo, hi, c = self._ky_lim
        return abs(ky - c) >= (hi - lo + 1) // 4

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
        win = np.lib.stride_tricks.sliding_window_view(np.pad(m, half, mode="edge"), p.spike_median_window)
        med = np.partition(win, half, axis=1)[:, half]
        ref = med
        neighbour = None
        for d in (1, -1, 2, -2, 3, -3):
            neighbour = st.profiles.get((kz, ky + d))
            if neighbour is not None and neighbour.shape[0] == nx:
                break
            neighbour = None
        st.profiles[(kz, ky)] = m
        # noise floor: channel-summed Rayleigh mean of the edge (high-kx) noise
        floor = _RAYLEIGH_MEAN * float(np.sqrt(np.maximum(edge, 0)).sum())
        if self.noise_std is not None and self.noise_std.shape[0] == mag.shape[0]:
            floor = min(floor, _RAYLEIGH_MEAN * float(self.noise_std.sum())) if floor > 0 else floor
        cand = np.flatnonzero((m > p.spike_ratio * med) & (m > p.spike_noise_ratio * floor))
        if cand.size == 0:
            return
        if neighbour is not None:
            nb = np.maximum(neighbour, np.maximum(np.roll(neighbour, 1), np.roll(neighbour, -1)))
            cand = cand[m[cand] > p.spike_ratio * nb[cand]]
            ref = np.maximum(med, nb)
        else:  # first line of a buffer: only the running median; demand twice the margin
            cand = cand[m[cand] > 2 * p.spike_ratio * med[cand]]
        if cand.size == 0:
            return
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
        if self.noise_std is None or self.noise_std.shape[0] != edge.shape[0] or edge.shape[0] < 3:
            return
        self._edge_power.append(edge)
        if len(self._edge_power) < self.params.noise_window_lines:
            return
        # median over lines: robust to lines whose edges carry signal (k-space centre)
        power = np.median(np.asarray(self._edge_power), axis=0)
        self._edge_power.clear()
        ref = np.maximum(self.noise_std**2, 1e-30)
        rel = power / ref
        med = float(np.median(rel))
        if med <= 0:
            return
        ratio = np.sqrt(rel / med)
        self.imaging_noise_ratio = ratio
        noisy = [int(c) for c in np.flatnonzero(ratio > self.params.coil_noise_ratio) if int(c) not in self._noisy]
        if not noisy:
            return
        self._noisy.update(noisy)
        s, rep = key[0], key[3]
        yield self._alert(
            AlertCode.COIL_NOISE, Severity.WARNING,
            f"Noisy receive channel(s) {noisy} in series {self.series} from {slice_label([s])}, repetition {rep}: "
            f"imaging noise {', '.join(f'{ratio[c]:.1f}x' for c in noisy)} the noise-scan level (relative to the "
            "median channel).",
            "Check the coil plug and cable and for electronic devices near the bore; repeat the series if images "
            "look grainy or striped.",
            trace, slices=[s], repetition=rep, value=float(ratio[noisy].max()), threshold=self.params.coil_noise_ratio,
            unit="x noise-scan std",
            evidence={"channels": noisy, "std_ratio": [round(float(ratio[c]), 3) for c in noisy],
                      "source": "imaging_high_kx", "scan_counter": int(acq.scan_counter)},
        ), trace

    def _dropout(self, acq, trace, key: Key, st: _SliceState, power: np.ndarray, edge: np.ndarray, at_centre: bool
                 ) -> Iterator[Output]:
        """Decide once per buffer, on the k-space-centre line (kz centre in 3D) alone: lines off the centre
        can cancel in one channel (coil phase), the centre line carries every channel's full signal."""
        p = self.params
        kz_ok = self._kz_lim[1] <= self._kz_lim[0] or int(acq.idx.kspace_encode_step_2) == self._kz_lim[2]
        if st.dropout_done or not (at_centre and kz_ok):
            return
        st.dropout_done = True
        nx = power.shape[1]
        c0 = int(acq.center_sample) if 0 < acq.center_sample < nx else nx // 2
        w = max(2, int(round(nx * p.centre_fraction)))
        centre = power[:, max(0, c0 - w) : c0 + w + 1].mean(axis=1)
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
        yield self._alert(
            AlertCode.COIL_DROPOUT, Severity.CRITICAL,
            f"Receive channel(s) {new} dropped out in series {self.series} at {slice_label([s])}, repetition {rep}: "
            "no signal above noise at the k-space centre.",
            "Check the coil plug and that the patient has not moved off the coil; reconnect or swap the coil and "
            "repeat the series (shading or signal voids expected).",
            trace, slices=[s], repetition=rep, value=float(ratio[new].max()), threshold=p.dropout_signal_ratio,
            unit="centre/edge power",
            evidence={"channels": new, "centre_to_edge": [round(float(ratio[c]), 3) for c in new],
                      "history": [round(float(hist[c]), 1) for c in new], "median_channel": round(med, 1),
                      "zeros": [int(c) for c in np.flatnonzero(silent)], "scan_counter": int(acq.scan_counter),
                      "ky": int(acq.idx.kspace_encode_step_1)},
        ), trace

    # -- motion ---------------------------------------------------------------------------
    def _motion(self, trace: Trace, key: Key, st: _SliceState, final: bool) -> Iterator[Output]:
        if st.motion_done or key[3] == 0:
            return
        ref_key = (key[0], key[1], key[2], 0, key[4])
        ref = self._slices.get(ref_key)
        if ref is None or not ref.centre:
            return
        common = sorted(set(ref.centre) & set(st.centre))
        if not final and len(common) < len(ref.centre):
            return  # wait for every centre line the first repetition had
        if not common:
            return
        st.motion_done = True
        try:
            a = np.concatenate([ref.centre[k].ravel() for k in common])
            b = np.concatenate([st.centre[k].ravel() for k in common])
        except ValueError:
            return
        change = 1.0 - _correlation(a, b)
        mag_change = float(abs(np.linalg.norm(b) - np.linalg.norm(a)) / max(float(np.linalg.norm(a)), 1e-30))
        if change <= self.params.motion_threshold:
            return
        s, rep = key[0], key[3]
        if not self._once((AlertCode.MOTION, s, rep)):
            return
        yield self._alert(
            AlertCode.MOTION, Severity.WARNING,
            f"Motion in series {self.series}, {slice_label([s])}, repetition {rep}: the k-space centre changed by "
            f"{100 * change:.1f}% against repetition 0.",
            "Ask the patient to keep still and repeat the series (or the affected repetitions).",
            trace, slices=[s], repetition=rep, value=change, threshold=self.params.motion_threshold,
            unit="1 - correlation",
            evidence={"reference_repetition": 0, "centre_lines": len(common), "magnitude_change": round(mag_change, 4),
                      "source": "kspace_centre"},
        ), trace

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
                yield from self._coverage(s.last_trace, k, s)
