"""Fault injection into raw scans, for testing and evaluating the QC gadgets.

Each injector takes a :class:`~inline.mrdfile.RawScan` and returns an :class:`Injection`:
a new scan with one kind of acquisition fault (the input is never modified; waveforms are
shared, unchanged) and the ground truth of what was done. The faults model what
radiographers meet on real scanners:

=================  ==========================================  =========================
injector           models                                      QC alert it should raise
=================  ==========================================  =========================
:func:`rf_spike`   RF spikes / "herringbone": impulsive noise   ``rf_spike``
                   on single k-space samples
:func:`dead_coil`  a receive element or preamp failing (zero   ``coil_dropout``
                   signal or noise only) from some point on
:func:`noisy_coil` one channel much noisier (bad preamp,        ``coil_noise``
                   loose connector)
:func:`rigid_motion`, :func:`repetition_motion`               ``motion``
                   in-plane rigid head motion during the scan
                   or between repetitions
:func:`raised_noise`  a lower SNR than the noise scan predicts  ``low_snr``
                   (interference, wrong coil, lost signal)
:func:`missing_lines`  readouts lost (aborted scan, dropped     ``incomplete_coverage``
                   packets)
:func:`nyquist_ghost`  even/odd line phase error (N/2 ghost)     ``ghosting``
=================  ==========================================  =========================

Conventions: the k-space grid position of a readout follows
:class:`gadgets.accumulate.AcquisitionAccumulateTrigger` (``ky = kspace_encode_step_1 +
clamp(encoded_y // 2 - ky_center)``) and asymmetric echoes are placed as
:func:`gadgets._common.readout_placement` does, so "the centre", "line parity" and motion
are those of the reconstructed image. "Imaging lines" are readouts without a non-imaging
flag (noise, navigator, phase correction, ...); calibration lines count as imaging lines.
Time fractions are fractions of the imaging lines in streaming order (the scanner's time
order). Noise levels are per channel in imaging-readout units: from the noise scan, scaled
by its dwell time and the header's relative receiver noise bandwidth as Gadgetron's noise
adjust does, or, without a noise scan, estimated from the k-space periphery (see
:func:`noise_covariance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ismrmrd
import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from inline.buffers import EncodingInfo
from inline.mrdfile import RawScan
from inline.protocol import parse_header
from gadgets._common import NON_IMAGING_MASK
from inline.qc.alert import AlertCode

#: Relative receiver noise bandwidth used when the header does not give one (Siemens, Gadgetron default).
DEFAULT_RELATIVE_RECEIVER_NOISE_BANDWIDTH = 0.793

_NON_IMAGING_MASK = NON_IMAGING_MASK  # the accumulator's definition: these lines never reach an image
_NOISE_BIT = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
#: FIRST_IN_* / LAST_IN_* loop flags (encode step 1 .. segment) and LAST_IN_MEASUREMENT.
_FIRST_MASK = sum(1 << (f - 1) for f in range(1, 18, 2))
_LAST_MASK = sum(1 << (f - 1) for f in range(2, 19, 2)) | (1 << (ismrmrd.ACQ_LAST_IN_MEASUREMENT - 1))

FaultKind = Literal[
    "rf_spike", "dead_coil", "noisy_coil", "motion", "raised_noise", "missing_lines", "nyquist_ghost"
]

#: The alert code each fault kind should raise.
EXPECTED_CODE: dict[str, AlertCode] = {
    "rf_spike": AlertCode.RF_SPIKE,
    "dead_coil": AlertCode.COIL_DROPOUT,
    "noisy_coil": AlertCode.COIL_NOISE,
    "motion": AlertCode.MOTION,
    "raised_noise": AlertCode.LOW_SNR,
    "missing_lines": AlertCode.INCOMPLETE_COVERAGE,
    "nyquist_ghost": AlertCode.GHOSTING,
}


@dataclass
class Spike:
    """One injected RF spike.

    Attributes:
        item: index of the readout in ``Injection.scan.items``.
        sample: sample index in the readout (as delivered, oversampling included).
        channels: channels that received it.
        values: complex value added per channel (same order as ``channels``), in the data's units.
        amplitude: ``|value|`` [data units]; amplitude_rel: the same relative to the largest
            k-space magnitude of the readout's slice (all its channels and lines).
    """

    item: int
    sample: int
    channels: list[int]
    values: list[complex]
    amplitude: float
    amplitude_rel: float


@dataclass
class Injection:
    """A faulty scan and the ground truth of its fault.

    Attributes:
        scan: the new scan (shares no acquisition or array with the input).
        kind: fault kind (:data:`FaultKind`); code: the alert code it should raise.
        params: the injector's arguments (JSON-serialisable).
        items: indices into ``scan.items`` of the readouts the fault changed (for
            :func:`missing_lines`: the readouts kept whose flags were changed; the removed
            ones are in ``removed``, indices into the *input* scan's items).
        first_item: the earliest changed readout (in ``scan.items``), the one that could
            reveal the fault first; None when none was changed.
        slices, repetitions: ISMRMRD slice / repetition indices affected.
        spikes: the spikes of :func:`rf_spike`.
        removed: input-scan item indices dropped by :func:`missing_lines`.
        details: other ground truth (e.g. noise levels used).
    """

    scan: RawScan
    kind: str
    params: dict[str, Any]
    items: list[int] = field(default_factory=list)
    first_item: int | None = None
    slices: list[int] = field(default_factory=list)
    repetitions: list[int] = field(default_factory=list)
    spikes: list[Spike] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> AlertCode:
        return EXPECTED_CODE[self.kind]


# --------------------------------------------------------------------------------------
# Scan layout
# --------------------------------------------------------------------------------------


def copy_scan(scan: RawScan) -> RawScan:
    """A copy of ``scan`` whose acquisitions (header, data, trajectory) are independent."""
    items = []
    for it in scan.items:
        if isinstance(it, ismrmrd.Acquisition):
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(it.getHead())
            items.append(ismrmrd.Acquisition(head, np.array(it.data, np.complex64), np.array(it.traj, np.float32)))
        else:
            items.append(it)  # waveforms are never changed
    return RawScan(scan.header_xml, items)


def _is_acq(it: Any) -> bool:
    return isinstance(it, ismrmrd.Acquisition)


@dataclass
class _Line:
    item: int  # index in scan.items
    group: tuple[int, int, int, int, int, int]  # encoding space, slice, contrast, phase, repetition, set
    z: int  # kz grid index
    y: int  # ky grid index
    ny: int  # ky grid size
    nz: int


class _Layout:
    """Where every readout of a scan sits: noise scan, imaging lines and their k-space grid."""

    def __init__(self, scan: RawScan):
        self.scan = scan
        self.header = parse_header(scan.header_xml)
        self._enc: dict[int, tuple[EncodingInfo, int, int]] = {}
        self.noise: list[int] = []
        self.lines: list[_Line] = []
        for i, it in enumerate(scan.items):
            if not _is_acq(it):
                continue
            if it.flags & _NOISE_BIT:
                self.noise.append(i)
                continue
            if it.flags & _NON_IMAGING_MASK:
                continue
            enc, oy, oz = self.encoding(it.encoding_space_ref)
            ny, nz = enc.encoded_matrix[1], max(enc.encoded_matrix[2], 1)
            idx = it.idx
            y = min(max(idx.kspace_encode_step_1 + oy, 0), ny - 1)
            z = min(max(idx.kspace_encode_step_2 + oz, 0), nz - 1)
            g = (it.encoding_space_ref, idx.slice, idx.contrast, idx.phase, idx.repetition, idx.set)
            self.lines.append(_Line(i, g, z, y, ny, nz))

    def encoding(self, space: int) -> tuple[EncodingInfo, int, int]:
        """Encoding and the (ky, kz) grid offsets, the accumulate gadget's rule."""
        if space not in self._enc:
            enc = EncodingInfo.from_header(self.header, space)
            ny, nz = enc.encoded_matrix[1], max(enc.encoded_matrix[2], 1)

            def offset(n: int, center: int, maximum: int) -> int:
                return min(max(n // 2 - center, 0), max(n - 1 - maximum, 0))

            self._enc[space] = (enc, offset(ny, enc.ky_center, enc.ky_max), offset(nz, enc.kz_center, enc.kz_max))
        return self._enc[space]

    def groups(self) -> dict[tuple, list[_Line]]:
        out: dict[tuple, list[_Line]] = {}
        for ln in self.lines:
            out.setdefault(ln.group, []).append(ln)
        return out

    def acq(self, i: int) -> ismrmrd.Acquisition:
        return self.scan.items[i]

    def relative_bandwidth(self) -> float:
        asi = getattr(self.header, "acquisitionSystemInformation", None)
        bw = getattr(asi, "relativeReceiverNoiseBandwidth", None) if asi is not None else None
        return float(bw) if bw else DEFAULT_RELATIVE_RECEIVER_NOISE_BANDWIDTH

    def lines_after(self, fraction: float) -> list[_Line]:
        """Imaging lines from ``fraction`` of the imaging lines (streaming order) on."""
        start = int(math.ceil(fraction * len(self.lines) - 1e-9))
        return self.lines[start:]


def _readout_placement(n: int, c: int) -> tuple[int, int]:
    """Symmetric readout length and offset of an (a)symmetric echo (``gadgets._common.readout_placement``)."""
    if c <= 0 or c >= n or c == n // 2:
        return n, 0
    n_full = 2 * max(c, n - c)
    return n_full, n_full // 2 - c


def _finish(scan: RawScan, kind: str, params: dict[str, Any], changed: Sequence[int], **extra: Any) -> Injection:
    changed = sorted(set(changed))
    acqs = [scan.items[i] for i in changed if _is_acq(scan.items[i])]
    imaging = [a for a in acqs if not a.flags & _NON_IMAGING_MASK]
    return Injection(
        scan=scan,
        kind=kind,
        params=params,
        items=list(changed),
        first_item=changed[0] if changed else None,
        slices=sorted({a.idx.slice for a in imaging}),
        repetitions=sorted({a.idx.repetition for a in imaging}),
        **extra,
    )


def _complex_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Circular complex Gaussian with ``E|z|^2 = 1``, complex64."""
    z = rng.standard_normal(shape + (2,), dtype=np.float32) * np.float32(math.sqrt(0.5))
    return z.view(np.complex64)[..., 0]


# --------------------------------------------------------------------------------------
# Noise levels
# --------------------------------------------------------------------------------------


def noise_covariance(scan: RawScan) -> tuple[np.ndarray, str]:
    """Noise covariance ``(coils, coils)`` complex128 of one imaging sample, and its source.

    From the noise scan (``ACQ_IS_NOISE_MEASUREMENT`` readouts) when there is one: the
    sample covariance scaled by ``noise_dwell / (imaging_dwell * relative_bandwidth)``, the
    bandwidth correction Gadgetron's noise adjust applies (source ``"noise_scan"``).
    Otherwise a diagonal estimate from the k-space periphery (outer eighth of ky on both
    sides, outer eighth of the readout on both ends), ``median|z| / sqrt(ln 2)`` per channel
    (source ``"kspace_periphery"``); an over-estimate where the object still has signal there.
    """
    lay = _Layout(scan)
    if lay.noise and lay.lines:
        x = np.concatenate([np.asarray(lay.acq(i).data, np.complex128) for i in lay.noise], axis=1)
        cov = x @ x.conj().T / x.shape[1]
        noise_dwell = float(lay.acq(lay.noise[0]).sample_time_us)
        dwell = float(lay.acq(lay.lines[0].item).sample_time_us)
        if noise_dwell > 0 and dwell > 0:
            cov *= noise_dwell / (dwell * lay.relative_bandwidth())
        return cov, "noise_scan"
    if not lay.lines:
        raise ValueError("scan has no imaging readouts to estimate the noise from")
    samples = []
    for ln in lay.lines:
        edge = max(1, ln.ny // 8)
        if edge <= ln.y < ln.ny - edge:
            continue
        d = lay.acq(ln.item).data
        m = max(1, d.shape[1] // 8)
        samples.append(np.concatenate([d[:, :m], d[:, -m:]], axis=1))
    if not samples:  # too few lines: use every line's readout ends
        samples = [lay.acq(ln.item).data[:, [0, -1]] for ln in lay.lines]
    x = np.abs(np.concatenate(samples, axis=1))
    sigma = np.median(x, axis=1) / math.sqrt(math.log(2.0))
    return np.diag(sigma.astype(np.float64) ** 2).astype(np.complex128), "kspace_periphery"


def channel_noise_std(scan: RawScan) -> np.ndarray:
    """Per-channel noise standard deviation of one complex imaging sample, ``(coils,)``; see :func:`noise_covariance`."""
    cov, _ = noise_covariance(scan)
    return np.sqrt(np.real(np.diag(cov)))


def _noise_scan_std(lay: _Layout) -> np.ndarray | None:
    if not lay.noise:
        return None
    x = np.concatenate([np.asarray(lay.acq(i).data, np.complex128) for i in lay.noise], axis=1)
    return np.sqrt(np.mean(np.abs(x) ** 2, axis=1))


def _extra_std(factor: float) -> float:
    if not factor >= 1.0:
        raise ValueError(f"noise factor must be >= 1 (resulting / original noise std), got {factor}")
    return math.sqrt(factor * factor - 1.0)


# --------------------------------------------------------------------------------------
# Injectors
# --------------------------------------------------------------------------------------


def rf_spike(
    scan: RawScan,
    amplitude_rel: float = 0.1,
    n_spikes: int = 1,
    seed: int = 0,
    channels: int | Sequence[int] | None = None,
) -> Injection:
    """RF spikes: impulsive samples added to random imaging readouts.

    Models a spark or arcing in the RF room (broadband impulse picked up by the receive
    array in one or a few samples), which shows in the image as a stripe pattern over the
    whole slice ("herringbone"). Each spike lands on a random imaging readout and sample
    (distinct pairs) and is added, with a random phase per channel, to the chosen channels.

    Args:
        amplitude_rel: spike magnitude relative to the largest k-space magnitude of the
            readout's slice (all channels and lines of that slice, repetition, ...): 0.02
            is barely visible, 0.1 clearly, 0.5 severe.
        n_spikes: number of spikes (readout, sample pairs).
        seed: seeds the positions and phases.
        channels: None: every channel; an int ``k``: ``k`` random channels per spike; a
            sequence: those channels.

    Returns:
        the :class:`Injection`, its ``spikes`` the ground truth.
    """
    if amplitude_rel <= 0 or n_spikes < 1:
        raise ValueError(f"need amplitude_rel > 0 and n_spikes >= 1, got {amplitude_rel}, {n_spikes}")
    out = copy_scan(scan)
    lay = _Layout(out)
    if not lay.lines:
        raise ValueError("scan has no imaging readouts")
    rng = np.random.default_rng(seed)
    peak: dict[tuple, float] = {}
    for g, lines in lay.groups().items():
        peak[g] = max(float(np.max(np.abs(lay.acq(ln.item).data))) for ln in lines)
    chosen: set[tuple[int, int]] = set()
    spikes: list[Spike] = []
    limit = sum(lay.acq(ln.item).number_of_samples for ln in lay.lines)
    if n_spikes > limit:
        raise ValueError(f"{n_spikes} spikes do not fit the scan's {limit} samples")
    while len(spikes) < n_spikes:
        ln = lay.lines[int(rng.integers(len(lay.lines)))]
        acq = lay.acq(ln.item)
        s = int(rng.integers(acq.number_of_samples))
        if (ln.item, s) in chosen:
            continue
        chosen.add((ln.item, s))
        n_ch = acq.active_channels
        if channels is None:
            chans = list(range(n_ch))
        elif isinstance(channels, int):
            chans = sorted(int(c) for c in rng.choice(n_ch, size=min(channels, n_ch), replace=False))
        else:
            chans = [int(c) for c in channels]
        amp = amplitude_rel * peak[ln.group]
        values = amp * np.exp(1j * rng.uniform(-np.pi, np.pi, size=len(chans)))
        acq.data[chans, s] += values.astype(np.complex64)
        spikes.append(Spike(ln.item, s, chans, [complex(v) for v in values], float(amp), float(amplitude_rel)))
    params = {"amplitude_rel": amplitude_rel, "n_spikes": n_spikes, "seed": seed, "channels": channels if not isinstance(channels, Sequence) else list(channels)}
    return _finish(out, "rf_spike", params, [sp.item for sp in spikes], spikes=spikes)


def dead_coil(
    scan: RawScan,
    channel: int = 0,
    from_fraction: float = 0.5,
    mode: Literal["zeros", "noise"] = "zeros",
    seed: int = 0,
    include_noise_scan: bool | None = None,
) -> Injection:
    """A receive channel that stops delivering signal from some point of the scan on.

    Models a broken coil element, connector or receiver channel: ``mode="zeros"`` (the
    channel delivers zeros: dead receiver / ADC) or ``mode="noise"`` (the element is
    detached but its preamp still delivers noise: the signal is replaced by Gaussian noise
    of the channel's own imaging noise level).

    Args:
        channel: channel index.
        from_fraction: fraction of the imaging lines (streaming order) after which the channel
            is dead; 0 = dead for the whole scan.
        mode: ``"zeros"`` or ``"noise"``.
        seed: seeds the noise of ``mode="noise"``.
        include_noise_scan: also zero the channel in the noise scan (only for
            ``mode="zeros"``); default: when ``from_fraction == 0`` (dead from the start).
    """
    if not 0.0 <= from_fraction < 1.0:
        raise ValueError(f"from_fraction must be in [0, 1), got {from_fraction}")
    if mode not in ("zeros", "noise"):
        raise ValueError(f"mode must be 'zeros' or 'noise', got {mode!r}")
    out = copy_scan(scan)
    lay = _Layout(out)
    if include_noise_scan is None:
        include_noise_scan = from_fraction == 0.0
    rng = np.random.default_rng(seed)
    sigma = float(channel_noise_std(scan)[channel]) if mode == "noise" else 0.0
    changed = []
    if include_noise_scan and mode == "zeros":
        for i in lay.noise:
            lay.acq(i).data[channel] = 0
            changed.append(i)
    for ln in lay.lines_after(from_fraction):
        d = lay.acq(ln.item).data
        d[channel] = 0 if mode == "zeros" else sigma * _complex_normal(rng, (d.shape[1],))
        changed.append(ln.item)
    params = {"channel": channel, "from_fraction": from_fraction, "mode": mode, "seed": seed, "include_noise_scan": include_noise_scan}
    return _finish(out, "dead_coil", params, changed, details={"noise_std": sigma})


def noisy_coil(
    scan: RawScan,
    channel: int = 0,
    factor: float = 3.0,
    seed: int = 0,
    include_noise_scan: bool = True,
) -> Injection:
    """One channel with more noise than it should have, in the noise scan and the data.

    Models a failing preamplifier, a loose connector or a coil element picking up
    interference: independent complex Gaussian noise added to the channel so that its noise
    standard deviation becomes ``factor`` times its own (added std ``sqrt(factor^2 - 1)``
    times the original, measured in the noise scan, or in the k-space periphery without one).

    Args:
        channel: channel index.
        factor: resulting / original noise standard deviation of the channel (>= 1).
        seed: seeds the noise.
        include_noise_scan: add it to the noise-scan readouts too (a hardware fault shows
            there); False models interference that starts after the noise scan.
    """
    extra = _extra_std(factor)
    out = copy_scan(scan)
    lay = _Layout(out)
    rng = np.random.default_rng(seed)
    sigma = float(channel_noise_std(scan)[channel])
    ns_std = _noise_scan_std(_Layout(scan))
    changed = []
    if include_noise_scan and ns_std is not None:
        for i in lay.noise:
            d = lay.acq(i).data
            d[channel] += np.complex64(extra * ns_std[channel]) * _complex_normal(rng, (d.shape[1],))
            changed.append(i)
    for ln in lay.lines:
        d = lay.acq(ln.item).data
        d[channel] += np.complex64(extra * sigma) * _complex_normal(rng, (d.shape[1],))
        changed.append(ln.item)
    params = {"channel": channel, "factor": factor, "seed": seed, "include_noise_scan": include_noise_scan}
    return _finish(out, "noisy_coil", params, changed, details={"noise_std": sigma, "added_std": extra * sigma})


def raised_noise(scan: RawScan, factor: float = 2.0, seed: int = 0) -> Injection:
    """More noise in every imaging readout than the noise scan predicts: the SNR drops.

    Models broadband interference during imaging, a wrong or detuned coil, or a lost
    signal level (the same effect on the image): complex Gaussian noise with the
    covariance of the scan's own noise (:func:`noise_covariance`) times ``factor^2 - 1``
    is added to every imaging readout, so the noise std becomes ``factor`` times the
    original and the image SNR drops by ``factor``. The noise scan is not changed.

    Args:
        factor: resulting / original noise standard deviation (>= 1); 2 halves the SNR.
        seed: seeds the noise.
    """
    extra = _extra_std(factor)
    out = copy_scan(scan)
    lay = _Layout(out)
    cov, source = noise_covariance(scan)
    coils = cov.shape[0]
    jitter = 1e-9 * float(np.real(np.trace(cov))) / coils
    chol = np.linalg.cholesky(cov + jitter * np.eye(coils)).astype(np.complex64) * np.float32(extra)
    rng = np.random.default_rng(seed)
    for ln in lay.lines:
        d = lay.acq(ln.item).data
        d += chol @ _complex_normal(rng, d.shape)
    params = {"factor": factor, "seed": seed}
    details = {"noise_source": source, "noise_std": np.sqrt(np.real(np.diag(cov))).tolist()}
    return _finish(out, "raised_noise", params, [ln.item for ln in lay.lines], details=details)


def missing_lines(
    scan: RawScan,
    n_lines: int | None = None,
    fraction: float | None = None,
    region: Literal["centre", "random", "edge"] = "random",
    seed: int = 0,
    slices: Sequence[int] | None = None,
    keep_trigger_flags: bool = True,
) -> Injection:
    """Imaging readouts removed from the stream: k-space left incomplete.

    Models dropped data (network or receiver buffer loss), a scan aborted early
    (``region="edge"``: the last lines of a linear ky order) or a sequence that skipped
    its centre (``"centre"``). The same ky positions are removed from every buffer
    (slice, contrast, phase, repetition, set) of the chosen slices.

    Args:
        n_lines: lines removed per buffer; or
        fraction: fraction of each buffer's lines removed (rounded, at least 1).
        region: ``"centre"``: the lines nearest the k-space centre; ``"edge"``: the lines
            with the highest ky (one side); ``"random"``: random lines (``seed``).
        slices: ISMRMRD slice indices affected (None: all).
        keep_trigger_flags: move the LAST_IN_* flags of a removed line to the last kept
            line of its buffer before it (FIRST_IN_* to the next kept one), so buffers are
            still triggered as the scanner would; False drops them with the line.
    """
    if (n_lines is None) == (fraction is None):
        raise ValueError("give exactly one of n_lines and fraction")
    if region not in ("centre", "random", "edge"):
        raise ValueError(f"region must be 'centre', 'random' or 'edge', got {region!r}")
    lay = _Layout(scan)
    rng = np.random.default_rng(seed)
    remove: set[int] = set()
    move_flags: dict[int, int] = {}
    groups = lay.groups()
    positions_by_shape: dict[tuple, np.ndarray] = {}
    for g, lines in groups.items():
        if slices is not None and g[1] not in slices:
            continue
        keys = sorted({(ln.z, ln.y) for ln in lines})
        k = n_lines if n_lines is not None else max(1, int(round(fraction * len(keys))))
        k = min(k, len(keys) - 1)
        if k <= 0:
            continue
        shape_key = (tuple(keys), lines[0].ny)
        if shape_key not in positions_by_shape:  # same ky positions in every buffer of the same sampling
            ny = lines[0].ny
            if region == "centre":
                order = sorted(keys, key=lambda zy: (abs(zy[1] - ny // 2), zy[1], zy[0]))
            elif region == "edge":
                order = sorted(keys, key=lambda zy: (-zy[1], zy[0]))
            else:
                order = [keys[i] for i in rng.permutation(len(keys))]
            positions_by_shape[shape_key] = np.array(order[:k])
        drop = {tuple(p) for p in positions_by_shape[shape_key]}
        kept = [ln for ln in lines if (ln.z, ln.y) not in drop]
        for ln in lines:
            if (ln.z, ln.y) not in drop:
                continue
            remove.add(ln.item)
            flags = lay.acq(ln.item).flags
            if not keep_trigger_flags:
                continue
            before = [k_.item for k_ in kept if k_.item < ln.item]
            after = [k_.item for k_ in kept if k_.item > ln.item]
            if flags & _LAST_MASK and before:
                move_flags[before[-1]] = move_flags.get(before[-1], 0) | (flags & _LAST_MASK)
            if flags & _FIRST_MASK and after:
                move_flags[after[0]] = move_flags.get(after[0], 0) | (flags & _FIRST_MASK)
    copied = copy_scan(scan)
    items, changed, new_index = [], [], {}
    for i, it in enumerate(copied.items):
        if i in remove:
            continue
        new_index[i] = len(items)
        if i in move_flags:
            it.flags = it.flags | move_flags[i]
        items.append(it)
    changed = [new_index[i] for i in move_flags if i in new_index]
    out = RawScan(copied.header_xml, items)
    removed = sorted(remove)
    removed_acqs = [scan.items[i] for i in removed]
    params = {"n_lines": n_lines, "fraction": fraction, "region": region, "seed": seed,
              "slices": None if slices is None else list(slices), "keep_trigger_flags": keep_trigger_flags}
    inj = _finish(out, "missing_lines", params, changed, removed=removed)
    inj.slices = sorted({a.idx.slice for a in removed_acqs})
    inj.repetitions = sorted({a.idx.repetition for a in removed_acqs})
    # the first kept readout after the first gap: the earliest the loss can be noticed
    first_gap = removed[0] if removed else None
    later = [new_index[i] for i in new_index if first_gap is not None and i > first_gap]
    inj.first_item = min(later) if later else None
    inj.details = {"lines_removed": len(removed)}
    return inj


def nyquist_ghost(scan: RawScan, phase_rad: float = 0.3, slices: Sequence[int] | None = None) -> Injection:
    """An even/odd line phase error: a Nyquist (N/2) ghost along the phase-encoding direction.

    Models the odd/even echo mismatch of EPI-like or bipolar readouts (eddy currents,
    gradient delays) in its simplest form: every odd ky grid line is multiplied by
    ``exp(i phase_rad)``. The ghost, shifted by half the FOV, has ``|tan(phase_rad / 2)|``
    of the object's amplitude (0.3 rad: 15 %).

    Args:
        phase_rad: phase error of the odd lines [rad].
        slices: ISMRMRD slice indices affected (None: all).
    """
    out = copy_scan(scan)
    lay = _Layout(out)
    rot = np.complex64(np.exp(1j * phase_rad))
    changed = []
    for ln in lay.lines:
        if (ln.y - ln.ny // 2) % 2 and (slices is None or lay.acq(ln.item).idx.slice in slices):
            lay.acq(ln.item).data[:] *= rot
            changed.append(ln.item)
    return _finish(out, "nyquist_ghost", {"phase_rad": phase_rad, "slices": None if slices is None else list(slices)}, changed)


# --------------------------------------------------------------------------------------
# Motion
# --------------------------------------------------------------------------------------


def _centred_ifft2(k: np.ndarray) -> np.ndarray:
    return sfft.fftshift(sfft.ifftn(sfft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1))


def _centred_fft2(x: np.ndarray) -> np.ndarray:
    return sfft.fftshift(sfft.fftn(sfft.ifftshift(x, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1))


def _rotate(img: np.ndarray, angle_deg: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Rotate ``(..., y, x)`` complex images in-plane about pixel ``(ny // 2, nx // 2)`` by
    ``angle_deg`` (from +x towards +y), in millimetres (anisotropic pixels allowed)."""
    ny, nx = img.shape[-2:]
    py, px = pixel_mm
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    # output (y, x) -> input: rotate the mm coordinates by -angle
    m = np.array([[c, -s * px / py], [s * py / px, c]])
    centre = np.array([ny // 2, nx // 2], float)
    offset = centre - m @ centre
    out = np.empty_like(img)
    flat_in, flat_out = img.reshape(-1, ny, nx), out.reshape(-1, ny, nx)
    for i in range(flat_in.shape[0]):
        re = ndimage.affine_transform(flat_in[i].real, m, offset, order=3, mode="constant")
        im = ndimage.affine_transform(flat_in[i].imag, m, offset, order=3, mode="constant")
        flat_out[i] = re + 1j * im
    return out


def _move(
    scan: RawScan,
    select,
    translation_mm: tuple[float, float],
    rotation_deg: float,
    kind_params: dict[str, Any],
) -> Injection:
    out = copy_scan(scan)
    lay = _Layout(out)
    dx, dy = (float(v) for v in translation_mm)
    moved_items: list[int] = []
    shifts_px: dict[str, float] = {}
    for g, lines in lay.groups().items():
        targets = [ln for ln in lines if select(ln)]
        if not targets:
            continue
        enc, _, _ = lay.encoding(g[0])
        acq0 = lay.acq(lines[0].item)
        n, c = acq0.number_of_samples, acq0.center_sample
        n_full, off = _readout_placement(n, c)
        px = enc.encoded_fov_mm[0] / enc.encoded_matrix[0]
        ny, nz = lines[0].ny, lines[0].nz
        py = enc.encoded_fov_mm[1] / ny
        shifts_px = {"x": dx / px, "y": dy / py}
        # phase ramp of a shift by (dx, dy): exp(-2 pi i (kx dx / FOVx + ky dy / FOVy)), k centred
        kx = np.arange(n_full) - n_full // 2
        ramp_x = np.exp(-2j * np.pi * kx * dx / (n_full * px)).astype(np.complex64)
        if rotation_deg:
            coils = acq0.active_channels
            grid = np.zeros((coils, nz, ny, n_full), np.complex64)
            for ln in lines:
                grid[:, ln.z, ln.y, off : off + n] = lay.acq(ln.item).data
            img = _centred_ifft2(grid)
            moved = _centred_fft2(_rotate(img, rotation_deg, (py, px))).astype(np.complex64)
        for ln in targets:
            d = lay.acq(ln.item).data
            ramp = ramp_x[off : off + n] * np.complex64(np.exp(-2j * np.pi * (ln.y - ny // 2) * dy / (ny * py)))
            src = moved[:, ln.z, ln.y, off : off + n] if rotation_deg else d
            d[:] = src * ramp[None, :]
            moved_items.append(ln.item)
    params = {**kind_params, "translation_mm": [dx, dy], "rotation_deg": float(rotation_deg)}
    return _finish(out, "motion", params, moved_items, details={"shift_px": shifts_px})


def rigid_motion(
    scan: RawScan,
    at_fraction: float = 0.5,
    translation_mm: tuple[float, float] = (0.0, 0.0),
    rotation_deg: float = 0.0,
) -> Injection:
    """In-plane rigid head motion during the scan: the object moves once and stays moved.

    Every imaging line acquired after ``at_fraction`` of the imaging lines (streaming
    order, i.e. time; interleaved slices all move at the same moment) is replaced by the
    same line of the moved object. Translation is exact, a phase ramp on the line (any
    sampling pattern). Rotation grids each buffer's lines (zeros where unsampled), inverse
    FFTs them to coil images (readout oversampling included), rotates real and imaginary
    parts (cubic spline, ``scipy.ndimage.affine_transform`` in millimetres, so anisotropic
    pixels are handled) about the FOV centre and FFTs back: exact up to interpolation for
    fully sampled buffers, approximate for undersampled ones (their aliasing rotates too).
    Through-plane motion is not modelled.

    Args:
        at_fraction: fraction of the imaging lines after which the object has moved, in [0, 1).
        translation_mm: ``(dx, dy)`` [mm] along the readout (``read_dir``) and the
            phase-encoding (``phase_dir``) axes of the reconstructed image; the pixel
            shifts use the header's encoded FOV / matrix.
        rotation_deg: in-plane rotation [deg], from the readout axis towards the
            phase-encoding axis, about the FOV centre.
    """
    if not 0.0 <= at_fraction < 1.0:
        raise ValueError(f"at_fraction must be in [0, 1), got {at_fraction}")
    lay = _Layout(scan)
    after = {ln.item for ln in lay.lines_after(at_fraction)}
    inj = _move(scan, lambda ln: ln.item in after, translation_mm, rotation_deg, {"at_fraction": at_fraction})
    return inj


def repetition_motion(
    scan: RawScan,
    repetition: int = 1,
    translation_mm: tuple[float, float] = (0.0, 0.0),
    rotation_deg: float = 0.0,
) -> Injection:
    """Rigid motion between repetitions: from repetition ``repetition`` on, the object is moved.

    Models a patient who moved between two repetitions (dynamics, averages acquired as
    repetitions): every imaging line with ISMRMRD repetition ``>= repetition`` is replaced
    as in :func:`rigid_motion` (same arguments and accuracy).
    """
    lay = _Layout(scan)
    reps = {lay.acq(ln.item).idx.repetition for ln in lay.lines}
    if repetition not in reps or repetition == min(reps):
        raise ValueError(f"repetition {repetition} is not a later repetition of the scan (has {sorted(reps)})")
    return _move(
        scan, lambda ln: ln.group[4] >= repetition, translation_mm, rotation_deg, {"repetition": repetition}
    )
