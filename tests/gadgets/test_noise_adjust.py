"""NoiseAdjust: covariance estimate, whitening, Gadgetron's dwell-time scaling, pass-through."""

import logging

import ismrmrd
import numpy as np
import pytest
from chain_helpers import context, make_acq, make_header, payloads, run_chain

from gadgets.noise import DEFAULT_RECEIVER_NOISE_BANDWIDTH, NoiseAdjust, apply_matrix, bandwidth_scale

COILS = 4


def correlated(rng, mixing: np.ndarray, samples: int) -> np.ndarray:
    """Complex noise with covariance ``mixing @ mixing^H`` (unit-variance complex white input)."""
    white = (rng.standard_normal((COILS, samples)) + 1j * rng.standard_normal((COILS, samples))) / np.sqrt(2)
    return mixing @ white


@pytest.fixture
def mixing() -> np.ndarray:
    rng = np.random.default_rng(1)
    a = np.eye(COILS) + 0.6 * (rng.standard_normal((COILS, COILS)) + 1j * rng.standard_normal((COILS, COILS)))
    return a * np.array([1.0, 2.0, 0.5, 3.0])[:, None]  # unequal channel gains too


def noise_acqs(rng, mixing, n_acq=8, samples=4096, dwell=5.0):
    return [
        make_acq(
            correlated(rng, mixing, samples), flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT], center=0, sample_time_us=dwell
        )
        for _ in range(n_acq)
    ]


def test_whitened_noise_has_identity_covariance(mixing):
    rng = np.random.default_rng(2)
    gadget = NoiseAdjust(context(make_header(receiver_channels=COILS)))
    imaging = [make_acq(correlated(rng, mixing, 2048), ky=i, sample_time_us=5.0) for i in range(16)]
    out = payloads(run_chain([gadget], noise_acqs(rng, mixing) + imaging))

    assert len(out) == len(imaging)  # noise consumed, not forwarded
    assert all(not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in out)
    true_cov = mixing @ mixing.conj().T
    assert gadget.noise_covariance.shape == (COILS, COILS)
    assert gadget.number_of_noise_samples == 8 * 4096
    assert np.abs(gadget.noise_covariance - true_cov).max() / np.abs(true_cov).max() < 0.03

    # equal dwell times, no bandwidth in the header: scale^2 = 2 * 0.793
    scale = np.sqrt(2 * DEFAULT_RECEIVER_NOISE_BANDWIDTH)
    assert all(a.data.dtype == np.complex64 for a in out)
    white = np.concatenate([a.data for a in out], axis=1) / scale
    cov = white @ white.conj().T / white.shape[1]
    assert np.abs(cov - np.eye(COILS)).max() < 0.03
    # while the input was far from white
    raw = np.concatenate([a.data for a in imaging], axis=1)
    raw_cov = raw @ raw.conj().T / raw.shape[1]
    assert np.abs(raw_cov - np.eye(COILS)).max() > 1.0


def test_dwell_time_scale_follows_gadgetron_formula(mixing):
    # Skyra case: noise scan at 20 us dwell, imaging at 2.4 us, header bandwidth 0.793
    assert bandwidth_scale(2.4, 20.0, 0.793) == pytest.approx(np.sqrt(2 * 2.4 / 20 * 0.793), rel=1e-12)
    assert bandwidth_scale(2.4, 20.0, 0.793) == pytest.approx(0.4362568, rel=1e-6)
    assert bandwidth_scale(0.0, 20.0, 0.793) == 1.0  # unknown dwell: no scaling, as Gadgetron

    rng = np.random.default_rng(3)
    gadget = NoiseAdjust(context(make_header(receiver_channels=COILS, noise_bandwidth=0.793)))
    line = correlated(rng, mixing, 64).astype(np.complex64)
    out = payloads(run_chain([gadget], noise_acqs(rng, mixing, dwell=20.0) + [make_acq(line, sample_time_us=2.4)]))

    assert gadget.noise_dwell_time_us == 20.0
    cov = gadget.noise_covariance
    expected = bandwidth_scale(2.4, 20.0, 0.793) * np.linalg.solve(np.linalg.cholesky(cov), line)
    np.testing.assert_allclose(out[0].data, expected, rtol=1e-4, atol=1e-5)
    # whitening with L^-1: W C W^H = I
    w = gadget.prewhitening_matrix
    np.testing.assert_allclose(w @ cov @ w.conj().T, np.eye(COILS), atol=1e-10)


def test_bandwidth_from_header_and_param():
    header = make_header(receiver_channels=COILS, noise_bandwidth=0.6)
    assert NoiseAdjust(context(header)).receiver_noise_bandwidth == 0.6
    assert NoiseAdjust(context(make_header())).receiver_noise_bandwidth == DEFAULT_RECEIVER_NOISE_BANDWIDTH
    p = NoiseAdjust.Params(receiver_noise_bandwidth=0.9, noise_dwell_time_us=10.0)
    assert NoiseAdjust(context(header), p).receiver_noise_bandwidth == 0.9


def test_noise_dwell_override(mixing):
    rng = np.random.default_rng(4)
    gadget = NoiseAdjust(context(make_header()), NoiseAdjust.Params(noise_dwell_time_us=10.0))
    run_chain(
        [gadget], noise_acqs(rng, mixing, n_acq=1, dwell=20.0) + [make_acq(np.ones((COILS, 8)), sample_time_us=5.0)]
    )
    assert gadget.noise_dwell_time_us == 10.0
    np.testing.assert_allclose(
        np.abs(gadget.scaled_matrix(5.0)), np.abs(np.sqrt(2 * 0.5 * 0.793) * gadget.prewhitening_matrix), rtol=1e-6
    )


def test_without_noise_scan_passes_through_and_logs_once(caplog):
    gadget = NoiseAdjust(context(make_header()))
    acqs = [make_acq(np.full((COILS, 8), i + 1j, np.complex64), ky=i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        out = payloads(run_chain([gadget], acqs))
    assert [a is b for a, b in zip(out, acqs)] == [True] * 3
    assert sum("no noise scan" in r.message for r in caplog.records) == 1
    assert gadget.noise_covariance is None


def test_perform_noise_adjust_false_consumes_noise_only(mixing):
    rng = np.random.default_rng(5)
    gadget = NoiseAdjust(context(make_header()), NoiseAdjust.Params(perform_noise_adjust=False))
    line = make_acq(np.ones((COILS, 8)))
    out = payloads(run_chain([gadget], noise_acqs(rng, mixing, n_acq=1) + [line]))
    assert out == [line]


def test_channel_mismatch_raises(mixing):
    rng = np.random.default_rng(6)
    gadget = NoiseAdjust(context(make_header()))
    with pytest.raises(ValueError, match="3 channels, noise scan 4"):
        run_chain([gadget], noise_acqs(rng, mixing, n_acq=1) + [make_acq(np.ones((3, 8)))])


def test_dead_channel_warns_and_passes_unwhitened():
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((COILS, 256)) + 1j * rng.standard_normal((COILS, 256))
    noise[2] = 0
    gadget = NoiseAdjust(context(make_header()))
    line = make_acq(np.ones((COILS, 8)))
    out = payloads(run_chain([gadget], [make_acq(noise, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT]), line]))
    assert len(out) == 2
    assert out[0].startswith("WARNING ") and "not positive definite" in out[0] and "[2]" in out[0]
    assert out[1] is line
    assert gadget.prewhitening_matrix is None


def test_noise_only_stream_still_computes_covariance(mixing):
    rng = np.random.default_rng(8)
    gadget = NoiseAdjust(context(make_header()))
    assert run_chain([gadget], noise_acqs(rng, mixing, n_acq=2)) == []
    assert gadget.noise_covariance is not None and gadget.noise_covariance.shape == (COILS, COILS)


@pytest.mark.parametrize("coils, samples", [(2, 7), (14, 384), (32, 513)])
def test_apply_matrix_equals_matmul(coils, samples):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils))).astype(np.complex64)
    d = (rng.standard_normal((coils, samples)) + 1j * rng.standard_normal((coils, samples))).astype(np.complex64)
    out = apply_matrix(w, d)
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, w @ d, rtol=1e-5, atol=1e-5)
