"""The closing SENSE step of DL reconstruction (gadgets.dl_refine) against a dense solve.

Reference: the MoDL data-consistency solution ``x = (A^H A + lambda I)^-1 (A^H y + lambda z)``
(Aggarwal et al., IEEE TMI 2019) with ``A = M F S`` built as an explicit matrix and solved by
``numpy.linalg.solve``; no code of the step is reused.
"""

from __future__ import annotations

import numpy as np
import pytest

from gadgets.dl_refine import sense_refine


def centred_dft(n: int) -> np.ndarray:
    """Orthonormal centred DFT matrix ``(n, n)``: fftshift(fft(ifftshift(x)))."""
    eye = np.eye(n)
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(eye, axes=0), axis=0, norm="ortho"), axes=0)


def problem(coils=4, ny=12, nx=10, r=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    maps = np.stack([np.exp(1j * (0.3 * c + 0.2 * yy - 0.1 * xx)) * (1 + 0.3 * np.cos(yy / 3 + c)) for c in range(coils)])
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))  # unit norm per pixel (ESPIRiT's convention)
    truth = rng.normal(size=(ny, nx)) + 1j * rng.normal(size=(ny, nx))
    sampled = np.zeros(ny, bool)
    sampled[::r] = True
    sampled[ny // 2 - 1 : ny // 2 + 2] = True
    fy, fx = centred_dft(ny), centred_dft(nx)
    full = np.einsum("ky,cyx,lx->ckl", fy, maps * truth, fx)
    measured = (full + 0.05 * (rng.normal(size=full.shape) + 1j * rng.normal(size=full.shape))) * sampled[None, :, None]
    prior = truth + 0.3 * (rng.normal(size=truth.shape) + 1j * rng.normal(size=truth.shape))  # the "network's" image
    network_k = np.einsum("ky,cyx,lx->ckl", fy, maps * prior, fx)
    return maps.astype(np.complex64), sampled, measured.astype(np.complex64), network_k.astype(np.complex64), prior, fy, fx


@pytest.mark.parametrize("lam", [0.03, 0.3])
def test_matches_dense_solution(lam):
    maps, sampled, measured, network_k, prior, fy, fx = problem()
    coils, ny, nx = maps.shape
    # A: image (ny*nx) -> sampled k-space of every coil
    rows = []
    for c in range(coils):
        op = np.kron(fy, fx) @ np.diag(maps[c].ravel())
        rows.append(op.reshape(ny, nx, ny * nx)[sampled].reshape(-1, ny * nx))
    a = np.concatenate(rows)
    y = measured[:, sampled].reshape(-1)
    x = np.linalg.solve(a.conj().T @ a + lam * np.eye(ny * nx), a.conj().T @ y + lam * prior.ravel()).reshape(ny, nx)
    want = np.einsum("ky,cyx,lx->ckl", fy, maps * x, fx)
    got, iterations = sense_refine(network_k, measured, sampled, maps, lam, iterations=200, tolerance=1e-7)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert 1 <= iterations <= 200


def test_prior_kept_where_maps_are_zero_and_data_consistency_improves():
    maps, sampled, measured, network_k, prior, fy, fx = problem(seed=1)
    maps[:, :, :2] = 0  # outside ESPIRiT's crop
    got, _ = sense_refine(network_k, measured, sampled, maps, 0.03)
    images = np.einsum("yk,ckl,xl->cyx", fy.conj().T, got, fx.conj().T)
    prior_images = np.einsum("yk,ckl,xl->cyx", fy.conj().T, network_k, fx.conj().T)
    np.testing.assert_allclose(images[:, :, :2], prior_images[:, :, :2], atol=1e-5)
    before = np.linalg.norm((network_k - measured)[:, sampled])
    after = np.linalg.norm((got - measured)[:, sampled])
    assert after < 0.6 * before  # the measurement noise (0.05) stays: the lines are fitted in the least-squares sense


def test_shape_mismatch_is_refused():
    maps, sampled, measured, network_k, *_ = problem()
    with pytest.raises(ValueError, match="must agree"):
        sense_refine(network_k[:, :-1], measured, sampled, maps)
