"""EPICorrection: odd-even phase estimate and N/2 ghost on synthetic EPI; the EPI chain on real data."""

from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from chain_helpers import DATA_DIR, build_chain, centred_fft, context, make_acq, make_header, payloads, read_mrd, run_chain
from scipy import ndimage

from gadgets.epi import EPICorrection, to_hybrid, to_kspace
from inline.buffers import ImageBuffer

EPI_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "epi.yaml"
REAL_EPI = DATA_DIR / "twix_epi_2ch_phantom.h5"

A_ERR, B_ERR = 0.6, 0.08  # phase of the reversed echoes: A_ERR + B_ERR * (x - n//2) [rad, rad/pixel]


def ghost_ratio(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean magnitude in the N/2-shifted copy of the object (outside it) over the mean in the object."""
    ghost = np.roll(mask, mask.shape[0] // 2, axis=0) & ~ndimage.binary_dilation(mask, iterations=2)
    assert ghost.sum() > 50
    return float(image[ghost].mean() / image[mask].mean())


@pytest.fixture(scope="module")
def synthetic_epi():
    """A 64 x 64, 4-coil simulated brain as single-shot EPI: odd lines reversed with an odd-even phase error.

    Returns (header, acquisitions, RSS of the true coil images, object mask). Navigators: 3 lines at
    ky = 0 (centre) with -/+/- polarity (as the Siemens file), before the echoes.
    """
    from inline.simulate import simulate_scan

    scan = simulate_scan(matrix=64, slices=1, coils=4, snr=float("inf"), noise_samples=0, fov_mm=360.0, seed=5)
    coil_images = (scan.coil_maps[:, 0] * scan.images[0]).astype(np.complex64)  # (coils, y, x)
    k = centred_fft(coil_images, (1, 2))  # (coils, ky, kx)
    _, ny, nx = k.shape
    x = np.arange(nx) - nx // 2
    error = np.exp(1j * (A_ERR + B_ERR * x)).astype(np.complex64)

    def line(kline: np.ndarray, reverse: bool) -> np.ndarray:
        if not reverse:
            return kline
        return to_kspace(to_hybrid(kline) * error)[:, ::-1]  # phase error, then time-reversed sampling

    header = make_header(encoded=(nx, ny, 1), encoded_fov=(360.0, 360.0, 3.0), receiver_channels=4)
    acqs = []
    for i, rev in enumerate((True, False, True)):
        acqs.append(make_acq(line(k[:, ny // 2], rev), ky=ny // 2, scan_counter=len(acqs),
                             flags=[ismrmrd.ACQ_IS_PHASECORR_DATA] + ([ismrmrd.ACQ_IS_REVERSE] if rev else [])))
    for y in range(ny):
        rev = y % 2 == 1
        flags = ([ismrmrd.ACQ_IS_REVERSE] if rev else []) + ([ismrmrd.ACQ_LAST_IN_SLICE] if y == ny - 1 else [])
        acqs.append(make_acq(line(k[:, y], rev), ky=y, scan_counter=len(acqs), flags=flags))
    rss_true = np.sqrt((np.abs(coil_images) ** 2).sum(0))
    obj = np.abs(scan.images[0])
    mask = ndimage.binary_fill_holes(obj > 0.1 * obj.max())
    return header, acqs, rss_true, mask


def epi_chain(header, phase_correction: str):
    chain = build_chain(header, EPI_CONFIG, {"epi": {"phase_correction": phase_correction}})
    names = [type(g).__name__ for g in chain]
    return chain[: names.index("CoilCombine") + 1]


def recon(chain, acqs) -> np.ndarray:
    (img,) = payloads(run_chain(chain, acqs), ImageBuffer)
    return np.abs(img.data[0, 0])


def test_synthetic_phase_estimate_and_ghost(synthetic_epi):
    header, acqs, rss_true, mask = synthetic_epi
    corrected = epi_chain(header, "linear")
    img = recon(corrected, acqs)
    epi = next(g for g in corrected if isinstance(g, EPICorrection))
    (est,) = epi.estimates.values()
    # positive minus negative polarity = minus the error put on the reversed lines
    assert est.constant_rad == pytest.approx(-A_ERR, abs=0.01)
    assert est.slope_rad_per_pixel == pytest.approx(-B_ERR, abs=0.002)

    uncorrected = recon(epi_chain(header, "none"), acqs)
    before, after = ghost_ratio(uncorrected, mask), ghost_ratio(img, mask)
    # measured: 0.374 before, 0.00000 after (noise-free)
    assert before > 0.1
    assert after < 0.005
    # the corrected image is the true RSS image up to the common phase-half (a magnitude-preserving shift)
    print(f"synthetic ghost ratio: {before:.4f} -> {after:.5f}; estimate {est}")
    assert np.linalg.norm(img - rss_true) / np.linalg.norm(rss_true) < 0.05


def test_synthetic_with_noise(synthetic_epi):
    header, acqs, rss_true, mask = synthetic_epi
    rng = np.random.default_rng(11)
    sigma = 0.002 * float(np.abs(acqs[0].data).max())  # k-space centre SNR 500: image SNR ~ 20
    noisy = []
    for a in acqs:
        n = a.data.shape
        noisy.append(make_acq(a.data + sigma * (rng.standard_normal(n) + 1j * rng.standard_normal(n)),
                              ky=a.idx.kspace_encode_step_1, scan_counter=a.scan_counter,
                              flags=[f for f in range(1, 65) if a.is_flag_set(f)]))
    chain = epi_chain(header, "linear")
    img = recon(chain, noisy)
    (est,) = next(g for g in chain if isinstance(g, EPICorrection)).estimates.values()
    assert est.constant_rad == pytest.approx(-A_ERR, abs=0.05)
    assert est.slope_rad_per_pixel == pytest.approx(-B_ERR, abs=0.005)
    before, after = ghost_ratio(recon(epi_chain(header, "none"), noisy), mask), ghost_ratio(img, mask)
    print(f"noisy synthetic ghost ratio: {before:.4f} -> {after:.4f}; estimate {est}")
    # measured: 0.377 -> 0.028 (the noise floor), estimate -0.598 rad, -0.0799 rad/pixel
    assert before > 0.1 and after < 0.05


def test_navigators_consumed_and_lines_flipped(synthetic_epi):
    header, acqs, _, _ = synthetic_epi
    g = EPICorrection(context(header), EPICorrection.Params(phase_correction="none"))
    out = payloads(run_chain([g], acqs))
    assert len(out) == len(acqs) - 3
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA) for a in out)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_REVERSE) for a in out)
    np.testing.assert_array_equal(out[1].data, acqs[4].data[:, ::-1])  # ky 1: reversed in, flipped out
    np.testing.assert_array_equal(out[0].data, acqs[3].data)  # ky 0: untouched


def test_mean_mode_removes_only_the_constant(synthetic_epi):
    header, acqs, _, _ = synthetic_epi
    g = EPICorrection(context(header), EPICorrection.Params(phase_correction="mean"))
    run_chain([g], acqs)
    (est,) = g.estimates.values()
    assert est.slope_rad_per_pixel == 0.0


@pytest.fixture(scope="module")
def real_epi():
    if not REAL_EPI.is_file():
        pytest.skip(f"{REAL_EPI} not found (the shared data folder ../shared/data is absent)")
    return read_mrd(REAL_EPI)


def test_real_epi_ghost_reduced(real_epi):
    header, acqs = real_epi
    chain = epi_chain(header, "linear")
    corrected = recon(chain, acqs)
    uncorrected = recon(epi_chain(header, "none"), acqs)
    mask = corrected > 0.3 * corrected.max()
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(mask))
    before, after = ghost_ratio(uncorrected, mask), ghost_ratio(corrected, mask)
    epi = next(g for g in chain if isinstance(g, EPICorrection))
    (est,) = epi.estimates.values()
    # measured: 0.43 uncorrected, 0.105 corrected (the rest is mostly noise in the corners)
    print(f"real EPI ghost ratio: {before:.4f} -> {after:.4f}; estimate {est}")
    assert before > 0.3
    assert after < before / 3
    assert est.samples == 100  # estimated after oversampling removal, like the imaging lines


def test_real_epi_full_chain_gives_an_image(real_epi):
    header, acqs = real_epi
    out = payloads(run_chain(build_chain(header, EPI_CONFIG), acqs))
    images = [o for o in out if isinstance(o, ismrmrd.Image)]
    assert len(images) == 1 and images[0].data.shape[-2:] == (100, 100)
