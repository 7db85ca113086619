"""ShotMotionQC / inline.motion.kspace: the shot in which the patient moved, from k-space alone.

Ground truth: motion applied in k-space from a known shot of repetition 1 (inline.motion.sim)
of simulated 2-slice scans (gradient echo: one line per shot; turbo spin echo: 16), and
known motion injected into the real 2-repetition GRE from a known line on.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from chain_helpers import DATA_DIR, context, payloads, run_chain
from motion_helpers import base_2d

from gadgets.motion import ShotMotionQC
from inline.motion.kspace import find_change, line_stats
from inline.motion.rigid import RigidMotion
from inline.motion.sim import MotionEvent, apply_motion
from inline.qc.alert import Alert, AlertCode


def run_qc(header, acqs, **params):
    g = ShotMotionQC(context(header), ShotMotionQC.Params(**params))
    out = run_chain([g], acqs)
    return g, [a for a in payloads(out, Alert)]


@functools.lru_cache(maxsize=None)
def _gre():
    return base_2d(seed=4, repetitions=2)


@pytest.mark.parametrize(
    "shot, pose",
    [
        (40, RigidMotion.from_mm_deg((2.0, 0.0), 0.0)),
        (64, RigidMotion.from_mm_deg((0.0, 0.0), 2.0)),
        (77, RigidMotion.from_mm_deg((0.0, 1.5), 0.0)),
        (90, RigidMotion.from_mm_deg((1.0, -1.0), 1.0)),
    ],
)
def test_gradient_echo_motion_shot_is_found(shot, pose):
    ms = apply_motion(_gre(), [MotionEvent(1, shot, pose)])
    g, alerts = run_qc(ms.scan.header, ms.scan.acquisitions)
    r = g.results[1]
    assert r.change.start_localised and r.onset is not None
    assert r.onset.shot == shot  # exactly the shot (one ky line each)
    assert r.onset.ky == [shot]  # linear ky order
    assert len(alerts) == 1
    a = alerts[0]
    assert a.code is AlertCode.MOTION and a.repetition == 1 and a.evidence["shot"] == shot
    assert f"from shot {shot} of 128" in a.message and a.evidence["source"] == "kspace_shot_consistency"


def test_turbo_spin_echo_motion_shot_is_found():
    scan = base_2d(seed=5, repetitions=2, contrast="t2w")  # echo trains of 16 lines: 8 shots per slice
    assert scan.header.encoding[0].echoTrainLength == 16
    ms = apply_motion(scan, [MotionEvent(1, 3, RigidMotion.from_mm_deg((1.5, 0.0), 1.0))])
    g, alerts = run_qc(ms.scan.header, ms.scan.acquisitions)
    onset = g.results[1].onset
    assert onset is not None and onset.shot == 3 and onset.ky == list(range(48, 64))
    assert len(alerts) == 1 and alerts[0].evidence["shot"] == 3


def test_moving_back_is_found_and_between_repetition_motion_is_not_reported():
    pose = RigidMotion.from_mm_deg((2.0, -1.0), 1.5)
    # moved for the first 50 shots of repetition 1 only
    ms = apply_motion(_gre(), [MotionEvent(1, 0, pose), MotionEvent(1, 50, RigidMotion())])
    g, alerts = run_qc(ms.scan.header, ms.scan.acquisitions)
    ch = g.results[1].change
    assert ch.start < 10 and not ch.start_localised and ch.stop_localised  # the weak first lines show little
    assert g.results[1].onset.shot == 50 and alerts[0].evidence["moved_back"]
    # moved before repetition 1 and still: the whole repetition differs, no shot to name
    ms = apply_motion(_gre(), [MotionEvent(1, 0, pose)])
    g, alerts = run_qc(ms.scan.header, ms.scan.acquisitions)
    assert g.results[1].change.start is not None and not g.results[1].change.during
    assert alerts == []


def test_clean_repetitions_stay_quiet():
    g, alerts = run_qc(_gre().header, _gre().acquisitions)
    assert alerts == [] and g.results[1].change.start is None and g.results[1].change.evidence < 0.5


def test_real_phantom_clean_and_with_motion_from_a_known_line():
    from inline.mrdfile import read_scan
    from inline.protocol import parse_header
    from inline.qc import faults

    path = DATA_DIR / "twix_gre_2ch_2rep_phantom.h5"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared real data)")
    scan = read_scan(path)
    hdr = parse_header(scan.header_xml)
    g, alerts = run_qc(hdr, scan.acquisitions)
    assert alerts == [] and g.results[1].change.evidence < 0.5
    # 160 lines per repetition: 70 % of the 320 imaging lines is line 64 of repetition 1
    inj = faults.rigid_motion(scan, at_fraction=0.7, translation_mm=(2.0, 0.0))
    g, alerts = run_qc(hdr, inj.scan.acquisitions)
    assert g.results[1].onset is not None and g.results[1].onset.shot == 64
    assert [a.evidence["shot"] for a in alerts] == [64]


def test_find_change_on_synthetic_sequences():
    rng = np.random.default_rng(0)
    n = np.full(100, 2000)
    noise = np.exp(rng.normal(0, 1 / np.sqrt(2000), 100))
    signal = np.r_[np.linspace(1, 50, 50), np.linspace(50, 1, 50)]  # k-space centre in the middle
    ch, _ = find_change(noise, n, signal)
    assert ch.start is None and ch.evidence < 0.5
    moved = noise * (1 + np.where(np.arange(100) >= 30, 0.2 * signal, 0))
    ch, _ = find_change(moved, n, signal)
    assert (ch.start, ch.start_localised) == (30, True) and ch.moment == 30
    # moved from the start: a run from shot 0 is not localised
    ch, _ = find_change(noise * (1 + 0.2 * signal), n, signal)
    assert ch.start is not None and not ch.during
    # weak lines before the run would not have shown the change: not localised either
    weak = noise * (1 + np.where(np.arange(100) >= 30, 0.2 * signal * (np.arange(100) >= 45), 0))
    faint = np.where(np.arange(100) < 45, 1e-4, signal)
    ch, _ = find_change(weak, n, faint)
    assert ch.start == 45 and not ch.start_localised


def test_line_stats_noise_level():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((4, 256)) + 1j * rng.standard_normal((4, 256))).astype(np.complex64)
    b = (rng.standard_normal((4, 256)) + 1j * rng.standard_normal((4, 256))).astype(np.complex64)
    band, samples, edge = line_stats(a, b)
    # noise alone: the band's mean power matches the edges' (2 sigma^2 = 4 here)
    assert samples == 4 * (256 - 2 * 16) and band / samples == pytest.approx(4.0, rel=0.1)
    assert edge == pytest.approx(4.0, rel=0.25)
    with pytest.raises(ValueError):
        line_stats(a, b[:, :100])


def test_navigators_find_motion_within_a_single_repetition():
    """One repetition, a k-space-centre navigator before every shot: no reference frame needed."""
    from inline.simulate import simulate_scan

    base = simulate_scan(matrix=128, slices=2, coils=8, repetitions=1, snr=30.0, seed=8, noise_samples=1024)
    for shot, pose in ((30, RigidMotion.from_mm_deg((0.0, 0.0), 2.0)), (70, RigidMotion.from_mm_deg((0.0, 2.0), 0.0))):
        ms = apply_motion(base, [MotionEvent(0, shot, pose)], navigators=True)
        assert sum(1 for a in ms.scan.acquisitions if a.is_flag_set(23)) == 2 * 128  # ACQ_IS_NAVIGATION_DATA
        g, alerts = run_qc(ms.scan.header, ms.scan.acquisitions)
        r = g.navigator_results[0]
        assert r.onset is not None and r.onset.shot == shot and r.change.start_localised
        assert [a.evidence["source"] for a in alerts] == ["navigator"] and alerts[0].evidence["shot"] == shot
        assert f"from navigator {shot} of 128" in alerts[0].message
    g, alerts = run_qc(base.header, apply_motion(base, [], navigators=True).scan.acquisitions)
    assert alerts == [] and g.navigator_results[0].change.start is None
