"""SENSE gadget and ESPIRiT maps: against the simulator's ground truth, sigpy, and real data.

References not written here: the simulator's true coil maps and object (``inline.simulate``:
Biot-Savart loop coils, MNI152 anatomy), ``sigpy.mri.app.EspiritCalib`` (full-grid ESPIRiT),
and the real Skyra R=3 scan from ``../shared/data`` streamed over a socket.
"""

from __future__ import annotations

from functools import cache

import ismrmrd
import numpy as np
import pytest
from chain_helpers import DATA_DIR, REPO, build_chain, centred_ifft, context, payloads, run_chain
from scipy import ndimage

from gadgets.accumulate import AcquisitionAccumulateTrigger
from gadgets.espirit import CalibrationError, calibration_region, espirit_maps
from gadgets.noise import NoiseAdjust
from gadgets.oversampling import RemoveReadoutOversampling
from gadgets.sense import SENSE
from inline.buffers import ReconBuffer
from inline.simulate import simulate_scan

SENSE_CONFIG = REPO / "configs" / "sense.yaml"
SKYRA = "siemens_skyra_ssfp_14ch_R3_phantom.h5"


@cache
def simulated(matrix: int, coils: int, r: int, snr: float = float("inf"), repetitions: int = 1, slices: int = 1):
    scan = simulate_scan(
        matrix=matrix, coils=coils, slices=slices, acceleration=r, acs_lines=24, snr=snr, repetitions=repetitions
    )
    ctx = context(scan.header)
    stages = [NoiseAdjust(ctx), RemoveReadoutOversampling(ctx), AcquisitionAccumulateTrigger(ctx)]
    return scan, payloads(run_chain(stages, scan.acquisitions), ReconBuffer)


def truth(scan, z: int = 0) -> np.ndarray:
    """|object| x RSS of the true maps: what an ESPIRiT-SENSE magnitude image should be."""
    return np.abs(scan.images[z]) * np.sqrt(np.sum(np.abs(scan.coil_maps[:, z]) ** 2, axis=0))


def image_of(out: ReconBuffer) -> np.ndarray:
    return centred_ifft(out.data[0, 0], (0, 1))


def nrmse(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(x[mask] - ref[mask]) / np.linalg.norm(ref[mask]))


def fitted_nrmse(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """NRMSE after a least-squares scale: with noise, NoiseAdjust's prewhitening puts images in noise units."""
    scale = float(x[mask] @ ref[mask]) / float(x[mask] @ x[mask])
    return nrmse(scale * x, ref, mask)


# -- coil maps ------------------------------------------------------------------------
@pytest.mark.parametrize("matrix, coils, r", [(64, 8, 2), (96, 16, 4)])
def test_espirit_maps_match_true_coil_maps(matrix, coils, r):
    # noise-free: with noise, prewhitening turns the true maps S into L^-1 S
    scan, (buf,) = simulated(matrix, coils, r)
    calib = calibration_region(buf.reference, buf.reference_sampled, 24)
    assert calib.shape == (coils, 1, 24, 24)
    maps, lam = espirit_maps(calib[:, 0], (matrix, matrix))
    s_true = scan.coil_maps[:, 0]
    s_true = s_true / np.linalg.norm(s_true, axis=0)
    inner = np.abs(np.sum(np.conj(maps) * s_true, axis=0))[scan.brain_mask[0]]
    print(f"|<s_est, s_true>| in brain: mean {inner.mean():.5f}, 1st percentile {np.percentile(inner, 1):.5f}")
    assert inner.mean() > 0.995 and np.percentile(inner, 1) > 0.98
    assert lam[scan.brain_mask[0]].min() > 0.8  # nothing in the brain cropped


def test_espirit_maps_match_sigpy_full_grid():
    sigpy_app = pytest.importorskip("sigpy.mri.app")
    scan, (buf,) = simulated(64, 8, 2, snr=40.0)
    calib = calibration_region(buf.reference, buf.reference_sampled, 24)
    ours, _ = espirit_maps(calib[:, 0], (64, 64), kernel_width=6, threshold=0.02, crop=0.8, grid=32)
    ksp = np.zeros((8, 64, 64), np.complex64)
    ksp[:, 20:44, 20:44] = calib[:, 0]
    theirs = sigpy_app.EspiritCalib(ksp, calib_width=24, thresh=0.02, kernel_width=6, crop=0.8, show_pbar=False).run()
    inner = np.abs(np.sum(np.conj(ours) * theirs, axis=0))[scan.brain_mask[0]]
    assert inner.mean() > 0.9999 and inner.min() > 0.999


def test_calibration_region_needs_centre_lines():
    _, (buf,) = simulated(64, 8, 2)
    with pytest.raises(CalibrationError):
        calibration_region(buf.data, np.zeros_like(buf.sampled), 24)


# -- reconstruction -------------------------------------------------------------------
@pytest.mark.parametrize("matrix, coils, r, limit", [(64, 8, 2, 0.01), (96, 16, 4, 0.03)])
def test_sense_matches_ground_truth(matrix, coils, r, limit):
    scan, (buf,) = simulated(matrix, coils, r)
    params = SENSE.Params(tolerance=1e-3)  # noise-free: converge further than the default
    out = SENSE(context(scan.header), params).apply(buf)
    assert out.data.shape == (1, 1, matrix, matrix) and out.sampled.all() and out.history[-1] == "SENSE"
    mask = scan.brain_mask[0]
    err = nrmse(np.abs(image_of(out)), truth(scan), mask)
    zero_filled = np.sqrt(np.sum(np.abs(centred_ifft(buf.data[:, 0], (1, 2))) ** 2, axis=0))
    err_zf = nrmse(zero_filled, truth(scan), mask)
    acs = SENSE(context(scan.header), params.model_copy(update={"map_method": "acs"})).apply(buf)
    err_acs = fitted_nrmse(np.abs(image_of(acs)), truth(scan), mask)  # ACS maps: image on the object's scale
    print(f"R={r}: NRMSE in brain: SENSE/ESPIRiT {err:.4f}, SENSE/ACS {err_acs:.4f}, zero-filled {err_zf:.4f}")
    assert err < limit
    assert err_acs < 0.15
    assert err_zf > 0.4


def test_fully_sampled_gives_coil_combined_image():
    scan, (buf,) = simulated(64, 8, 1)
    out = SENSE(context(scan.header)).apply(buf)
    err = nrmse(np.abs(image_of(out)), truth(scan), scan.brain_mask[0])
    assert err < 2e-3


def test_cg_residual_decreases():
    scan, (buf,) = simulated(96, 16, 4, snr=40.0)
    gadget = SENSE(context(scan.header), SENSE.Params(iterations=25, tolerance=0.0))
    gadget.apply(buf)
    res = gadget.last_result.residuals
    assert gadget.last_result.iterations == 25 and len(res) == 26
    assert res[0] == 1.0 and res[-1] < 1e-3
    assert all(b < a for a, b in zip(res[::5], res[5::5]))  # falls over every 5 iterations


def test_maps_cached_across_repetitions_and_recomputed_on_new_calibration():
    scan, bufs = simulated(64, 8, 2, snr=40.0, repetitions=3, slices=2)
    assert len(bufs) == 6
    gadget = SENSE(context(scan.header))
    outs = [gadget.apply(b) for b in bufs]
    assert gadget.map_computations == 2  # one per slice position
    mask = scan.brain_mask
    for b, o in zip(bufs, outs):
        assert fitted_nrmse(np.abs(image_of(o)), truth(scan, b.index.slice), mask[b.index.slice]) < 0.25  # noise floor at SNR 40: ~0.16 fully sampled
    # a different calibration (e.g. the coil moved): new channel phases
    moved = bufs[0]
    phases = np.exp(1j * np.linspace(0, 3, moved.data.shape[0])).astype(np.complex64)[:, None, None, None]
    moved = ReconBuffer(**{**moved.__dict__, "data": moved.data * phases, "reference": moved.reference * phases})
    gadget.apply(moved)
    assert gadget.map_computations == 3
    # a buffer without calibration reuses the cached maps
    bare = ReconBuffer(**{**bufs[1].__dict__, "reference": None, "reference_sampled": None})
    gadget.apply(bare)
    assert gadget.map_computations == 3


def test_no_maps_and_no_calibration_is_an_error():
    scan, (buf,) = simulated(64, 8, 4)
    sampled = buf.sampled.copy()
    sampled[:, 1::2] = False  # no contiguous centre block
    bare = ReconBuffer(**{**buf.__dict__, "reference": None, "reference_sampled": None, "sampled": sampled})
    with pytest.raises(CalibrationError):
        SENSE(context(scan.header)).apply(bare)


def test_sense_chain_config():
    scan, _ = simulated(64, 8, 2)
    chain = build_chain(scan.header, SENSE_CONFIG, overrides={"finish": {"data_type": "float"}})
    images = payloads(run_chain(chain, scan.acquisitions), ismrmrd.Image)
    assert len(images) == 1
    img = images[0].data[0, 0]
    assert img.shape == (64, 64)
    t = truth(scan)
    mask = scan.brain_mask[0]
    assert nrmse(img, t, mask) < 0.01  # no autoscaling with data_type float


# -- real data over a socket ----------------------------------------------------------
def ghost_ratio(image: np.ndarray, object_mask: np.ndarray, r: int) -> float:
    """Mean in the background where R-fold aliases of the object land / mean in the object."""
    ny = image.shape[0]
    grown = ndimage.binary_dilation(object_mask, iterations=3)
    ghosts = np.zeros_like(object_mask)
    for k in range(1, r):
        ghosts |= np.roll(object_mask, round(k * ny / r), axis=0)
    ghosts &= ~grown
    assert ghosts.sum() > 100
    return float(image[ghosts].mean() / image[object_mask].mean())


def test_real_skyra_r3_over_socket(server):
    from inline.client import send_scan
    from inline.mrdfile import read_scan

    path = DATA_DIR / SKYRA
    if not path.exists():
        pytest.skip(f"real scanner data {path} not found (expected in ../shared/data next to the repo)")
    scan = read_scan(path)
    images = {}
    for config in ("default", "sense"):
        res = send_scan(scan, "127.0.0.1", server.port, config_name=config, parameters={"finish.data_type": "float"})
        assert res.closed and not res.errors, res.texts
        assert len(res.images) == 1
        images[config] = np.abs(res.images[0].data[0, 0]).astype(np.float64)
    sense, default = images["sense"], images["default"]
    assert sense.shape == default.shape
    # object: the SENSE image above 25 % of its (99th-percentile) peak, holes filled; the same
    # object and ghost regions are used for both images
    peak = np.percentile(sense, 99)
    obj = ndimage.binary_fill_holes(ndimage.binary_opening(sense > 0.25 * peak, iterations=2))
    g_sense, g_default = ghost_ratio(sense, obj, 3), ghost_ratio(default, obj, 3)
    print(f"Skyra R=3 ghost-to-signal: SENSE {g_sense:.4f}, zero-filled default chain {g_default:.4f}")
    assert g_sense < 0.3 * g_default
