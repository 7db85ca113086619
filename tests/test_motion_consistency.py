"""Mid-scan motion from ky-neighbour consistency (inline.motion.consistency) on simulated scans.

Ground truth: the simulator's clean scan and the same scan with a rigid motion injected at a
known line (``inline.qc.faults.rigid_motion``: the moved object's k-space from that line on),
or a single RF spike on one line; the detector must find the moment at the injected line,
stay below the configured threshold on clean data, and not take one disturbed line for motion.
"""

from __future__ import annotations

import numpy as np
import pytest

from inline.mrdfile import RawScan
from inline.motion.consistency import consistency_jump
from inline.qc import faults
from inline.simulate import simulate_scan

THRESHOLD = 10.0  # configs/qc.yaml midscan_z_threshold
_NOISE = 1 << 18


def scan(seed: int, coils: int = 8, snr: float = 40.0) -> RawScan:
    sim = simulate_scan(matrix=64, slices=1, coils=coils, snr=snr, seed=seed)
    return RawScan(sim.header_xml, list(sim.acquisitions))


def lines_of(raw: RawScan) -> tuple[np.ndarray, np.ndarray]:
    """``(lines, coils, kx)`` and ky of the imaging readouts of a one-slice scan, in ky order."""
    acqs = [a for a in raw.acquisitions if not int(a.flags) & _NOISE]
    acqs.sort(key=lambda a: a.idx.kspace_encode_step_1)
    return np.stack([a.data for a in acqs]), np.array([a.idx.kspace_encode_step_1 for a in acqs])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clean_scans_stay_below_the_threshold(seed):
    lines, ky = lines_of(scan(seed))
    jump = consistency_jump(lines, ky, 32)
    assert jump is not None and jump.score < THRESHOLD, jump


@pytest.mark.parametrize("shift_mm, at_line", [((0.0, 5.0), 20), ((5.0, 0.0), 44), ((3.5, 3.5), 18)])
def test_motion_found_at_the_injected_line(shift_mm, at_line):
    clean = scan(4)
    moved = faults.rigid_motion(clean, at_fraction=at_line / 64, translation_mm=shift_mm).scan
    lines, ky = lines_of(moved)
    jump = consistency_jump(lines, ky, 32)
    assert jump is not None and jump.score > THRESHOLD, jump
    assert jump.ky + 1 == at_line  # the first line of the moved object
    assert consistency_jump(*lines_of(clean), 32).score < THRESHOLD


def test_a_spiked_line_left_out_is_not_motion():
    """A strong RF spike on one line raises that line and both neighbours' targets unevenly, so the
    score alone can take it for a moment; ReadoutQC leaves the lines its spike check flagged out,
    and without that line nothing remains."""
    raw = faults.rf_spike(scan(5), amplitude_rel=0.5, n_spikes=1, seed=3).scan
    lines, ky = lines_of(raw)
    spiked = int(np.argmax(np.abs(lines).max(axis=(1, 2)) / np.abs(lines).mean(axis=(1, 2))))
    keep = np.arange(len(ky)) != spiked
    jump = consistency_jump(lines[keep], ky[keep], 32)
    assert jump.score < THRESHOLD, jump


def test_too_few_lines_and_bad_shapes():
    lines, ky = lines_of(scan(6))
    assert consistency_jump(lines[:10], ky[:10], 32) is None
    every_other = slice(0, None, 2)  # R = 2: no line has both neighbours
    assert consistency_jump(lines[every_other], ky[every_other], 32) is None
    with pytest.raises(ValueError, match="one ky each"):
        consistency_jump(lines, ky[:-1], 32)
    with pytest.raises(ValueError, match="odd"):
        consistency_jump(lines, ky, 32, kernel_kx=4)
