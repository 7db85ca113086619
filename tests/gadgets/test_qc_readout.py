"""ReadoutQC: clean scans raise nothing; injected faults raise the right code at the right place."""

from __future__ import annotations

import functools
import time

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest
from chain_helpers import DATA_DIR, context, payloads, read_mrd, run_chain

from gadgets.qc_readout import ReadoutQC
from inline.qc.alert import Alert, AlertCode
from inline.simulate import simulate_scan
from inline.trace import Trace

_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)


@functools.lru_cache(maxsize=None)
def _scan(seed: int, repetitions: int = 1, snr: float = 30.0, slices: int = 3, matrix: int = 64, coils: int = 8):
    return simulate_scan(matrix=matrix, slices=slices, coils=coils, seed=seed, repetitions=repetitions, snr=snr)


def scan_copy(seed: int, **kw):
    """Header and an independent copy of the acquisitions of a cached simulated scan."""
    s = _scan(seed, **kw)
    acqs = [ismrmrd.Acquisition(head=ismrmrd.AcquisitionHeader.from_buffer_copy(a.getHead()), data=np.array(a.data))
            for a in s.acquisitions]
    return ismrmrd.xsd.CreateFromDocument(s.header_xml), acqs


def run_qc(header, acqs, **params) -> tuple[ReadoutQC, list, list[Alert]]:
    g = ReadoutQC(context(header), ReadoutQC.Params(**params))
    out = run_chain([g], [(a, Trace.arrived()) for a in acqs])
    return g, out, payloads(out, Alert)


def imaging(acqs):
    return [a for a in acqs if not int(a.flags) & _NOISE]


def find(acqs, slice_=0, ky=0, rep=0):
    return next(a for a in imaging(acqs) if (a.idx.slice, a.idx.kspace_encode_step_1, a.idx.repetition) == (slice_, ky, rep))


def codes(alerts):
    return sorted(a.code.value for a in alerts)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_clean_scans_raise_nothing(seed):
    header, acqs = scan_copy(seed, repetitions=2)
    g, out, alerts = run_qc(header, acqs)
    assert alerts == [], [a.to_text() for a in alerts]
    # a pure tap: every acquisition leaves, in order, untouched
    passed = payloads(out, ismrmrd.Acquisition)
    assert len(passed) == len(acqs) and all(p is a for p, a in zip(passed, acqs))
    noise = g.context.shared["noise"]
    assert noise["std"].shape == (8,) and noise["covariance"].shape == (8, 8) and noise["dwell_time_us"] > 0


def test_low_snr_clean_scan_raises_nothing():
    header, acqs = scan_copy(5, repetitions=2, snr=8.0)
    assert run_qc(header, acqs)[2] == []


def test_alert_follows_its_acquisition():
    header, acqs = scan_copy(0)
    a = find(acqs, 1, 10)
    a.data[3, 20] += 500 * np.abs(a.data).max()
    out = run_chain([ReadoutQC(context(header))], acqs)
    i = next(i for i, (p, _) in enumerate(out) if isinstance(p, Alert))
    assert out[i - 1][0] is a  # yielded right behind the readout that revealed it


@pytest.mark.parametrize(
    ("ky", "amplitude"),
    # on the echo peak (ky 32, sample 66) a spike must beat spike_ratio x the neighbouring line's peak
    [(5, 3.0), (5, 10.0), (5, 100.0), (31, 3.0), (31, 10.0), (31, 100.0), (32, 10.0), (32, 100.0)],
)
def test_rf_spike_located(ky, amplitude):
    header, acqs = scan_copy(1)
    a = find(acqs, 2, ky)
    sample = 100 if ky != 32 else 66  # on the echo peak at the k-space centre
    mag = np.abs(a.data)
    # spike on all channels, `amplitude` times the strongest sample of the line, random phase
    rng = np.random.default_rng(7)
    a.data[:, sample] += amplitude * mag.max() * np.exp(2j * np.pi * rng.random(a.data.shape[0]))
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["rf_spike"]
    ev = alerts[0].evidence
    assert (ev["scan_counter"], ev["slice"], ev["ky"], ev["sample"]) == (a.scan_counter, 2, ky, sample)
    assert alerts[0].slices == [2] and len(ev["channels"]) >= 6


def test_rf_spike_single_channel_in_noise():
    header, acqs = scan_copy(2)
    a = find(acqs, 0, 60)
    a.data[5, 17] += 40 * np.abs(a.data).mean() * 8  # one channel, high kx
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["rf_spike"] and alerts[0].evidence["sample"] == 17 and alerts[0].evidence["channels"] == [5]


def test_rf_spikes_one_alert_per_slice():
    header, acqs = scan_copy(3)
    for ky in range(0, 64, 4):
        a = find(acqs, 1, ky)
        a.data[:, 3 + ky] += 50 * np.abs(a.data).max()
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["rf_spike"] and alerts[0].slices == [1]


@pytest.mark.parametrize("kind", ["zeros", "noise"])
def test_dead_channel_from_slice_k(kind):
    header, acqs = scan_copy(0)
    g0, _, _ = run_qc(*scan_copy(0))
    sigma = g0.noise_std[6]
    rng = np.random.default_rng(3)
    first = None
    for a in imaging(acqs):
        if a.scan_counter >= 100:  # from mid-scan on (interleaved slices: ky 30 of slice 0 on)
            first = first or a
            n = a.data.shape[1]
            a.data[6] = 0 if kind == "zeros" else sigma * (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / np.sqrt(2)
    _, _, alerts = run_qc(header, acqs)
    assert "coil_dropout" in codes(alerts)
    drop = [a for a in alerts if a.code == AlertCode.COIL_DROPOUT]
    assert len(drop) == 1 and drop[0].evidence["channels"] == [6]
    # a dead element affects every later slice: the alert is series-wide, the first slice in the evidence
    assert drop[0].slices == [] and drop[0].evidence["first_slice"] in {a.idx.slice for a in imaging(acqs)}
    assert set(codes(alerts)) <= {"coil_dropout", "coil_noise"}


def test_dead_channel_in_noise_scan():
    header, acqs = scan_copy(1)
    for a in acqs:
        a.data[2] = 0
    _, _, alerts = run_qc(header, acqs)
    drop = [a for a in alerts if a.code == AlertCode.COIL_DROPOUT]
    assert len(drop) == 1 and drop[0].evidence["channels"] == [2] and drop[0].evidence["source"] == "noise_scan"


@pytest.mark.parametrize("where", ["noise_scan", "imaging"])
def test_noisy_channel(where):
    header, acqs = scan_copy(2)
    g0, _, _ = run_qc(*scan_copy(2))
    sigma = 5 * g0.noise_std[3]
    rng = np.random.default_rng(4)
    for a in acqs:
        if (where == "noise_scan") == bool(int(a.flags) & _NOISE) or where == "imaging" and a.scan_counter > 60:
            n = a.data.shape[1]
            a.data[3] += sigma * (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / np.sqrt(2)
    _, _, alerts = run_qc(header, acqs)
    noisy = [a for a in alerts if a.code == AlertCode.COIL_NOISE]
    assert len(noisy) == 1 and noisy[0].evidence["channels"] == [3]
    assert noisy[0].evidence["source"] == ("noise_scan" if where == "noise_scan" else "imaging_high_kx")
    assert set(codes(alerts)) <= {"coil_noise", "rf_spike"} - ({"rf_spike"} if where == "noise_scan" else set())


@pytest.mark.parametrize("missing", [[40], [10, 11, 12], [32]])
def test_missing_lines(missing):
    header, acqs = scan_copy(3)
    acqs = [a for a in acqs if not (a.idx.slice == 1 and a.idx.kspace_encode_step_1 in missing)]
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["incomplete_coverage"]
    a = alerts[0]
    assert a.slices == [1] and [y for _, y in a.evidence["missing"]] == missing


def test_stopped_scan_reports_at_close():
    header, acqs = scan_copy(0)
    acqs = acqs[:-20]  # the last lines of every slice never arrive
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["incomplete_coverage"] * 3


def test_accelerated_scan_coverage():
    s = simulate_scan(matrix=64, slices=2, coils=8, acceleration=2, acs_lines=16, seed=5)
    header = ismrmrd.xsd.CreateFromDocument(s.header_xml)
    assert run_qc(header, s.acquisitions)[2] == []
    drop = [a for a in s.acquisitions if not (a.idx.slice == 0 and a.idx.kspace_encode_step_1 == 4)]
    alerts = run_qc(header, drop)[2]
    assert codes(alerts) == ["incomplete_coverage"] and alerts[0].evidence["missing"] == [[0, 4]]


@pytest.mark.parametrize("shift_px", [1.0, 3.0])
def test_motion_between_repetitions(shift_px):
    header, acqs = scan_copy(4, repetitions=2)
    for a in imaging(acqs):
        if a.idx.repetition == 1:  # translate the object: phase ramp along kx and ky
            n = a.data.shape[1]
            kx = (np.arange(n) - n // 2) / n
            ky = (a.idx.kspace_encode_step_1 - 32) / 64
            a.data[:] *= np.exp(-2j * np.pi * (2 * shift_px * kx + shift_px * ky))  # readout 2x oversampled
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["motion"] * 3
    assert all(a.repetition == 1 for a in alerts) and sorted(a.slices[0] for a in alerts) == [0, 1, 2]


def test_navigator_motion():
    header, acqs = scan_copy(0)
    base = next(a for a in imaging(acqs) if a.idx.kspace_encode_step_1 == 32)
    navs = []
    for i, shift in enumerate([0, 0, 0, 4]):
        n = ismrmrd.Acquisition(head=ismrmrd.AcquisitionHeader.from_buffer_copy(base.getHead()), data=np.array(base.data))
        n.clear_all_flags()
        n.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
        n.idx.repetition = i
        k = (np.arange(n.data.shape[1]) - 64) / 128
        n.data[:] *= np.exp(-2j * np.pi * shift * k)
        navs.append(n)
    _, _, alerts = run_qc(header, [*acqs[:20], navs[0], *acqs[20:60], navs[1], navs[2], navs[3]])
    alerts = [a for a in alerts if a.code != AlertCode.INCOMPLETE_COVERAGE]  # the stream is cut short
    assert codes(alerts) == ["motion"] and alerts[0].repetition == 3 and alerts[0].evidence["source"] == "navigator"


def test_alert_latency_and_per_readout_cost():
    """32 channels x 512 samples: QC per readout well below 1 ms; alert from the revealing readout."""
    rng = np.random.default_rng(0)
    from chain_helpers import kspace_acquisitions, make_header

    ny, nx, nc = 64, 512, 32
    img = np.zeros((ny, nx), np.complex64)
    img[16:48, 128:384] = 1
    coil = np.exp(2j * np.pi * rng.random((nc, 1, 1)))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img * coil, axes=(1, 2)), norm="ortho"), axes=(1, 2))
    k = (k + 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(np.complex64)
    header = make_header(encoded=(nx, ny, 1), receiver_channels=nc)
    acqs = kspace_acquisitions(k[:, None])
    g = ReadoutQC(context(header))
    for a in acqs[:8]:  # warm-up
        list(g.process(a, Trace.arrived()))
    times = []
    for a in acqs[8:]:
        t0 = time.perf_counter_ns()
        out = list(g.process(a, Trace.arrived()))
        times.append(time.perf_counter_ns() - t0)
        assert not [o for o, _ in out if isinstance(o, Alert)]
    med_ms = np.median(times) / 1e6
    assert med_ms < 0.5, f"median {med_ms:.3f} ms per 32 x 512 readout"
    # latency: an alert's detection time minus the arrival of the readout that revealed it
    spike = kspace_acquisitions(k[:, None])[40]
    spike.data[:, 7] += 100
    g = ReadoutQC(context(header))
    lat = []
    for a in kspace_acquisitions(k[:, None])[:40] + [spike]:
        for o, _ in g.process(a, Trace.arrived()):
            if isinstance(o, Alert):
                lat.append((o.detected_ns - o.revealed_ns) / 1e6)
    assert len(lat) == 1 and lat[0] < 100.0


def test_mid_scan_motion_over_every_line():
    """5 mm along phase encoding from the 22nd line of each slice on (interleaved slices: the same
    moment for all three), one repetition: found over the outer lines, at the moved line."""
    header, acqs = scan_copy(5)
    py = 240.0 / 64  # simulated FOV 240 mm, 64 lines
    for a in imaging(acqs):
        y = a.idx.kspace_encode_step_1
        if y >= 22:
            a.data[:] *= np.complex64(np.exp(-2j * np.pi * (y - 32) * 5.0 / (64 * py)))
    _, _, alerts = run_qc(header, acqs)
    assert codes(alerts) == ["motion"] * 3 and all(a.evidence["ky"] == 22 for a in alerts)  # either check may tell
    g, _, alerts = run_qc(header, acqs, motion_jump_ratio=1e9)  # the central-band check out of the way
    motion = [a for a in alerts if a.evidence.get("source") == "kspace_consistency_noise"]
    assert codes(alerts) == ["motion"] * 3 and len(motion) == 3, [a.to_text() for a in alerts]
    assert sorted(a.slices[0] for a in motion) == [0, 1, 2] and all(a.evidence["ky"] == 22 for a in motion)
    assert all(a.value > 10.0 for a in motion)
    # fewer channels than midscan_min_channels: the check is not run
    _, _, alerts = run_qc(header, acqs, motion_jump_ratio=1e9, midscan_min_channels=16)
    assert not [a for a in alerts if a.evidence.get("source") == "kspace_consistency_noise"]


def test_real_data_raises_nothing(shared_data):
    for path in sorted(DATA_DIR.glob("*.h5")):
        header, acqs = read_mrd(path)
        alerts = run_qc(header, acqs)[2]
        assert alerts == [], (path.name, [a.to_text() for a in alerts])
