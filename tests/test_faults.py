"""Fault injectors (:mod:`inline.qc.faults`): each does what it says, in numbers, and leaves its input alone."""

from __future__ import annotations

import math

import ismrmrd
import numpy as np
import pytest
from scipy import fft as sfft
from scipy import ndimage

from inline.config import load_chain
from inline.mrdfile import RawScan, read_scan
from inline.offline import run_chain
from inline.qc import faults
from inline.simulate import simulate_scan
from tests.conftest import SHARED_DATA

NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
LAST_IN_SLICE = 1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1)


def _scan(snr: float = 40.0, slices: int = 2, coils: int = 4, seed: int = 3, **kw) -> RawScan:
    s = simulate_scan(matrix=64, slices=slices, coils=coils, seed=seed, snr=snr, **kw)
    return RawScan(s.header_xml, list(s.acquisitions))


@pytest.fixture(scope="module")
def scan() -> RawScan:
    return _scan()


@pytest.fixture(scope="module")
def clean_scan() -> RawScan:
    return _scan(snr=math.inf, slices=1)


def _snapshot(scan: RawScan) -> list[tuple[bytes, bytes]]:
    return [(bytes(a.getHead()), np.array(a.data).tobytes()) for a in scan.items if isinstance(a, ismrmrd.Acquisition)]


def _imaging(scan: RawScan) -> list[tuple[int, ismrmrd.Acquisition]]:
    return [(i, a) for i, a in enumerate(scan.items) if isinstance(a, ismrmrd.Acquisition) and not a.flags & NOISE]


def _kspace(scan: RawScan, slice_: int = 0, items: set[int] | None = None) -> np.ndarray:
    """(coils, ky, kx) of one slice (simulated scans: ky centre = matrix // 2), only ``items`` if given."""
    lines = [(i, a) for i, a in _imaging(scan) if a.idx.slice == slice_ and (items is None or i in items)]
    a0 = lines[0][1]
    k = np.zeros((a0.active_channels, 64, a0.number_of_samples), np.complex64)
    for _, a in lines:
        k[:, a.idx.kspace_encode_step_1] = a.data
    return k


def _images(k: np.ndarray) -> np.ndarray:
    return sfft.fftshift(sfft.ifftn(sfft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1), norm="ortho"), axes=(-2, -1))


def _shift_between(a: np.ndarray, b: np.ndarray, upsample: int = 20) -> tuple[float, float]:
    """(dy, dx) [pixels] that moves ``a`` onto ``b``: peak of their upsampled cross-correlation (complex images, summed over coils)."""
    ka, kb = sfft.fft2(a), sfft.fft2(b)
    cross = np.sum(kb * np.conj(ka), axis=0) if a.ndim == 3 else kb * np.conj(ka)
    ny, nx = cross.shape
    big = np.zeros((ny * upsample, nx * upsample), np.complex128)
    c = sfft.fftshift(cross)
    oy, ox = (ny * upsample - ny) // 2, (nx * upsample - nx) // 2
    big[oy : oy + ny, ox : ox + nx] = c
    corr = np.abs(sfft.ifft2(sfft.ifftshift(big)))
    py, px = np.unravel_index(np.argmax(corr), corr.shape)
    dy, dx = py / upsample, px / upsample
    return (dy - ny if dy > ny / 2 else dy), (dx - nx if dx > nx / 2 else dx)


# -- every injector leaves its input unchanged and copies ------------------------------

INJECTORS = [
    (faults.rf_spike, dict(amplitude_rel=0.5, n_spikes=5, seed=1)),
    (faults.dead_coil, dict(channel=1, from_fraction=0.0)),
    (faults.dead_coil, dict(channel=1, from_fraction=0.3, mode="noise")),
    (faults.noisy_coil, dict(channel=2, factor=3.0)),
    (faults.raised_noise, dict(factor=2.0)),
    (faults.missing_lines, dict(fraction=0.1, region="random")),
    (faults.nyquist_ghost, dict(phase_rad=0.5)),
    (faults.rigid_motion, dict(translation_mm=(2.0, 1.0), rotation_deg=5.0)),
]


@pytest.mark.parametrize("injector,kwargs", INJECTORS, ids=lambda v: getattr(v, "__name__", ""))
def test_input_unchanged_and_output_independent(scan, injector, kwargs):
    before = _snapshot(scan)
    inj = injector(scan, **kwargs)
    assert _snapshot(scan) == before
    assert inj.kind in faults.EXPECTED_CODE and inj.first_item is not None
    ids_in = {id(a.data.base) for a in scan.items if a.data.base is not None} | {id(a.data) for a in scan.items}
    for a in inj.scan.items:
        assert id(a) not in {id(b) for b in scan.items}
        assert not any(np.shares_memory(a.data, b.data) for b in scan.items[-3:])
    assert ids_in  # input arrays exist
    # the injected scan still reconstructs with the default chain
    res = run_chain(load_chain("default"), inj.scan)
    assert len(res.images) == 2


# -- RF spikes -----------------------------------------------------------------------


@pytest.mark.parametrize("amplitude_rel", [0.02, 0.1, 0.5])
def test_rf_spike_locations_and_amplitude(scan, amplitude_rel):
    inj = faults.rf_spike(scan, amplitude_rel=amplitude_rel, n_spikes=4, seed=7, channels=2)
    assert len(inj.spikes) == 4
    peak = {}
    for _, a in _imaging(scan):
        peak[a.idx.slice] = max(peak.get(a.idx.slice, 0.0), float(np.abs(a.data).max()))
    expected = np.zeros(0)
    for i, (a, b) in enumerate(zip(scan.items, inj.scan.items)):
        diff = np.asarray(b.data, np.complex128) - np.asarray(a.data, np.complex128)
        here = [sp for sp in inj.spikes if sp.item == i]
        mask = np.zeros(diff.shape, bool)
        for sp in here:
            assert len(sp.channels) == 2
            assert sp.amplitude == pytest.approx(amplitude_rel * peak[a.idx.slice], rel=1e-6)
            for ch, v in zip(sp.channels, sp.values):
                mask[ch, sp.sample] = True
                assert diff[ch, sp.sample] == pytest.approx(v, abs=1e-6 * sp.amplitude + 1e-7)
                assert abs(v) == pytest.approx(sp.amplitude, rel=1e-6)
        assert np.all(np.abs(diff[~mask]) == 0)
        expected = np.append(expected, mask.sum())
    assert expected.sum() == 8
    assert inj.first_item == min(sp.item for sp in inj.spikes)
    # same seed, same spikes
    assert [(s.item, s.sample) for s in faults.rf_spike(scan, amplitude_rel, 4, seed=7, channels=2).spikes] == [
        (s.item, s.sample) for s in inj.spikes
    ]


def test_rf_spike_all_channels(scan):
    inj = faults.rf_spike(scan, amplitude_rel=0.1, n_spikes=3, seed=2)
    assert all(sp.channels == [0, 1, 2, 3] for sp in inj.spikes)


# -- coils ---------------------------------------------------------------------------


def test_dead_coil_from_fraction(scan):
    inj = faults.dead_coil(scan, channel=2, from_fraction=0.5)
    lines = _imaging(inj.scan)
    half = len(lines) // 2
    for k, (i, a) in enumerate(lines):
        orig = scan.items[i]
        if k < half:
            np.testing.assert_array_equal(a.data, orig.data)
        else:
            assert np.all(a.data[2] == 0)
            np.testing.assert_array_equal(a.data[[0, 1, 3]], orig.data[[0, 1, 3]])
    noise = [a for a in inj.scan.items if a.flags & NOISE]
    assert noise and all(np.all(a.data[2] != 0) for a in noise)  # not dead during the noise scan
    assert inj.first_item == lines[half][0]


def test_dead_coil_from_start_includes_noise_scan(scan):
    inj = faults.dead_coil(scan, channel=0, from_fraction=0.0)
    assert all(np.all(a.data[0] == 0) for a in inj.scan.items)
    assert inj.first_item == 0  # the first noise readout reveals it


def test_dead_coil_noise_mode_keeps_noise_level(scan):
    inj = faults.dead_coil(scan, channel=1, from_fraction=0.0, mode="noise", seed=4)
    sigma = faults.channel_noise_std(scan)[1]
    data = np.concatenate([a.data[1] for _, a in _imaging(inj.scan)])
    assert np.std(data) == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_noisy_coil_raises_measured_std(scan, factor):
    inj = faults.noisy_coil(scan, channel=2, factor=factor, seed=5)
    before = np.concatenate([a.data[2] for a in scan.items if a.flags & NOISE])
    after = np.concatenate([a.data[2] for a in inj.scan.items if a.flags & NOISE])
    assert np.std(after) / np.std(before) == pytest.approx(factor, rel=0.06)  # 2048 samples
    other = np.concatenate([a.data[1] for a in inj.scan.items if a.flags & NOISE])
    np.testing.assert_array_equal(other, np.concatenate([a.data[1] for a in scan.items if a.flags & NOISE]))
    # imaging data: the added noise has sqrt(factor^2 - 1) times the channel's noise std
    added = np.concatenate([b.data[2] - a.data[2] for (_, a), (_, b) in zip(_imaging(scan), _imaging(inj.scan))])
    sigma = faults.channel_noise_std(scan)[2]
    assert np.std(added) == pytest.approx(math.sqrt(factor**2 - 1) * sigma, rel=0.03)


@pytest.mark.parametrize("factor", [1.5, 2.0, 4.0])
def test_raised_noise_factor(factor):
    """On a scan whose noise std is known, the imaging noise std becomes factor x, the noise scan unchanged."""
    s = simulate_scan(matrix=64, slices=1, coils=4, seed=11, snr=30.0)
    scan = RawScan(s.header_xml, list(s.acquisitions))
    inj = faults.raised_noise(scan, factor=factor, seed=1)
    truth = np.sqrt(np.real(np.diag(s.noise_covariance)))
    added = np.stack([b.data - a.data for (_, a), (_, b) in zip(_imaging(scan), _imaging(inj.scan))], axis=1)
    measured_total = np.sqrt(truth**2 + np.var(added.reshape(4, -1), axis=1))
    np.testing.assert_allclose(measured_total / truth, factor, rtol=0.05)
    for a, b in zip(scan.items, inj.scan.items):
        if a.flags & NOISE:
            np.testing.assert_array_equal(a.data, b.data)


def test_noise_covariance_matches_simulation():
    s = simulate_scan(matrix=64, slices=1, coils=6, seed=2, snr=25.0)
    cov, source = faults.noise_covariance(RawScan(s.header_xml, list(s.acquisitions)))
    assert source == "noise_scan"
    np.testing.assert_allclose(np.real(np.diag(cov)), np.real(np.diag(s.noise_covariance)), rtol=0.1)


# -- motion --------------------------------------------------------------------------


@pytest.mark.parametrize("translation_mm", [(2.0, 0.0), (0.0, 2.0), (5.0, -1.0)])
def test_rigid_motion_translation_by_cross_correlation(clean_scan, translation_mm):
    inj = faults.rigid_motion(clean_scan, at_fraction=0.5, translation_mm=translation_mm)
    later = set(inj.items)
    lines = _imaging(clean_scan)
    assert len(later) == len(lines) - len(lines) // 2
    assert min(later) == lines[len(lines) // 2][0]
    # the image of the later lines (same lines, before and after) moved by mm / pixel size
    a = _images(_kspace(clean_scan, items=later))
    b = _images(_kspace(inj.scan, items=later))
    dy, dx = _shift_between(a, b)
    pixel_mm = 240.0 / 64  # FOV / matrix (readout pixel the same: 2x FOV over 2x samples)
    assert dx == pytest.approx(translation_mm[0] / pixel_mm, abs=0.06)
    assert dy == pytest.approx(translation_mm[1] / pixel_mm, abs=0.06)
    # the earlier lines are untouched
    for i, acq in lines[: len(lines) // 2]:
        np.testing.assert_array_equal(inj.scan.items[i].data, acq.data)


@pytest.mark.parametrize("angle", [2.0, 5.0])
def test_rigid_motion_rotation(clean_scan, angle):
    inj = faults.rigid_motion(clean_scan, at_fraction=0.0, rotation_deg=angle)
    a = np.sqrt(np.sum(np.abs(_images(_kspace(clean_scan))) ** 2, axis=0))
    b = np.sqrt(np.sum(np.abs(_images(_kspace(inj.scan))) ** 2, axis=0))
    angles = np.arange(-1.0, 8.01, 0.25)
    err = [np.linalg.norm(ndimage.rotate(a, -t, reshape=False, order=3) - b) for t in angles]
    # ndimage.rotate turns (rows=y, cols=x) by -t for a rotation from +x towards +y
    assert angles[int(np.argmin(err))] == pytest.approx(angle, abs=0.3)
    assert min(err) < 0.1 * np.linalg.norm(a)


def test_repetition_motion_moves_only_later_repetitions():
    s = simulate_scan(matrix=64, slices=1, coils=4, seed=5, snr=math.inf, repetitions=2)
    scan = RawScan(s.header_xml, list(s.acquisitions))
    inj = faults.repetition_motion(scan, repetition=1, translation_mm=(0.0, 3.75))
    for i, a in _imaging(scan):
        moved = i in set(inj.items)
        assert moved == (a.idx.repetition == 1)
        if not moved:
            np.testing.assert_array_equal(inj.scan.items[i].data, a.data)
    reps = [{i for i, a in _imaging(scan) if a.idx.repetition == r} for r in (0, 1)]
    k0 = _kspace(scan, items=reps[1])
    k1 = _kspace(inj.scan, items=reps[1])
    dy, dx = _shift_between(_images(k0), _images(k1))
    assert (dy, dx) == (pytest.approx(1.0, abs=0.06), pytest.approx(0.0, abs=0.06))
    assert inj.repetitions == [1]
    with pytest.raises(ValueError):
        faults.repetition_motion(scan, repetition=0)


# -- coverage and ghosts ---------------------------------------------------------------


@pytest.mark.parametrize("region", ["centre", "edge", "random"])
def test_missing_lines(scan, region):
    inj = faults.missing_lines(scan, fraction=0.1, region=region, seed=3)
    n_lines = len(_imaging(scan))
    assert len(inj.scan.items) == len(scan.items) - len(inj.removed)
    assert len(inj.removed) == 2 * round(0.1 * 64)  # 6 of 64 lines in each of 2 slices
    removed_ky = {scan.items[i].idx.kspace_encode_step_1 for i in inj.removed}
    assert len(removed_ky) == 6  # same positions in every slice
    if region == "centre":
        assert 32 in removed_ky and max(abs(k - 32) for k in removed_ky) <= 3
    if region == "edge":
        assert removed_ky == set(range(58, 64))
    # trigger flags survive: each slice still ends with LAST_IN_SLICE, the chain still emits 2 images
    assert sum(bool(a.flags & LAST_IN_SLICE) for _, a in _imaging(inj.scan)) == 2
    assert len(_imaging(inj.scan)) == n_lines - len(inj.removed)
    assert len(run_chain(load_chain("default"), inj.scan).images) == 2


def test_missing_lines_count_and_slices(scan):
    inj = faults.missing_lines(scan, n_lines=3, region="random", slices=[1], seed=0)
    assert len(inj.removed) == 3 and inj.slices == [1]


def test_nyquist_ghost_ratio(clean_scan):
    phase = 0.4
    inj = faults.nyquist_ghost(clean_scan, phase_rad=phase)
    a = _images(_kspace(clean_scan))
    b = _images(_kspace(inj.scan))
    # the change is exactly the N/2-shifted ghost: b = a cos-ish + ghost; its energy ratio is tan^2(phase/2)
    ghost = b - a * np.exp(1j * phase / 2) * np.cos(phase / 2)
    ratio = np.linalg.norm(ghost) / np.linalg.norm(b - ghost)
    assert ratio == pytest.approx(abs(math.tan(phase / 2)), rel=0.02)
    # and it sits half a FOV away along y
    dy, _ = _shift_between(a, ghost)
    assert abs(dy) == pytest.approx(32.0, abs=0.1)


# -- real files: oversampled readouts, converter headers --------------------------------


@pytest.mark.parametrize(
    "name", ["siemens_skyra_ssfp_14ch_R3_phantom.h5", "pulseq_gre_16ch_128_phantom.h5", "twix_gre_2ch_2rep_phantom.h5"]
)
def test_real_files(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (shared real data absent)")
    scan = read_scan(path)
    before = _snapshot(scan)
    coils = scan.acquisitions[-1].active_channels
    for injector, kwargs in INJECTORS:
        if "channel" in kwargs:
            kwargs = {**kwargs, "channel": kwargs["channel"] % coils}
        inj = injector(scan, **kwargs)
        assert inj.first_item is not None
        assert len(run_chain(load_chain("default"), inj.scan).images) >= 1
    assert _snapshot(scan) == before
    if "2rep" in name:
        inj = faults.repetition_motion(scan, repetition=1, translation_mm=(2.0, 0.0))
        assert inj.repetitions == [1]
