"""Coil compression (inline/coils.py) against BART ``cc -S`` (SVD compression)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inline.bart import BartNotFound, bart, bart_executable, image_from_bart, kspace_to_bart, read_cfl, write_cfl
from inline.coils import compress, compression_matrix
from inline.simulate import simulate_scan
from models.data import fft2c, ifft2c, rss


@pytest.fixture(scope="module")
def kspace() -> np.ndarray:
    """``(32, 1, 96, 96)`` noisy k-space of one simulated slice."""
    scan = simulate_scan(matrix=96, slices=1, coils=32, snr=30.0, noise_samples=0, seed=3)
    k = fft2c(scan.coil_maps[:, 0] * scan.images[0][None])
    rng = np.random.default_rng(0)
    sigma = 0.02 * float(np.abs(k).max())
    k = k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / math.sqrt(2)
    return k.astype(np.complex64)[:, None]


def test_rows_are_orthonormal(kspace):
    matrix = compression_matrix(kspace, 8)
    assert matrix.shape == (8, 32)
    np.testing.assert_allclose(matrix @ matrix.conj().T, np.eye(8), atol=1e-5)


def test_matches_bart_svd_compression(kspace, tmp_path):
    try:
        bart_executable()
    except BartNotFound as e:
        pytest.skip(str(e))
    write_cfl(tmp_path / "k", kspace_to_bart(kspace))
    bart(tmp_path, "cc", "-S", "-A", "-p", "8", "k", "cc")
    theirs = image_from_bart(read_cfl(tmp_path / "cc"))[:, 0]  # (8, ky, kx)
    ours = compress(kspace[:, 0], compression_matrix(kspace, 8))
    # Virtual coils are defined up to a unitary rotation within the kept subspace; the RSS
    # image is invariant to it, so it is what must agree.
    a, b = rss(ifft2c(ours)), rss(ifft2c(theirs))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3


def test_keeps_the_signal_of_a_head_array():
    scan = simulate_scan(matrix=96, slices=1, coils=32, snr=math.inf, noise_samples=0, seed=4)
    k = fft2c(scan.coil_maps[:, 0] * scan.images[0][None])
    kept = np.linalg.norm(compress(k, compression_matrix(k, 8))) ** 2 / np.linalg.norm(k) ** 2
    assert kept > 0.95  # 8 of 32 channels: the array's sensitivities are smooth and correlated


def test_errors(kspace):
    with pytest.raises(ValueError, match="virtual_coils"):
        compression_matrix(kspace, 0)
    with pytest.raises(ValueError, match="coils"):
        compress(kspace[:4], compression_matrix(kspace, 8))
