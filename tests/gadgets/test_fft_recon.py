"""FFTRecon: centring, orthonormal scaling, asymmetric echo, FOV adjustment in 2D and 3D."""

import scipy.fft
import numpy as np
import pytest
from chain_helpers import centred_fft, centred_ifft, context, make_header, recon_buffer

from gadgets.fft_recon import FFTRecon, kspace_grid
from inline.buffers import ImageBuffer, ReconBuffer


def buffer(k: np.ndarray, header, readout_fov_mm: float | None = None, center: int | None = None) -> ReconBuffer:
    return recon_buffer(k, header, readout_fov_mm, center, slice=2)


def recon(buf: ReconBuffer, header) -> ImageBuffer:
    return FFTRecon(context(header), FFTRecon.Params(fft_workers=1)).apply(buf)


@pytest.mark.parametrize("shape", [(1, 32, 48), (8, 16, 24)])
def test_point_source_lands_at_centre(shape):
    nz, ny, nx = shape
    header = make_header(encoded=(nx, ny, nz), encoded_fov=(240.0, 160.0, 80.0 if nz > 1 else 5.0))
    out = recon(buffer(np.ones((2,) + shape, np.complex64), header), header)
    assert out.data.dtype == np.complex64 and out.data.shape == (2,) + shape
    peak = np.unravel_index(np.argmax(np.abs(out.data[0])), shape)
    assert peak == (nz // 2, ny // 2, nx // 2)
    assert abs(out.data[0][peak]) == pytest.approx(np.sqrt(nz * ny * nx), rel=1e-5)  # orthonormal
    assert np.abs(out.data[0]).sum() == pytest.approx(np.sqrt(nz * ny * nx), rel=1e-4)  # a single pixel
    assert out.index.slice == 2 and out.history == ["ACC", "FFT"]
    assert out.field_of_view_mm == (240.0, 160.0, 80.0 if nz > 1 else 5.0)


def test_off_centre_object_round_trip():
    rng = np.random.default_rng(0)
    header = make_header(encoded=(64, 48, 1), encoded_fov=(256.0, 192.0, 5.0))
    img = (rng.standard_normal((3, 1, 48, 64)) + 1j * rng.standard_normal((3, 1, 48, 64))).astype(np.complex64)
    out = recon(buffer(centred_fft(img, axes=(-2, -1)), header), header)
    np.testing.assert_allclose(out.data, img, atol=1e-4)


def test_recon_pixel_coarser_than_encoded_crops_kspace():
    # pulseq_gre_16ch-like: 64 readout samples / 256 mm (after oversampling removal) and
    # 128 phase lines / 256 mm, recon 64 x 64 over 256 x 256 mm: keep the central 64 ky lines
    header = make_header(
        encoded=(128, 128, 1), encoded_fov=(512.0, 256.0, 3.0), recon=(64, 64, 1), recon_fov=(256.0, 256.0, 3.0)
    )
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((2, 1, 128, 64)) + 1j * rng.standard_normal((2, 1, 128, 64))).astype(np.complex64)
    out = recon(buffer(k, header, readout_fov_mm=256.0), header)
    assert out.data.shape == (2, 1, 64, 64)
    assert out.field_of_view_mm == (256.0, 256.0, 3.0)
    expected = centred_ifft(k[:, :, 32:96], axes=(-2, -1)) * np.sqrt(64 / 128)  # intensity kept
    np.testing.assert_allclose(out.data, expected, atol=1e-5)


def test_intensity_is_kept_by_fov_adjustment():
    # a smooth blob reconstructed on the encoded and on a 2x finer recon grid has the same peak
    ny = nx = 32
    y, x = np.mgrid[:ny, :nx]
    blob = np.exp(-((y - ny // 2) ** 2 + (x - nx // 2) ** 2) / 20.0)[None, None].astype(np.complex64)
    k = centred_fft(blob, axes=(-2, -1))
    same = make_header(encoded=(nx, ny, 1), encoded_fov=(200.0, 200.0, 5.0))
    finer = make_header(
        encoded=(nx, ny, 1), encoded_fov=(200.0, 200.0, 5.0), recon=(64, 64, 1), recon_fov=(200.0, 200.0, 5.0)
    )
    a = recon(buffer(k, same), same).data
    b = recon(buffer(k, finer), finer).data
    assert b.shape == (1, 1, 64, 64)
    assert np.abs(b).max() == pytest.approx(np.abs(a).max(), rel=1e-3)


def test_readout_shorter_than_recon_fov_pixel_is_zero_padded():
    # pulseq_gre_32ch-like: 32 readout samples over 128 mm, recon 64 over 128 mm
    header = make_header(
        encoded=(64, 64, 1), encoded_fov=(256.0, 128.0, 30.0), recon=(64, 64, 1), recon_fov=(128.0, 128.0, 30.0)
    )
    k = np.zeros((1, 1, 64, 32), np.complex64)
    k[0, 0, 32, 16] = 1  # DC only: a constant image
    out = recon(buffer(k, header, readout_fov_mm=128.0), header)
    assert out.data.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(np.abs(out.data), 1 / np.sqrt(64 * 32), rtol=1e-5)  # same level as without padding


def test_phase_oversampling_is_cut_in_image_domain():
    # encoded y FOV twice the recon one at the same pixel size: crop the central rows
    header = make_header(
        encoded=(32, 64, 1), encoded_fov=(200.0, 400.0, 5.0), recon=(32, 32, 1), recon_fov=(200.0, 200.0, 5.0)
    )
    rng = np.random.default_rng(2)
    img = (rng.standard_normal((2, 1, 64, 32)) + 1j * rng.standard_normal((2, 1, 64, 32))).astype(np.complex64)
    out = recon(buffer(centred_fft(img, axes=(-2, -1)), header), header)
    np.testing.assert_allclose(out.data, img[:, :, 16:48], atol=1e-4)


def test_asymmetric_echo_is_zero_filled():
    # 24 samples with the echo at sample 8 belong to a symmetric 32 (8 before the centre missing)
    header = make_header(encoded=(32, 16, 1), encoded_fov=(200.0, 100.0, 5.0))
    rng = np.random.default_rng(3)
    full = (rng.standard_normal((2, 1, 16, 32)) + 1j * rng.standard_normal((2, 1, 16, 32))).astype(np.complex64)
    part = full[..., 8:]
    out = recon(buffer(part, header, center=8), header)
    zero_filled = full.copy()
    zero_filled[..., :8] = 0
    np.testing.assert_allclose(out.data, centred_ifft(zero_filled, axes=(-2, -1)), atol=1e-5)


def test_3d_fov_adjustment():
    header = make_header(
        encoded=(32, 32, 16), encoded_fov=(256.0, 256.0, 128.0), recon=(32, 32, 8), recon_fov=(256.0, 256.0, 64.0)
    )
    rng = np.random.default_rng(4)
    img = (rng.standard_normal((2, 16, 32, 32)) + 1j * rng.standard_normal((2, 16, 32, 32))).astype(np.complex64)
    out = recon(buffer(centred_fft(img, axes=(-3, -2, -1)), header), header)
    assert out.data.shape == (2, 8, 32, 32)  # same pixel size: image-domain cut along z
    np.testing.assert_allclose(out.data, img[:, 4:12], atol=1e-4)
    assert out.field_of_view_mm == (256.0, 256.0, 64.0)


def test_kspace_grid():
    assert kspace_grid(256.0, 128, 256.0, 64) == 64
    assert kspace_grid(128.0, 32, 128.0, 64) == 64
    assert kspace_grid(400.0, 64, 200.0, 32) == 64
    assert kspace_grid(300.0, 17, 0.0, 0) == 17


def test_bad_shape_raises():
    header = make_header()
    buf = buffer(np.ones((1, 1, 64, 128)), header)
    buf.data = buf.data[0]
    with pytest.raises(ValueError, match="coils, kz, ky, kx"):
        recon(buf, header)
    with pytest.raises(ValueError, match="fft_workers"):
        FFTRecon.Params(fft_workers=0)


@pytest.mark.parametrize("shape", [(3, 1, 6, 10), (3, 1, 8, 8), (2, 6, 10, 14), (2, 1, 7, 8), (2, 4, 6, 256), (2, 5, 6, 8)])
def test_centred_ifft_equals_shifted_transform(shape):
    """The in-place shift-theorem path equals fftshift(ifftn(ifftshift(k))) for any sizes."""
    from gadgets.fft_recon import centred_ifft

    rng = np.random.default_rng(sum(shape))
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    keep = k.copy()
    axes = (1, 2, 3) if shape[1] > 1 else (2, 3)
    ref = scipy.fft.fftshift(scipy.fft.ifftn(scipy.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)
    out = centred_ifft(k, axes)
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_array_equal(k, keep)  # input untouched


def hybrid(buf: ReconBuffer) -> ReconBuffer:
    """The same buffer with its readout transformed (what the hybrid accumulation delivers)."""
    return ReconBuffer(**{**buf.__dict__, "data": centred_ifft(buf.data, axes=(-1,)).astype(np.complex64), "domain": "hybrid"})


@pytest.mark.parametrize(
    "encoded, recon, center",
    [
        ((64, 48, 1), None, None),  # plain 2D
        ((64, 48, 1), (48, 32, 1), None),  # recon matrix smaller: image crop
        ((32, 16, 8), None, None),  # 3D: ky and kz transformed
        ((64, 48, 1), None, 40),  # asymmetric echo: back to k-space along x first
    ],
)
@pytest.mark.parametrize("combine", ["none", "rss"])
def test_hybrid_buffers_give_the_kspace_result(encoded, recon, center, combine):
    """A hybrid buffer (readout already in image space) reconstructs to the same image as its
    k-space buffer, with the coils combined or not."""
    rng = np.random.default_rng(11)
    nx, ny, nz = encoded
    header = make_header(encoded=encoded, encoded_fov=(240.0, 180.0, 80.0 if nz > 1 else 5.0), recon=recon)
    k = rng.standard_normal((3, nz, ny, nx)) + 1j * rng.standard_normal((3, nz, ny, nx))
    buf = buffer(k, header, center=center)
    params = FFTRecon.Params(fft_workers=1, coil_combine=combine)
    want = FFTRecon(context(header), params).apply(buf)
    got = FFTRecon(context(header), params).apply(hybrid(buf))
    assert got.data.shape == want.data.shape and got.data.dtype == want.data.dtype
    assert got.history == want.history == ["ACC", "FFT"] + (["RSS"] if combine == "rss" else [])
    np.testing.assert_allclose(got.data, want.data, atol=2e-5 * np.abs(want.data).max())


@pytest.mark.parametrize("shape", [(32, 1, 256, 256), (5, 1, 7, 10), (3, 6, 10, 14), (3, 5, 6, 8)])
@pytest.mark.parametrize("workers", [1, -1])
def test_fused_rss_equals_rss_of_the_centred_transform(shape, workers):
    """rss_ifft (no shift passes, coils in chunks, helper threads) equals rss(centred_ifft(k)) for
    even and odd sizes, 2D and 3D, k-space and hybrid (ky/kz only) transforms."""
    from gadgets.coil_combine import rss
    from gadgets.fft_recon import rss_ifft

    rng = np.random.default_rng(sum(shape))
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    for axes in ((2,), (2, 3)) if shape[1] == 1 else ((1, 2), (1, 2, 3)):
        want = rss(centred_ifft(k, axes))
        got = rss_ifft(k, axes, workers)
        assert got.shape == (1,) + shape[1:] and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * want.max())
    with pytest.raises(ValueError, match="coil axis"):
        rss_ifft(k, (0, 2))


def test_rss_chain_equals_separate_combination():
    """FFTRecon coil_combine rss, then CoilCombine rss passing it on, equals FFT then CoilCombine."""
    from gadgets.coil_combine import CoilCombine

    rng = np.random.default_rng(2)
    header = make_header(encoded=(64, 48, 1), encoded_fov=(240.0, 180.0, 5.0))
    buf = buffer(rng.standard_normal((4, 1, 48, 64)) + 1j * rng.standard_normal((4, 1, 48, 64)), header)
    combine = CoilCombine(context(header))
    separate = combine.apply(recon(buf, header))
    fused = FFTRecon(context(header), FFTRecon.Params(coil_combine="rss")).apply(buf)
    assert combine.apply(fused) is fused
    np.testing.assert_allclose(fused.data, separate.data, rtol=1e-5, atol=1e-6 * separate.data.max())
    assert fused.history == separate.history == ["ACC", "FFT", "RSS"]
    walsh = CoilCombine(context(header), CoilCombine.Params(method="walsh"))
    with pytest.raises(ValueError, match="coil_combine: none"):
        walsh.apply(fused)


def test_coil_chunk_sums_are_the_same_bits_for_any_thread_count_and_timing():
    """A replayed journal must give the same images bit for bit: the partial sums over coil
    chunks are added in chunk order, whoever computed them and whenever."""
    from gadgets.fft_recon import coil_images_coils_last, rss_ifft

    rng = np.random.default_rng(3)
    k = (rng.standard_normal((32, 1, 256, 256)) + 1j * rng.standard_normal((32, 1, 256, 256))).astype(np.complex64)
    single = rss_ifft(k, (2,), workers=1)
    _, s0_single = coil_images_coils_last(k, (2,), (1, 256, 256), workers=1)
    for _ in range(6):  # the helper thread takes a different share of the 16 chunks each time
        assert rss_ifft(k, (2,), workers=-1).tobytes() == single.tobytes()
        assert coil_images_coils_last(k, (2,), (1, 256, 256), workers=-1)[1].tobytes() == s0_single.tobytes()
    ref = np.sqrt((np.abs(np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, 2), axis=2, norm="ortho"), 2)) ** 2).sum(0))
    np.testing.assert_allclose(single[0], ref, rtol=1e-5, atol=1e-5 * ref.max())
