"""GRAPPA gadget alone: accuracy on simulated undersampled scans (2D R=2..4, 3D 2x2), weight
caching across repetitions, recalibration on changed ACS, data consistency of ACS lines,
partial-Fourier edges, pass-through and missing-calibration behaviour.

Ground truth: the same simulated object fully sampled (simulate_scan with acceleration=1 and
the same seed, noise-free), so the accuracy numbers do not depend on our own code.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
from chain_helpers import KSPACE_BUFFERS, build_stages, centred_fft, centred_ifft, context, make_header, payloads, run_chain

from gadgets.grappa import GRAPPA, GrappaError, apply_hybrid, apply_image, calibrate, find_lattice
from inline.buffers import AcquisitionIndex, EncodingInfo, ReconBuffer
from inline.gadget import Text
from inline.simulate import simulate_scan

M, C = 64, 8


@cache
def buffers(acceleration: int, repetitions: int = 1, snr: float = math.inf):
    scan = simulate_scan(
        matrix=M, coils=C, slices=1, acceleration=acceleration, acs_lines=24, repetitions=repetitions, seed=1, snr=snr
    )
    header = scan.header
    return header, payloads(run_chain(build_stages(header, overrides=KSPACE_BUFFERS), scan.acquisitions), ReconBuffer)


def rss(k: np.ndarray) -> np.ndarray:
    return np.sqrt((np.abs(centred_ifft(k, (2, 3))) ** 2).sum(0))


def nrmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def run(gadget: GRAPPA, buf: ReconBuffer) -> list:
    return [p for p, _ in gadget.process(buf, None)]


@pytest.mark.parametrize("method", ["hybrid", "image"])
@pytest.mark.parametrize("r, limit", [(2, 0.02), (3, 0.03), (4, 0.05)])
def test_2d_accuracy_vs_fully_sampled(r, limit, method):
    _, (full,) = buffers(1)
    header, (buf,) = buffers(r)
    truth = rss(full.data)
    (out,) = run(GRAPPA(context(header), GRAPPA.Params(method=method, lambda_rel=1e-3)), buf)  # noise-free: little regularisation
    assert isinstance(out, ReconBuffer) and out.data.dtype == np.complex64 and out.data.shape == buf.data.shape
    assert out.sampled.all()
    err, zero_filled = nrmse(rss(out.data), truth), nrmse(rss(buf.data), truth)
    # measured (64x64, 8 coils, noise-free, lambda_rel 1e-3; 0.060 at R=4 with the default 1e-2): R=2 0.005, R=3 0.014, R=4 0.033; zero-filled 0.60-0.72
    assert err < limit
    assert zero_filled > 0.5


def test_hybrid_and_image_domain_agree():
    header, (buf,) = buffers(3)
    g = GRAPPA(context(header))
    lattice = find_lattice(buf.sampled, (1, 3))
    ref = buf.reference[:, :, buf.reference_sampled[0]]
    w = calibrate(ref, (1, 3), (1, 4), 5, 1e-3)
    lat = buf.data * (np.arange(M) % 3 == lattice.offset[1])[None, None, :, None]
    a, b = apply_hybrid(lat, lattice, w), apply_image(lat, lattice, w)
    # the image form wraps the kernel circularly at the ky and kx edges; the hybrid one
    # circularly in kx only
    inner = (slice(None), slice(None), slice(8, -8), slice(4, -4))
    assert nrmse(a[inner], b[inner]) < 1e-4
    assert g.acceleration() == (1, 3)


def test_acs_lines_preserved_and_acquired_lines_kept():
    header, (buf,) = buffers(4)
    (out,) = run(GRAPPA(context(header)), buf)
    ref = buf.reference_sampled[0]
    assert ref.sum() == 24
    np.testing.assert_array_equal(out.data[:, :, ref], buf.reference[:, :, ref])
    s = buf.sampled[0]
    np.testing.assert_array_equal(out.data[:, :, s], buf.data[:, :, s])


def test_weights_cached_across_repetitions_and_recomputed_on_change():
    header, bufs = buffers(3, repetitions=3, snr=40.0)
    assert [b.index.repetition for b in bufs] == [0, 1, 2]
    g = GRAPPA(context(header))
    for b in bufs:
        run(g, b)
    # noisy ACS of each repetition differ by far less than the 10 % threshold
    assert (g.stats.calibrations, g.stats.reuses) == (1, 2)

    changed = replace(bufs[0], reference=bufs[0].reference * np.complex64(1.5 * np.exp(0.5j)))
    run(g, changed)
    assert g.stats.calibrations == 2
    exact = GRAPPA(context(header), GRAPPA.Params(recalibrate_threshold=0.0))
    for b in bufs:
        run(exact, b)
    assert exact.stats.calibrations == 3  # every bit change recalibrates
    # another slice position calibrates on its own
    run(g, replace(bufs[1], index=AcquisitionIndex(slice=1)))
    assert g.stats.calibrations == 3


def test_buffer_without_reference_reuses_slice_weights_or_warns():
    header, (buf,) = buffers(2)
    bare = replace(buf, reference=None, reference_sampled=None)
    g = GRAPPA(context(header))
    out = run(g, bare)
    assert len(out) == 2 and isinstance(out[0], Text) and out[0].startswith("WARNING")
    assert out[1] is bare and "GRAPPA skipped (no calibration)" in out[1].history
    assert len(run(g, bare)) == 1  # warned once per slice
    with pytest.raises(GrappaError, match="no calibration data"):
        run(GRAPPA(context(header), GRAPPA.Params(on_missing_reference="error")), bare)
    run(g, buf)  # calibrates
    (later,) = run(g, bare)  # reference-less repetition: cached weights
    assert later.sampled.all() and g.stats.reuses == 1


def test_fully_sampled_passes_through():
    header, (buf,) = buffers(1)
    (out,) = run(GRAPPA(context(header)), buf)
    assert out is buf
    (out,) = run(GRAPPA(context(header), GRAPPA.Params(acceleration_ky=2)), buf)
    assert out is buf  # every line in range acquired


def synthetic(shape=(8, 16, 32, 24), seed=0) -> np.ndarray:
    """Coil k-space of a smooth object under smooth coil maps, (coils, kz, ky, kx)."""
    c, nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in (nz, ny, nx)), indexing="ij")
    obj = ((z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.6) ** 2 < 1) * (1.0 + 0.5 * (x > 0))
    centres = rng.uniform(-1.5, 1.5, (c, 3))
    maps = np.exp(-((z - centres[:, 0, None, None, None]) ** 2 + (y - centres[:, 1, None, None, None]) ** 2
                    + (x - centres[:, 2, None, None, None]) ** 2) / 2.0) * np.exp(1j * rng.uniform(0, 6, (c, 1, 1, 1)))
    return centred_fft((maps * obj).astype(np.complex64), (1, 2, 3)).astype(np.complex64)


def buffer_3d(k: np.ndarray, r=(2, 2), acs=(8, 12)) -> ReconBuffer:
    c, nz, ny, nx = k.shape
    zz, yy = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    sampled = (zz % r[0] == 0) & (yy % r[1] == 0)
    ref_s = np.zeros_like(sampled)
    ref_s[nz // 2 - acs[0] // 2 : nz // 2 + acs[0] // 2, ny // 2 - acs[1] // 2 : ny // 2 + acs[1] // 2] = True
    enc = EncodingInfo((nx, ny, nz), (240.0, 240.0, 80.0), (nx, ny, nz), (240.0, 240.0, 80.0), ny // 2, nz // 2, ny - 1, nz - 1)
    return ReconBuffer(
        data=k * sampled[None, :, :, None], sampled=sampled, index=AcquisitionIndex(), encoding=enc, header=None,
        readout_fov_mm=240.0, reference=k * ref_s[None, :, :, None], reference_sampled=ref_s,
    )


@pytest.mark.parametrize("method", ["hybrid", "image"])
def test_3d_2x2(method):
    k = synthetic()
    header = make_header(encoded=(24, 32, 16), receiver_channels=8)
    buf = buffer_3d(k)
    g = GRAPPA(context(header), GRAPPA.Params(acceleration_ky=2, acceleration_kz=2, kernel_kz=2, kernel_ky=2, kernel_kx=3, method=method))
    (out,) = run(g, buf)
    truth = np.sqrt((np.abs(centred_ifft(k, (1, 2, 3))) ** 2).sum(0))
    img = lambda kk: np.sqrt((np.abs(centred_ifft(kk, (1, 2, 3))) ** 2).sum(0))  # noqa: E731
    err, zf = nrmse(img(out.data), truth), nrmse(img(buf.data), truth)
    assert out.sampled.all() and zf > 0.5
    # measured: hybrid 0.054, image 0.04 (16x32x24, 8 coils, kernel 2x2x3); zero-filled 0.80
    assert err < 0.07, (err, zf)


def test_partial_fourier_edges_stay_zero():
    # asymmetric ky: lines 0..39 of 64 acquired at R=2 (encoding limits 0..39, centre 32)
    k = synthetic((8, 1, 64, 32), seed=2)
    ny = 64
    header = make_header(encoded=(32, ny, 1), ky=(0, 47, 32), receiver_channels=8)
    sampled = np.zeros((1, ny), bool)
    sampled[0, 0:48:2] = True
    ref_s = np.zeros((1, ny), bool)
    ref_s[0, 20:44] = True
    enc = EncodingInfo.from_header(header)
    buf = ReconBuffer(
        data=k * sampled[None, :, :, None], sampled=sampled, index=AcquisitionIndex(), encoding=enc, header=None,
        readout_fov_mm=240.0, reference=k * ref_s[None, :, :, None], reference_sampled=ref_s,
    )
    (out,) = run(GRAPPA(context(header), GRAPPA.Params(acceleration_ky=2)), buf)
    assert not np.any(out.data[:, :, 48:])  # beyond the acquired range: zero
    assert np.all(np.abs(out.data[:, 0, 1:47:2]).sum(axis=(0, 2)) > 0)  # missing lines inside: filled
    assert out.sampled[0, :48].all() and not out.sampled[0, 48:].any()
    inside = nrmse(out.data[:, :, :48], k[:, :, :48])
    assert inside < 0.05, inside


def test_irregular_sampling_and_small_acs_raise():
    header, (buf,) = buffers(2)
    holes = buf.sampled.copy()
    holes[0, 4] = False  # a lattice line missing inside the range
    with pytest.raises(GrappaError, match="not a regular"):
        run(GRAPPA(context(header)), replace(buf, sampled=holes))
    tiny = buf.reference_sampled.copy()
    tiny[0, : M // 2 - 2] = False
    tiny[0, M // 2 + 2 :] = False
    with pytest.raises(GrappaError, match="smaller than one kernel"):
        run(GRAPPA(context(header)), replace(buf, reference_sampled=tiny))


def _scan_buffers(early: bool, acqs, header):
    """Accumulator (k-space buffers, early_reference on or off) + GRAPPA over ``acqs``."""
    stages = build_stages(header, overrides={**KSPACE_BUFFERS, "accumulate": {"early_reference": early}})
    grappa = GRAPPA(context(header))
    return payloads(run_chain([*stages, grappa], acqs), ReconBuffer), grappa


def test_early_reference_calibrates_once_and_gives_the_same_kspace():
    """With early_reference the accumulator sends each slice's ACS as soon as an imaging line
    lands past it; GRAPPA calibrates then and the buffer uses those weights: one calibration
    per slice, bit-identical k-space to calibrating on the buffer."""
    from gadgets.accumulate import AcquisitionAccumulateTrigger
    from inline.buffers import EarlyReference
    from inline.trace import Trace

    scan = simulate_scan(matrix=M, coils=C, slices=2, acceleration=4, acs_lines=24, seed=3, snr=40.0)
    plain, g0 = _scan_buffers(False, scan.acquisitions, scan.header)
    early, g1 = _scan_buffers(True, scan.acquisitions, scan.header)
    assert len(plain) == len(early) == 2
    assert (g0.stats.calibrations, g0.stats.early) == (2, 0)
    assert (g1.stats.calibrations, g1.stats.early) == (2, 2)
    for a, b in zip(plain, early):
        np.testing.assert_array_equal(a.data, b.data)

    # the early reference is sent before the last imaging line and holds the whole ACS
    acc = AcquisitionAccumulateTrigger(context(scan.header), AcquisitionAccumulateTrigger.Params(early_reference=True))
    order = []
    for i, acq in enumerate(scan.acquisitions):
        for out, _ in acc.process(acq, Trace.arrived()):
            order.append((i, out))
    refs = [(i, o) for i, o in order if isinstance(o, EarlyReference)]
    bufs = [(i, o) for i, o in order if isinstance(o, ReconBuffer)]
    assert [o.index.slice for _, o in refs] == [0, 1] and len(bufs) == 2
    for (i_ref, ref), (i_buf, buf) in zip(refs, bufs):
        assert i_buf - i_ref >= 8  # the lattice lines past the ACS (4 per slice, 2 slices) are still to come
        np.testing.assert_array_equal(ref.reference_sampled, buf.reference_sampled)
        np.testing.assert_array_equal(ref.reference, buf.reference)
        assert ref.data_shape == buf.data.shape


def test_early_reference_that_grows_later_is_recalibrated():
    """ACS lines after the early reference (here: half the ACS block acquired at the end)
    change the block: GRAPPA calibrates again on the complete one."""
    import ismrmrd

    scan = simulate_scan(matrix=M, coils=C, slices=1, acceleration=4, acs_lines=24, seed=5, snr=40.0)
    acqs = [a for a in scan.acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    cal = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION
    late = [a for a in acqs if a.is_flag_set(cal) and a.idx.kspace_encode_step_1 >= M // 2]
    rest = [a for a in acqs if a not in late]
    reordered = [a for a in scan.acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)] + rest + late
    for flag in (ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_REPETITION, ismrmrd.ACQ_LAST_IN_MEASUREMENT):
        if rest[-1].is_flag_set(flag):  # the end-of-slice flags move to the new last line
            rest[-1].clear_flag(flag)
            reordered[-1].set_flag(flag)
    plain, g0 = _scan_buffers(False, reordered, scan.header)
    early, g1 = _scan_buffers(True, reordered, scan.header)
    assert (g1.stats.calibrations, g1.stats.early) == (2, 0)  # the early one, then the real one
    np.testing.assert_array_equal(plain[0].data, early[0].data)
