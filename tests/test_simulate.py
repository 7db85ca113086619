"""Tests of the scanner raw-data simulator (:mod:`inline.simulate`).

Small scans (64x64, a few slices and coils) keep the module under a few seconds; every check
compares against numbers derived from the arguments, not against the simulator itself.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
from collections import defaultdict
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest

from inline.buffers import EncodingInfo
from inline.simulate import (
    NOISE_READOUT_SAMPLES,
    PRESETS_2D,
    RELATIVE_RECEIVER_NOISE_BANDWIDTH,
    TICK_MS,
    TISSUES_3T,
    SimulatedScan,
    _head_model,
    mni152_template_paths,
    sampled_lines,
    simulate_scan,
    tissue_signal,
    write_scan,
)

SMALL = dict(matrix=64, slices=3, coils=8)


def flag(acq: ismrmrd.Acquisition, f: int) -> bool:
    return acq.is_flag_set(f)


def imaging(scan: SimulatedScan) -> list[ismrmrd.Acquisition]:
    return [a for a in scan.acquisitions if not flag(a, ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def noise(scan: SimulatedScan) -> list[ismrmrd.Acquisition]:
    return [a for a in scan.acquisitions if flag(a, ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def kspace(scan: SimulatedScan, repetition: int = 0) -> np.ndarray:
    """Acquired k-space ``(z, coils, ky, kx)`` of one repetition, zeros where not sampled."""
    acqs = [a for a in imaging(scan) if a.idx.repetition == repetition]
    nz = scan.images.shape[0]
    coils, nx = acqs[0].data.shape
    ny = scan.images.shape[1]
    k = np.zeros((nz, coils, ny, nx), np.complex64)
    three_d = scan.header.encoding[0].encodedSpace.matrixSize.z > 1
    for a in acqs:
        z = a.idx.kspace_encode_step_2 if three_d else a.idx.slice
        k[z, :, a.idx.kspace_encode_step_1, :] = a.data
    return k


def coil_images(k: np.ndarray, three_d: bool = False) -> np.ndarray:
    """Centred orthonormal inverse FFT, readout oversampling cropped: ``(z, coils, y, x)``."""
    axes = (0, 2, 3) if three_d else (2, 3)
    img = np.fft.fftshift(
        np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes
    )
    nx = k.shape[-1]
    return img[..., nx // 4 : nx // 4 + nx // 2]


def nrmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def accelerated() -> SimulatedScan:
    return simulate_scan(
        matrix=64, slices=4, coils=6, acceleration=3, acs_lines=10, repetitions=2,
        fov_mm=220.0, slice_thickness_mm=4.0, noise_samples=600, seed=3,
    )


@pytest.fixture(scope="module")
def noiseless() -> SimulatedScan:
    return simulate_scan(**SMALL, snr=math.inf, seed=5)


@pytest.fixture(scope="module")
def noisy() -> SimulatedScan:
    return simulate_scan(**SMALL, snr=20.0, noise_samples=20000, seed=5)


# --- header ---------------------------------------------------------------------------


def test_header_validates_and_matches_arguments(accelerated: SimulatedScan) -> None:
    hdr = xsd.CreateFromDocument(accelerated.header_xml)
    enc = hdr.encoding[0]
    e, r, lim = enc.encodedSpace, enc.reconSpace, enc.encodingLimits
    assert (e.matrixSize.x, e.matrixSize.y, e.matrixSize.z) == (128, 64, 1)
    assert (e.fieldOfView_mm.x, e.fieldOfView_mm.y, e.fieldOfView_mm.z) == (440.0, 220.0, 4.0)
    assert (r.matrixSize.x, r.matrixSize.y, r.matrixSize.z) == (64, 64, 1)
    assert (r.fieldOfView_mm.x, r.fieldOfView_mm.y, r.fieldOfView_mm.z) == (220.0, 220.0, 4.0)
    assert (lim.kspace_encoding_step_1.maximum, lim.kspace_encoding_step_1.center) == (63, 32)
    assert (lim.kspace_encoding_step_2.maximum, lim.kspace_encoding_step_2.center) == (0, 0)
    assert lim.slice.maximum == 3 and lim.repetition.maximum == 1
    assert enc.trajectory.value == "cartesian"
    assert enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 3
    assert enc.parallelImaging.calibrationMode.value == "embedded"
    sys_ = hdr.acquisitionSystemInformation
    assert sys_.systemVendor == "inline-simulator"
    assert sys_.systemFieldStrength_T == 3.0
    assert sys_.receiverChannels == 6 and len(sys_.coilLabel) == 6
    assert sys_.relativeReceiverNoiseBandwidth == pytest.approx(0.793)
    assert hdr.experimentalConditions.H1resonanceFrequency_Hz == pytest.approx(127.73e6, rel=1e-4)
    assert hdr.measurementInformation.patientPosition.value == "HFS"
    assert hdr.measurementInformation.protocolName and hdr.measurementInformation.measurementID
    assert hdr.subjectInformation.patientName == "Anonymous"
    t1w = PRESETS_2D["t1w"]
    seq = hdr.sequenceParameters
    assert (seq.TR, seq.TE, seq.flipAngle_deg) == ([t1w.tr_ms], [t1w.te_ms], [t1w.flip_angle_deg])
    info = EncodingInfo.from_header(hdr)  # the runtime's own reader agrees
    assert info.encoded_matrix == (128, 64, 1) and info.ky_center == 32 and info.ky_max == 63


def test_header_passes_the_ismrmrd_xsd(accelerated: SimulatedScan) -> None:
    xmlschema = pytest.importorskip("xmlschema")
    xsd_path = Path("/usr/share/ismrmrd/schema/ismrmrd.xsd")
    if not xsd_path.is_file():
        pytest.skip("ismrmrd.xsd not installed")
    schema = xmlschema.XMLSchema(str(xsd_path))
    assert [e.reason for e in schema.iter_errors(accelerated.header_xml)] == []


def test_unaccelerated_header_has_no_embedded_calibration(noiseless: SimulatedScan) -> None:
    pi = noiseless.header.encoding[0].parallelImaging
    assert pi.accelerationFactor.kspace_encoding_step_1 == 1
    assert pi.calibrationMode.value == "other"


# --- acquisitions ---------------------------------------------------------------------


def test_sampled_lines_with_acs() -> None:
    ky, img, cal = sampled_lines(64, 3, 10)
    imaging_lines = set(range(2, 64, 3))  # (ky - 32) % 3 == 0
    acs = set(range(27, 37))
    assert set(ky.tolist()) == imaging_lines | acs
    assert set(ky[img].tolist()) == imaging_lines
    assert set(ky[cal].tolist()) == acs
    assert len(ky) == 21 + 10 - 3


def test_acquisition_count_accounts_for_acceleration_and_acs(accelerated: SimulatedScan) -> None:
    lines = 21 + 10 - 3  # see test_sampled_lines_with_acs
    assert len(noise(accelerated)) == math.ceil(600 / NOISE_READOUT_SAMPLES) == 3
    assert len(imaging(accelerated)) == lines * 4 * 2
    assert len(accelerated.acquisitions) == 3 + lines * 4 * 2
    calib_only = [a for a in imaging(accelerated) if flag(a, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    both = [a for a in imaging(accelerated)
            if flag(a, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    assert len(calib_only) == 7 * 8 and len(both) == 3 * 8
    assert {a.idx.kspace_encode_step_1 for a in calib_only} == {27, 28, 30, 31, 33, 34, 36}
    assert {a.idx.kspace_encode_step_1 for a in both} == {29, 32, 35}
    assert not any(flag(a, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for a in both)


def test_flags_and_counters(accelerated: SimulatedScan) -> None:
    acqs = accelerated.acquisitions
    assert [a.scan_counter for a in acqs] == list(range(1, len(acqs) + 1))
    assert len({a.measurement_uid for a in acqs}) == 1
    n_noise = len(noise(accelerated))
    assert all(flag(a, ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs[:n_noise])
    assert sum(a.number_of_samples for a in acqs[:n_noise]) == 600
    img = acqs[n_noise:]
    ky_expected = set(sampled_lines(64, 3, 10)[0].tolist())
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, a in enumerate(img):
        groups[(a.idx.repetition, a.idx.slice)].append(i)
        assert a.number_of_samples == 128 and a.center_sample == 64
        assert a.active_channels == a.available_channels == 6
        assert all(a.isChannelActive(c) for c in range(6)) and not a.isChannelActive(6)
        assert (a.idx.kspace_encode_step_2, a.idx.contrast, a.idx.average) == (0, 0, 0)
        assert a.sample_time_us == pytest.approx(1e6 / (200.0 * 128))
    assert set(groups) == {(r, s) for r in range(2) for s in range(4)}
    for rows in groups.values():
        assert {img[i].idx.kspace_encode_step_1 for i in rows} == ky_expected
        for f_first, f_last in [
            (ismrmrd.ACQ_FIRST_IN_SLICE, ismrmrd.ACQ_LAST_IN_SLICE),
            (ismrmrd.ACQ_FIRST_IN_ENCODE_STEP1, ismrmrd.ACQ_LAST_IN_ENCODE_STEP1),
        ]:
            assert [i for i in rows if flag(img[i], f_first)] == [rows[0]]
            assert [i for i in rows if flag(img[i], f_last)] == [rows[-1]]
    for rep in range(2):
        rows = [i for i, a in enumerate(img) if a.idx.repetition == rep]
        assert [i for i in rows if flag(img[i], ismrmrd.ACQ_FIRST_IN_REPETITION)] == [rows[0]]
        assert [i for i in rows if flag(img[i], ismrmrd.ACQ_LAST_IN_REPETITION)] == [rows[-1]]
        assert rows == list(range(rows[0], rows[-1] + 1))  # repetitions do not interleave
    last = [i for i, a in enumerate(img) if flag(a, ismrmrd.ACQ_LAST_IN_MEASUREMENT)]
    assert last == [len(img) - 1]
    # noise dwell time: its own, 0.793 x the imaging one (same noise covariance, see docs)
    noise_dwell = RELATIVE_RECEIVER_NOISE_BANDWIDTH * img[0].sample_time_us
    assert acqs[0].sample_time_us == pytest.approx(noise_dwell, rel=1e-6)


def test_geometry_per_slice(accelerated: SimulatedScan) -> None:
    img = imaging(accelerated)
    pos = {a.idx.slice: np.array(a.position) for a in img}
    a = img[0]
    read, phase, sl = (np.array(v) for v in (a.read_dir, a.phase_dir, a.slice_dir))
    np.testing.assert_allclose(read, [1, 0, 0])
    np.testing.assert_allclose(phase, [0, 1, 0])
    np.testing.assert_allclose(np.cross(read, phase), sl)
    steps = np.diff(np.array([pos[s] for s in range(4)]), axis=0)
    spacing = accelerated.header.userParameters.userParameterDouble[0].value
    np.testing.assert_allclose(steps, np.tile(sl * spacing, (3, 1)), atol=1e-4)
    assert spacing >= 4.0  # at least the slice thickness
    assert all(list(x.patient_table_position) == [0.0, 0.0, 0.0] for x in img)


@pytest.mark.parametrize(
    ("orientation", "read", "phase"),
    [("sagittal", [0, 1, 0], [0, 0, -1]), ("coronal", [1, 0, 0], [0, 0, -1])],
)
def test_orientations(orientation: str, read: list[int], phase: list[int]) -> None:
    scan = simulate_scan(matrix=32, slices=2, coils=2, orientation=orientation, snr=math.inf)
    a = imaging(scan)[0]
    np.testing.assert_allclose(a.read_dir, read)
    np.testing.assert_allclose(a.phase_dir, phase)
    np.testing.assert_allclose(a.slice_dir, np.cross(read, phase))
    assert scan.brain_mask.sum(axis=(1, 2)).min() > 50  # brain in every slice


# --- signal, coils, noise ---------------------------------------------------------------


def test_ifft_rss_reproduces_ground_truth(noiseless: SimulatedScan) -> None:
    k = kspace(noiseless)
    assert k.shape == (3, 8, 64, 128)
    imgs = coil_images(k)  # (z, coils, y, x)
    expected = noiseless.coil_maps.transpose(1, 0, 2, 3) * noiseless.images[:, None]
    assert nrmse(imgs, expected) < 1e-4
    rss = np.sqrt(np.sum(np.abs(imgs) ** 2, axis=1))
    rss_maps = np.sqrt(np.sum(np.abs(noiseless.coil_maps) ** 2, axis=0))
    assert nrmse(rss, np.abs(noiseless.images) * rss_maps) < 1e-4


def test_ground_truth_is_plausible(noiseless: SimulatedScan) -> None:
    assert noiseless.images.dtype == np.complex64 and noiseless.coil_maps.dtype == np.complex64
    assert noiseless.images.shape == (3, 64, 64)
    assert noiseless.coil_maps.shape == (8, 3, 64, 64)
    rss = np.sqrt(np.sum(np.abs(noiseless.coil_maps) ** 2, axis=0))
    assert rss[noiseless.brain_mask].mean() == pytest.approx(1.0, rel=1e-5)
    mag = np.abs(noiseless.images)
    assert mag[:, 0, :].max() == 0 and mag[:, :, 0].max() == 0  # air at the FOV edge
    assert 0.1 < noiseless.brain_mask.mean() < 0.6
    # smooth coil maps: neighbouring pixels differ by a few percent inside the brain
    grad = np.abs(np.diff(noiseless.coil_maps, axis=-1))[..., noiseless.brain_mask[:, :, 1:]]
    assert np.median(grad / np.abs(noiseless.coil_maps).max()) < 0.02
    phase = np.angle(noiseless.images[1])
    assert np.ptp(phase[noiseless.brain_mask[1]]) > 0.05  # a background phase exists


def test_contrasts_order_tissues() -> None:
    s = {
        c: {t: tissue_signal(TISSUES_3T[t], p) for t in TISSUES_3T} for c, p in PRESETS_2D.items()
    }
    assert s["t1w"]["fat"] > s["t1w"]["wm"] > s["t1w"]["gm"] > s["t1w"]["csf"]
    assert s["t2w"]["csf"] > s["t2w"]["gm"] > s["t2w"]["wm"]
    assert s["pd"]["gm"] > s["pd"]["wm"]
    assert max(abs(s["pd"][t] / s["pd"]["gm"] - 1) for t in ("wm", "csf")) < 0.25  # flat


def test_noise_scan_measures_the_noise_covariance(noisy: SimulatedScan) -> None:
    samples = np.concatenate([a.data for a in noise(noisy)], axis=1)  # (coils, n)
    assert samples.shape == (8, 20000)
    measured = samples @ samples.conj().T / samples.shape[1]
    cov = noisy.noise_covariance
    d = np.sqrt(np.real(np.diag(cov)))
    # every entry within 3 standard errors (sqrt(Cii Cjj / n))
    assert np.abs(measured - cov).max() / d.max() ** 2 < 3 / math.sqrt(20000)
    np.testing.assert_allclose(np.real(np.diag(measured)), np.real(np.diag(cov)), rtol=0.05)
    corr = np.abs(cov / np.outer(d, d))[~np.eye(8, dtype=bool)]
    assert 0.03 < corr.mean() < 0.4 and corr.max() < 0.9  # realistic coupling
    np.testing.assert_allclose(cov, cov.conj().T)
    assert np.linalg.eigvalsh(cov).min() > 0


def test_imaging_noise_has_the_covariance_and_snr(
    noisy: SimulatedScan, noiseless: SimulatedScan
) -> None:
    clean, dirty = coil_images(kspace(noiseless)), coil_images(kspace(noisy))
    n = (dirty - clean).transpose(1, 0, 2, 3).reshape(8, -1)  # image-domain noise per coil
    measured = n @ n.conj().T / n.shape[1]
    cov = noisy.noise_covariance
    np.testing.assert_allclose(np.real(np.diag(measured)), np.real(np.diag(cov)), rtol=0.05)
    # snr = mean RSS signal in the brain / per-channel noise std
    signal = np.sqrt(np.sum(np.abs(clean) ** 2, axis=1))[noisy.brain_mask].mean()
    sigma = math.sqrt(np.real(np.trace(measured)) / 8)
    assert signal / sigma == pytest.approx(20.0, rel=0.03)
    # the same from the noisy data alone: noise from the air around the head
    air = np.abs(noisy.images) == 0
    sigma_air = math.sqrt(np.mean(np.abs(dirty.transpose(1, 0, 2, 3)[:, air]) ** 2))
    assert signal / sigma_air == pytest.approx(20.0, rel=0.05)


def test_snr_scales_noise_not_signal() -> None:
    a = simulate_scan(matrix=32, slices=1, coils=4, snr=10.0, seed=2)
    b = simulate_scan(matrix=32, slices=1, coils=4, snr=40.0, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    ratio = np.real(np.trace(a.noise_covariance)) / np.real(np.trace(b.noise_covariance))
    assert ratio == pytest.approx(16.0, rel=1e-5)


def test_repetitions_share_the_object_not_the_noise(accelerated: SimulatedScan) -> None:
    k0, k1 = kspace(accelerated, 0), kspace(accelerated, 1)
    d = np.abs(k0 - k1)[k0 != 0]
    sigma = math.sqrt(np.real(np.trace(accelerated.noise_covariance)) / 6)
    assert np.sqrt(np.mean(d**2)) == pytest.approx(math.sqrt(2) * sigma, rel=0.1)


# --- time stamps ----------------------------------------------------------------------


def test_time_stamps_advance_by_tr(accelerated: SimulatedScan) -> None:
    acqs = accelerated.acquisitions
    stamps = np.array([a.acquisition_time_stamp for a in acqs], np.int64)
    assert np.all(np.diff(stamps) >= 0)
    img = imaging(accelerated)
    assert stamps[len(noise(accelerated))] > stamps[0]  # noise scan first
    tr_ticks = PRESETS_2D["t1w"].tr_ms / TICK_MS
    per_slice: dict[tuple[int, int], list[int]] = defaultdict(list)
    for a in img:
        per_slice[(a.idx.repetition, a.idx.slice)].append(a.acquisition_time_stamp)
    for t in per_slice.values():
        assert np.all(np.abs(np.diff(t) - tr_ticks) <= 1)
    # four slices interleaved within one TR: the whole scan lasts lines x repetitions x TR
    duration_ms = (img[-1].acquisition_time_stamp - img[0].acquisition_time_stamp) * TICK_MS
    assert duration_ms == pytest.approx((28 * 2 - 1) * 250.0, abs=250.0)
    assert all(0 <= a.physiology_time_stamp[0] < 1000 / TICK_MS for a in acqs)


def test_user_tr_and_echo_trains() -> None:
    scan = simulate_scan(matrix=32, slices=2, coils=1, tr_ms=500.0, te_ms=5.0, snr=math.inf,
                         noise_samples=0)
    assert scan.header.sequenceParameters.TR == [500.0]
    t = [a.acquisition_time_stamp for a in scan.acquisitions if a.idx.slice == 0]
    assert set(np.diff(t).tolist()) == {200}
    tse = simulate_scan(matrix=32, slices=2, coils=1, contrast="t2w", snr=math.inf,
                        noise_samples=0)
    etl = PRESETS_2D["t2w"].echo_train_length  # 16 lines per TR and slice, 10 ms apart
    t = np.array([a.acquisition_time_stamp for a in tse.acquisitions if a.idx.slice == 0])
    assert np.all(np.abs(np.diff(t[:etl]) - 10.0 / TICK_MS) <= 1)
    assert t[etl] - t[0] == pytest.approx(4000.0 / TICK_MS, abs=1)
    assert tse.header.encoding[0].echoTrainLength == etl


def test_slices_that_do_not_fit_in_tr_are_split_into_concatenations() -> None:
    scan = simulate_scan(matrix=32, slices=6, coils=1, tr_ms=40.0, snr=math.inf, noise_samples=0)
    longs = {p.name: p.value for p in scan.header.userParameters.userParameterLong}
    assert longs["concatenations"] > 1
    stamps = [a.acquisition_time_stamp for a in scan.acquisitions]
    assert stamps == sorted(stamps)


# --- 3D -------------------------------------------------------------------------------


def test_3d_slab() -> None:
    scan = simulate_scan(matrix=32, slices=1, kz=4, coils=3, snr=math.inf, noise_samples=0)
    enc = scan.header.encoding[0]
    assert enc.encodedSpace.matrixSize.z == 4
    assert enc.encodingLimits.kspace_encoding_step_2.center == 2
    acqs = scan.acquisitions
    assert len(acqs) == 32 * 4
    assert {a.idx.kspace_encode_step_2 for a in acqs} == {0, 1, 2, 3}
    assert sum(flag(a, ismrmrd.ACQ_FIRST_IN_ENCODE_STEP1) for a in acqs) == 4
    assert flag(acqs[0], ismrmrd.ACQ_FIRST_IN_ENCODE_STEP2)
    assert flag(acqs[-1], ismrmrd.ACQ_LAST_IN_ENCODE_STEP2)
    imgs = coil_images(kspace(scan), three_d=True)
    expected = scan.coil_maps.transpose(1, 0, 2, 3) * scan.images[:, None]
    assert nrmse(imgs, expected) < 1e-4


# --- files, anatomy, arguments ----------------------------------------------------------


def test_write_scan_round_trip(tmp_path: Path, accelerated: SimulatedScan) -> None:
    path = write_scan(accelerated, tmp_path / "scan.h5")
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dset:
        header = dset.read_xml_header()
        assert (header.decode() if isinstance(header, bytes) else header) == accelerated.header_xml
        assert dset.number_of_acquisitions() == len(accelerated.acquisitions)
        for i, a in enumerate(accelerated.acquisitions):
            b = dset.read_acquisition(i)
            assert bytes(b.getHead()) == bytes(a.getHead())
            np.testing.assert_array_equal(b.data, a.data)
    # same bytes as ismrmrd's own per-acquisition writer
    ref = tmp_path / "ref.h5"
    with ismrmrd.Dataset(str(ref), "dataset", create_if_needed=True) as dset:
        dset.write_xml_header(accelerated.header_xml.encode())
        for a in accelerated.acquisitions:
            dset.append_acquisition(a)
    with h5py.File(path) as f, h5py.File(ref) as g:
        assert f["dataset/data"].dtype == g["dataset/data"].dtype
        np.testing.assert_array_equal(f["dataset/data"]["head"], g["dataset/data"]["head"])
    assert write_scan(accelerated, path) == path  # overwrites


def test_ismrmrd_reference_recon_reads_the_file(tmp_path: Path) -> None:
    exe = shutil.which("ismrmrd_recon_cartesian_2d")  # from ismrmrd-tools (.ci/run)
    if exe is None:
        pytest.skip("ismrmrd_recon_cartesian_2d not installed")
    scan = simulate_scan(matrix=64, slices=1, coils=4, snr=math.inf, noise_samples=0)
    path = write_scan(scan, tmp_path / "scan.h5")
    subprocess.run([exe, str(path)], check=True, capture_output=True, cwd=tmp_path, timeout=60)
    with h5py.File(path) as f:
        recon = f["dataset/cpp/data"][0, 0, 0]  # its RSS image, (y, x)
    expected = np.sqrt(np.sum(np.abs(scan.coil_maps[:, 0] * scan.images[0]) ** 2, axis=0))
    assert nrmse(recon / np.linalg.norm(recon), expected / np.linalg.norm(expected)) < 1e-4


def test_mni_templates_are_packaged_and_read_offline(monkeypatch, tmp_path: Path) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nilearn_data"))
    monkeypatch.setenv("NILEARN_SHARED_DATA", str(tmp_path / "nilearn_shared"))
    paths = mni152_template_paths()
    import nilearn

    package = Path(nilearn.__file__).parent
    assert all(package in p.parents for p in paths.values())
    _head_model.cache_clear()
    model = _head_model()
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template

    t1 = load_mni152_template().get_fdata()  # nilearn's loader, offline too
    gm = load_mni152_gm_template().get_fdata()
    np.testing.assert_allclose(model.gm / 255.0, gm, atol=1e-6)
    assert ((t1 > 0.1) <= (model.brain > 0)).all()
    assert not (tmp_path / "nilearn_data").exists() and not (tmp_path / "nilearn_shared").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(matrix=63), "even"),
        (dict(matrix=4), "matrix"),
        (dict(matrix=64.0), "integer"),
        (dict(acceleration=0), "acceleration"),
        (dict(matrix=32, acceleration=2, acs_lines=40), "acs_lines"),
        (dict(acs_lines=-1), "acs_lines"),
        (dict(slices=0), "slices"),
        (dict(coils=0), "coils"),
        (dict(repetitions=0), "repetitions"),
        (dict(contrast="flair"), "contrast"),
        (dict(orientation="oblique"), "orientation"),
        (dict(fov_mm=-1.0), "fov_mm"),
        (dict(slice_thickness_mm=0.0), "slice_thickness_mm"),
        (dict(tr_ms=10.0, te_ms=20.0), "te_ms"),
        (dict(contrast="t2w", tr_ms=150.0), "echo train"),
        (dict(snr=0.0), "snr"),
        (dict(noise_samples=-5), "noise_samples"),
        (dict(kz=4), "slices=1"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_scan(**kwargs)
