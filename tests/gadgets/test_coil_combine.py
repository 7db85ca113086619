"""CoilCombine: RSS values; Walsh recovers the object up to phase, with better SNR than RSS."""

import numpy as np
import pytest
from chain_helpers import context, make_header
from scipy import ndimage

from gadgets.coil_combine import CoilCombine, walsh_weights
from inline.buffers import AcquisitionIndex, ImageBuffer

N, COILS = 64, 8


def combine(data: np.ndarray, **params) -> ImageBuffer:
    item = ImageBuffer(
        data=data.astype(np.complex64),
        index=AcquisitionIndex(),
        header=None,
        field_of_view_mm=(200.0, 200.0, 5.0),
        history=["FFT"],
    )
    return CoilCombine(context(make_header()), CoilCombine.Params(**params)).apply(item)


def coil_maps() -> np.ndarray:
    """Smooth complex sensitivities of coils around the field of view, (coils, y, x)."""
    y, x = np.mgrid[:N, :N] / N - 0.5
    maps = []
    for c in range(COILS):
        a = 2 * np.pi * c / COILS
        cy, cx = 0.7 * np.sin(a), 0.7 * np.cos(a)
        mag = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.3)
        maps.append(mag * np.exp(1j * (a + 3 * (x * np.cos(a) + y * np.sin(a)))))
    return np.array(maps)


def phantom() -> np.ndarray:
    """Disk with an inner ellipse and a smooth phase, (y, x)."""
    y, x = np.mgrid[:N, :N] / N - 0.5
    obj = (x**2 + y**2 < 0.16).astype(float) + 0.5 * ((x / 0.2) ** 2 + (y / 0.1) ** 2 < 1)
    return obj * np.exp(1j * 2 * np.pi * 0.3 * x)


def test_rss_values():
    a = np.array([3 + 4j, 1j])[:, None, None, None] * np.ones((2, 2, 3, 4))
    out = combine(a, method="rss")
    assert out.data.shape == (1, 2, 3, 4) and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, np.sqrt(26), rtol=1e-6)
    assert out.history == ["FFT", "RSS"]
    assert out.combined


def test_walsh_recovers_object_up_to_phase_noiseless():
    maps, obj = coil_maps(), phantom()
    images = (maps * obj)[:, None]
    out = combine(images, method="walsh", walsh_kernel_size=5)
    assert out.data.shape == (1, 1, N, N) and out.data.dtype == np.complex64
    truth = np.abs(obj) * np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    mask = np.abs(obj) > 0
    rel = np.abs(np.abs(out.data[0, 0]) - truth)[mask] / truth[mask]
    assert np.median(rel) < 1e-3 and rel.max() < 0.05  # exact away from edges of the object
    # phase: the object's phase ramp up to one smooth coil-reference phase
    np.testing.assert_allclose(np.abs(combine(images, method="rss").data[0, 0])[mask], truth[mask], rtol=1e-5)


def test_walsh_beats_rss_at_low_snr():
    rng = np.random.default_rng(0)
    maps, obj = coil_maps(), phantom()
    truth = np.abs(obj) * np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))
    sigma = 0.25 * truth.max() / 2  # low SNR
    noise = sigma * (rng.standard_normal((COILS, N, N)) + 1j * rng.standard_normal((COILS, N, N))) / np.sqrt(2)
    images = (maps * obj + noise)[:, None]
    walsh = np.abs(combine(images, method="walsh", walsh_kernel_size=7).data[0, 0])
    rss = combine(images, method="rss").data[0, 0]
    err_walsh = np.linalg.norm(walsh - truth) / np.linalg.norm(truth)
    err_rss = np.linalg.norm(rss - truth) / np.linalg.norm(truth)
    snr_walsh, snr_rss = 1 / err_walsh, 1 / err_rss
    # seeded: err_walsh 0.22, err_rss 0.45 (RSS adds the noise of all coils and its bias)
    assert snr_walsh > 1.5 * snr_rss, (snr_walsh, snr_rss)
    assert err_walsh < 0.25


def test_walsh_weights_are_unit_norm_and_phase_referenced():
    maps = coil_maps()
    w = walsh_weights((maps * phantom()).astype(np.complex64), 5)
    mask = np.abs(phantom()) > 0
    np.testing.assert_allclose(np.linalg.norm(w, axis=0)[mask], 1, rtol=1e-4)
    ref = int(np.argmax(np.sum(np.abs(maps * phantom()) ** 2, axis=(1, 2))))
    assert np.abs(np.angle(w[ref][mask])).max() < 1e-3


def test_single_coil_passes_through():
    data = np.ones((1, 1, 4, 4), np.complex64)
    item = ImageBuffer(data=data, index=AcquisitionIndex(), header=None, field_of_view_mm=(1.0, 1.0, 1.0))
    assert CoilCombine(context(make_header())).apply(item) is item


def test_bad_input():
    with pytest.raises(ValueError, match="coils, z, y, x"):
        combine(np.ones((2, 4, 4)))
    with pytest.raises(ValueError):
        CoilCombine.Params(method="sense")


def test_power_iteration_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    maps, obj = coil_maps(), phantom()
    images = maps * obj + 0.05 * (rng.standard_normal((COILS, N, N)) + 1j * rng.standard_normal((COILS, N, N)))
    images = images.astype(np.complex64)
    w = walsh_weights(images, 5)
    # reference: dominant eigenvector of the same box-filtered correlation matrices
    corr = np.einsum("iyx,jyx->yxij", images, images.conj())
    corr = ndimage.uniform_filter(corr.real, size=(5, 5, 1, 1)) + 1j * ndimage.uniform_filter(
        corr.imag, size=(5, 5, 1, 1)
    )
    ref = np.linalg.eigh(corr)[1][..., -1]  # (y, x, coils)
    mask = np.abs(obj) > 0
    overlap = np.abs(np.einsum("cyx,yxc->yx", w.conj(), ref))[mask]
    assert overlap.min() > 0.999
