"""CompressedSensing: accuracy against the simulator's ground truth, solver properties, map caching.

Ground truth: the RSS of the simulator's noise-free coil images (``coil_maps * images``),
which is what an ESPIRiT-map SENSE image equals in magnitude (maps normalised per pixel).
Prewhitening is left out so that truth stays in the same units; one real scale is fitted
per image (the same fit for every method), NRMSE over the object support.
"""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import pywt
from chain_helpers import build_chain, context, payloads, run_chain

from gadgets.cs import BartRand, BartWavelet, CompressedSensing, SenseL1Wavelet
from gadgets.fft_recon import centred_ifft
from inline.buffers import ReconBuffer
from inline.registry import lookup
from inline.simulate import simulate_scan

CS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cs.yaml"


def buffer_of(scan) -> ReconBuffer:
    ctx = context(scan.header)
    chain = [lookup(n)(ctx) for n in ("RemoveReadoutOversampling", "AcquisitionAccumulateTrigger")]
    bufs = payloads(run_chain(chain, scan.acquisitions), ReconBuffer)
    assert len(bufs) == 1
    return bufs[0]


@pytest.fixture(scope="module")
def r4_case():
    scan = simulate_scan(matrix=96, slices=1, coils=8, acceleration=4, acs_lines=24, snr=30, seed=1, noise_samples=0)
    truth = np.sqrt(np.sum(np.abs(scan.coil_maps * scan.images[None]) ** 2, axis=0))[0]
    return scan, buffer_of(scan), truth


def score(image: np.ndarray, truth: np.ndarray) -> float:
    support = truth > 0.05 * truth.max()
    a, t = np.abs(image)[support], truth[support]
    return float(np.linalg.norm(np.dot(a, t) / np.dot(a, a) * a - t) / np.linalg.norm(t))


def gadget(header, **params) -> CompressedSensing:
    return CompressedSensing(context(header), CompressedSensing.Params(**params))


def test_cs_beats_zero_filled_and_l2_sense(r4_case):
    scan, buf, truth = r4_case
    assert int(buf.sampled.sum()) == 24 and buf.reference is not None
    zero_filled = np.sqrt(np.sum(np.abs(centred_ifft(buf.data, (2, 3))) ** 2, axis=0))[0]
    g = gadget(scan.header, **{"lambda": 0.002})
    cs = score(g.reconstruct(buf).image[0], truth)
    l2 = score(gadget(scan.header, **{"lambda": 0.0, "iterations": 100}).reconstruct(buf).image[0], truth)
    zf = score(zero_filled, truth)
    print(f"NRMSE vs truth: CS {cs:.4f}, l2 SENSE {l2:.4f}, zero-filled {zf:.4f}")
    assert cs < 0.8 * l2
    assert cs < 0.1 * zf
    assert cs < 0.04


def test_objective_decreases(r4_case):
    scan, buf, _ = r4_case
    g = gadget(scan.header)
    maps = g.maps_for(buf)
    op = SenseL1Wavelet(maps, buf.sampled | buf.reference_sampled)
    data = np.where((buf.reference_sampled & ~buf.sampled)[None, :, :, None], buf.reference, buf.data)
    obj = op.solve(data, 0.005, iterations=40, random_shifts=False, track_objective=True).objective
    assert obj[-1] < 0.2 * obj[0]
    assert obj[-1] <= min(obj[5:10])
    # FISTA is not monotone, but late iterations change the objective very little
    assert abs(obj[-1] - obj[-2]) < 1e-3 * obj[0]


def test_fully_sampled_returns_coil_combined_image():
    scan = simulate_scan(matrix=64, slices=1, coils=8, acceleration=1, snr=40, seed=2, noise_samples=0)
    buf = buffer_of(scan)
    assert bool(buf.sampled.all()) and buf.reference is None
    g = gadget(scan.header, **{"lambda": 0.0, "iterations": 10})
    image = g.reconstruct(buf).image
    maps = g.maps_for(buf)
    combined = np.sum(np.conj(maps) * centred_ifft(buf.data, (2, 3)), axis=0)  # S^H F^H y
    inside = np.sum(np.abs(maps) ** 2, axis=0) > 0
    err = np.linalg.norm((image - combined)[inside]) / np.linalg.norm(combined[inside])
    assert err < 1e-4


def test_gadget_output_is_one_virtual_coil(r4_case):
    scan, buf, _ = r4_case
    g = gadget(scan.header)
    out = g.apply(buf)
    assert out.data.shape == (1, 1, 96, 96) and out.data.dtype == np.complex64
    assert bool(out.sampled.all()) and out.reference is None
    assert out.history[-1] == "CS-L1WAVELET"
    image = centred_ifft(out.data, (2, 3))[0]
    direct = g.reconstruct(buf).image
    assert np.linalg.norm(image - direct) / np.linalg.norm(direct) < 1e-5


def test_maps_cached_per_slice_and_recomputed_on_new_calibration(r4_case):
    scan, buf, _ = r4_case
    g = gadget(scan.header)
    m1 = g.maps_for(buf)
    assert g.maps_for(buf) is m1 and g.calibrations == 1
    # new noise on the same calibration: within the threshold, maps kept
    rng = np.random.default_rng(0)
    noisy = np.where(buf.reference != 0, buf.reference + 1e-3 * np.abs(buf.reference).max() * rng.standard_normal(buf.reference.shape), 0)
    buf2 = ReconBuffer(**{**buf.__dict__, "reference": noisy.astype(np.complex64)})
    assert g.maps_for(buf2) is m1 and g.calibrations == 1
    # a different calibration (coils swapped): recomputed
    buf3 = ReconBuffer(**{**buf.__dict__, "reference": buf.reference[::-1].copy()})
    assert g.maps_for(buf3) is not m1 and g.calibrations == 2
    # another slice position has its own entry
    buf4 = ReconBuffer(**{**buf.__dict__, "index": buf.index._replace(slice=1)})
    g.maps_for(buf4)
    assert g.calibrations == 3


def test_cs_chain_config_runs_end_to_end(r4_case):
    scan, _, truth = r4_case
    chain = build_chain(scan.header, CS_CONFIG, overrides={"finish": {"data_type": "float"}, "noise": {"perform_noise_adjust": False}})
    images = payloads(run_chain(chain, scan.acquisitions), ismrmrd.Image)
    assert len(images) == 1
    img = images[0].data[0, 0]
    assert img.shape == truth.shape
    assert score(img, truth) < 0.05


def test_bart_wavelet_matches_pywt_and_reconstructs():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((70, 1, 96)) + 1j * rng.standard_normal((70, 1, 96))).astype(np.complex64)
    w = BartWavelet(x.shape, (0, 1, 2))
    assert w.levels == {0: 3, 2: 3}  # 70 -> 36 -> 19 -> 11; 96 -> 49 -> 26 -> 14
    assert np.abs(w.inverse(w.forward(x)) - x).max() < 1e-5
    ca, cd = pywt.dwt(x[:, 0, 5], "db2", mode="symmetric")  # BART's boundary = pywt "symmetric"
    assert np.allclose(w._down(x, 0, 0)[:, 0, 5], ca, atol=1e-5)
    assert np.allclose(w._down(x, 0, 1)[:, 0, 5], cd, atol=1e-5)


def test_bart_rand_is_glibc_rand_r():
    r = BartRand(1)
    assert [r.rand_r() for _ in range(3)] == [476707713, 1186278907, 505671508]  # ctypes libc.rand_r, seed 1
