"""The default chain end to end over a real socket on every real scan in ../shared/data;
journal replay; the command line."""

from __future__ import annotations

import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared_data_files, wait_for_files
from inline.cli import app
from inline.client import send_scan
from inline.config import load_chain
from inline.imagefile import read_images
from inline.mrdfile import RawScan, read_scan
from inline.offline import run_chain
from inline.protocol import parse_header
from inline.session import LATENCY_META_KEY

pytestmark = pytest.mark.timeout(300)

NOT_IMAGE = (
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,
    ismrmrd.ACQ_IS_NAVIGATION_DATA,
    ismrmrd.ACQ_IS_PHASECORR_DATA,
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
)


def expected_images(scan) -> dict[tuple, ismrmrd.Acquisition]:
    """One image per (slice, contrast, phase, repetition, set) of imaging lines."""
    out = {}
    for a in scan.acquisitions:
        if any(a.is_flag_set(f) for f in NOT_IMAGE):
            continue
        out.setdefault((a.idx.slice, a.idx.contrast, a.idx.phase, a.idx.repetition, a.idx.set), a)
    return out


@pytest.mark.parametrize("name", [p.name for p in shared_data_files()] or ["(absent)"])
def test_default_chain_on_real_scanner_data(name, server, shared_data):
    path = shared_data / name
    scan = read_scan(path)
    header = parse_header(scan.header_xml)
    enc = header.encoding[0]
    res = send_scan(scan, "127.0.0.1", server.port, config_name="default")
    assert res.closed and not res.errors, res.texts
    expected = expected_images(scan)
    assert len(res.images) == len(expected)
    for im in res.images:
        key = (im.slice, im.contrast, im.phase, im.repetition, im.set)
        assert key in expected
        ref = expected[key]
        assert tuple(im.matrix_size) == (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.z)
        np.testing.assert_allclose(
            im.field_of_view,
            [enc.reconSpace.fieldOfView_mm.x, enc.reconSpace.fieldOfView_mm.y, enc.reconSpace.fieldOfView_mm.z],
            rtol=1e-6,
        )
        for attr in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            np.testing.assert_allclose(getattr(im, attr), getattr(ref, attr), atol=1e-5, err_msg=attr)
        assert im.measurement_uid == ref.measurement_uid
        assert im.image_series_index >= 1 and im.image_index >= 1
        meta = ismrmrd.Meta.deserialize(im.attribute_string)
        for key_ in ("DataRole", "ImageProcessingHistory", "WindowCenter", "WindowWidth", "SeriesDescription", LATENCY_META_KEY):
            assert key_ in meta, key_
        assert float(meta[LATENCY_META_KEY]) > 0
        data = np.asarray(im.data)
        assert data.shape == (1, enc.reconSpace.matrixSize.z, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.x)
        assert np.isfinite(data).all() and data.max() > 0
    indices = sorted(im.image_index for im in res.images)
    assert indices == list(range(1, len(res.images) + 1))


def test_journal_replays_bit_for_bit(server, small_scan):
    res = send_scan(read_scan(small_scan), "127.0.0.1", server.port, config_name="default")
    assert res.closed and not res.errors and len(res.images) == 2
    journal_dir = Path(server.settings.journal_dir)
    h5 = wait_for_files(journal_dir, "*.h5")
    mrd = sorted(journal_dir.glob("*.mrd"))
    assert len(h5) == 1 and len(mrd) == 1
    for journal in (h5[0], mrd[0]):
        replay = run_chain(load_chain("default"), read_scan(journal))
        assert len(replay.images) == len(res.images)
        for a, b in zip(sorted(res.images, key=lambda i: i.image_index), sorted(replay.images, key=lambda i: i.image_index)):
            assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()
            ha, hb = a.getHead(), b.getHead()
            ha.attribute_string_len = hb.attribute_string_len = 0  # set by serialization only
            assert bytes(ha) == bytes(hb)
            meta_a, meta_b = ismrmrd.Meta.deserialize(a.attribute_string), ismrmrd.Meta.deserialize(b.attribute_string)
            del meta_a[LATENCY_META_KEY]  # added at send, only on the server path
            assert dict(meta_a) == dict(meta_b)


def test_journal_replays_bit_for_bit_with_early_snapshots(server):
    """The opt-in latency mode too: 16 coils (two coil chunks, summed in order on any thread),
    snapshots four lines early; whether a snapshot was done before its slice's last line (at
    the scanner's pace) or not (the replay reads as fast as it can) does not show."""
    from inline.simulate import simulate_scan

    sim = simulate_scan(matrix=64, slices=3, coils=16, snr=40, seed=5, tr_ms=10.0)
    params = {"accumulate.early_lines": 4}
    res = send_scan(RawScan(sim.header_xml, list(sim.acquisitions)), "127.0.0.1", server.port, config_name="default", parameters=params, pace="realtime")
    assert res.closed and not res.errors and len(res.images) == 3
    deadline = time.monotonic() + 10
    while not server.finished and time.monotonic() < deadline:
        time.sleep(0.02)
    session = server.finished[-1]
    fft = next(g for g in session.runner.gadgets if type(g).__name__ == "FFTRecon")
    assert fft.patched == 3 and fft.transformed == 0  # every slice from its snapshot
    (h5,) = wait_for_files(Path(server.settings.journal_dir), "*.h5")
    replay = run_chain(load_chain("default"), read_scan(h5), parameters=params)
    key = lambda i: i.image_index  # noqa: E731
    for a, b in zip(sorted(res.images, key=key), sorted(replay.images, key=key)):
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()


def test_cli_send_and_run(server, small_scan, tmp_path):
    runner = CliRunner()
    out = tmp_path / "sent.h5"
    r = runner.invoke(app, ["send", str(small_scan), "--port", str(server.port), "--config", "default", "-o", str(out), "--previews", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert "latency after last readout" in r.output
    groups = read_images(out)
    assert list(groups) == ["image_1"] and len(groups["image_1"]) == 2
    assert (tmp_path / "png" / "preview_series1.png").stat().st_size > 1000
    # ismrmrd.Dataset reads what we wrote
    ds = ismrmrd.Dataset(str(out), "dataset", create_if_needed=False)
    assert ds.number_of_images("image_1") == 2
    ds.close()

    out2 = tmp_path / "offline.h5"
    r = runner.invoke(app, ["run", "default", str(small_scan), "-o", str(out2)])
    assert r.exit_code == 0, r.output
    offline = read_images(out2)["image_1"]
    for a, b in zip(groups["image_1"], offline):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))

    r = runner.invoke(app, ["send", str(small_scan), "--port", str(server.port), "--config", "nope"])
    assert r.exit_code == 1 and "ERROR" in r.output


def test_cli_send_config_file_and_pace(server, small_scan, tmp_path):
    chain = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    r = CliRunner().invoke(app, ["send", str(small_scan), "--port", str(server.port), "--config-file", str(chain), "--pace", "realtime", "-p", "image_series_index=3", "-o", str(tmp_path / "o.h5")])
    assert r.exit_code == 0, r.output
    assert list(read_images(tmp_path / "o.h5")) == ["image_3"]


def test_3d_scan_over_socket_matches_ground_truth(server):
    """A simulated 3D (kz) scan: one 3D image per volume, matrix and FOV from the header, and
    the RSS image agrees with the simulator's ground truth weighted by the RSS coil profile."""
    from inline.simulate import simulate_scan

    sim = simulate_scan(matrix=64, slices=1, kz=16, coils=8, snr=float("inf"), seed=3)
    scan = RawScan(sim.header_xml, list(sim.acquisitions))
    res = send_scan(scan, "127.0.0.1", server.port, config_name="default", parameters={"finish.data_type": "float"})
    assert res.closed and not res.errors, res.texts
    assert len(res.images) == 1
    im = res.images[0]
    assert tuple(im.matrix_size) == (64, 64, 16)
    vol = np.asarray(im.data)[0]  # (z, y, x)
    ref = np.abs(sim.images) * np.sqrt((np.abs(sim.coil_maps) ** 2).sum(axis=0))
    scale = (vol * ref).sum() / (ref * ref).sum()  # ImageFinish stores magnitude in its own units
    nrmse = np.linalg.norm(vol - scale * ref) / np.linalg.norm(scale * ref)
    assert nrmse < 1e-3, nrmse


def test_demo_streams_a_simulated_scan(tmp_path):
    from rich.console import Console

    from inline.demo import run_demo

    code = run_demo(None, tmp_path, pace="fast", slices=2, coils=4, matrix=64, console=Console(file=open(tmp_path / "log.txt", "w")))
    assert code == 0
    images = read_images(tmp_path / "out.h5")["image_1"]
    assert len(images) == 2 and tuple(images[0].matrix_size) == (64, 64, 1)
    assert (tmp_path / "preview_series1.png").stat().st_size > 1000
    assert len(list((tmp_path / "journal").glob("*.h5"))) == 1
    assert "latency after last readout" in (tmp_path / "log.txt").read_text()


def test_cli_lists_gadgets_and_configs():
    r = CliRunner().invoke(app, ["gadgets"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for name in ("NoiseAdjust", "RemoveReadoutOversampling", "AcquisitionAccumulateTrigger", "FFTRecon", "CoilCombine", "ImageFinish"):
        assert name in r.output
    assert "receiver_noise_bandwidth" in r.output and "walsh_kernel_size" in r.output
    assert "Dwell time of the noise scan [us]" in r.output  # units survive the table markup
    r = CliRunner().invoke(app, ["configs"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "default" in r.output and "NoiseAdjust" in r.output


def test_demo_streams_a_given_file(tmp_path, small_scan):
    from rich.console import Console

    from inline.demo import run_demo

    code = run_demo(small_scan, tmp_path, pace="realtime", console=Console(file=open(tmp_path / "log.txt", "w")))
    assert code == 0
    assert len(read_images(tmp_path / "out.h5")["image_1"]) == 2
