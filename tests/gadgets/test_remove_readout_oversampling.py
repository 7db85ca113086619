"""RemoveReadoutOversampling: equals an image-domain crop; header bookkeeping; pass-through cases."""

import ismrmrd
import numpy as np
import pytest
from chain_helpers import centred_fft, centred_ifft, context, make_acq, make_header

from gadgets.oversampling import RemoveReadoutOversampling

OS_HEADER = {
    "encoded": (256, 64, 1),
    "encoded_fov": (600.0, 300.0, 5.0),
    "recon": (128, 64, 1),
    "recon_fov": (300.0, 300.0, 5.0),
}


def test_matches_image_domain_crop():
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((3, 256)) + 1j * rng.standard_normal((3, 256))).astype(np.complex64)
    acq = make_acq(centred_fft(image, axes=(-1,)), center=128)
    out = RemoveReadoutOversampling(context(make_header(**OS_HEADER))).apply(acq)

    assert out.number_of_samples == 128 and out.data.shape == (3, 128)
    assert out.center_sample == 64
    assert out.data.dtype == np.complex64
    np.testing.assert_allclose(centred_ifft(out.data, axes=(-1,)), image[:, 64:192], atol=2e-5)
    # orthonormal both ways: white noise keeps its per-sample variance
    noise = (rng.standard_normal((4, 4096)) + 1j * rng.standard_normal((4, 4096))).astype(np.complex64)
    out = RemoveReadoutOversampling(context(make_header(**OS_HEADER))).apply(make_acq(noise))
    assert np.var(out.data) == pytest.approx(np.var(noise), rel=0.03)


def test_header_bookkeeping_for_asymmetric_echo_and_discards():
    data = np.ones((2, 200), np.complex64)
    acq = make_acq(data, center=70, ky=5, scan_counter=9)
    acq.discard_pre, acq.discard_post = 5, 3
    out = RemoveReadoutOversampling(context(make_header(**OS_HEADER))).apply(acq)
    assert out.number_of_samples == 100
    assert out.center_sample == round(50 + (70 - 100) / 2) == 35
    assert (out.discard_pre, out.discard_post) == (3, 2)  # rounded up: nothing discarded survives
    assert out.idx.kspace_encode_step_1 == 5 and out.scan_counter == 9  # rest of the header kept
    assert acq.number_of_samples == 200 and acq.center_sample == 70  # input untouched


def test_noise_and_unoversampled_data_pass_unchanged():
    gadget = RemoveReadoutOversampling(context(make_header(**OS_HEADER)))
    noise = make_acq(np.ones((2, 256)), flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT], center=0)
    assert gadget.apply(noise) is noise

    plain = RemoveReadoutOversampling(context(make_header(encoded=(128, 64, 1), encoded_fov=(300.0, 300.0, 5.0))))
    acq = make_acq(np.ones((2, 128)))
    assert plain.ratio() == 1.0
    assert plain.apply(acq) is acq

    disabled = RemoveReadoutOversampling(
        context(make_header(**OS_HEADER)), RemoveReadoutOversampling.Params(oversampling_factor=1)
    )
    assert disabled.apply(acq) is acq


def test_ratio_from_fov_not_matrix():
    # encoded FOV 2x the recon FOV with equal matrices (as in pulseq_gre_32ch): still 2x
    header = make_header(
        encoded=(64, 64, 1), encoded_fov=(256.0, 128.0, 30.0), recon=(64, 64, 1), recon_fov=(128.0, 128.0, 30.0)
    )
    gadget = RemoveReadoutOversampling(context(header))
    assert gadget.ratio() == 2.0
    assert gadget.apply(make_acq(np.ones((2, 64)))).number_of_samples == 32


def test_params_reject_factor_below_one():
    with pytest.raises(ValueError):
        RemoveReadoutOversampling.Params(oversampling_factor=0.5)


@pytest.mark.parametrize("header", [OS_HEADER, {"encoded": (128, 64, 1), "encoded_fov": (300.0, 300.0, 5.0)}])
def test_hybrid_output_is_the_image_space_crop_of_the_kspace_output(header):
    """output_domain hybrid: the readout leaves transformed along x, the centred inverse FFT of what
    the k-space output would be (also without oversampling), marked as hybrid."""
    from inline.buffers import HYBRID, KSPACE, domain_of

    rng = np.random.default_rng(5)
    n = header["encoded"][0]
    data = (rng.standard_normal((4, n)) + 1j * rng.standard_normal((4, n))).astype(np.complex64)
    acq = make_acq(data, center=n // 2, ky=7)
    ctx = context(make_header(**header))
    kspace = RemoveReadoutOversampling(ctx).apply(acq)
    hybrid = RemoveReadoutOversampling(ctx, RemoveReadoutOversampling.Params(output_domain="hybrid")).apply(acq)
    assert domain_of(kspace) == KSPACE and domain_of(hybrid) == HYBRID and domain_of(acq) == KSPACE
    assert hybrid.data.dtype == np.complex64 and hybrid.data.shape == kspace.data.shape
    assert hybrid.center_sample == kspace.center_sample == hybrid.number_of_samples // 2
    assert hybrid.idx.kspace_encode_step_1 == 7
    np.testing.assert_allclose(hybrid.data, centred_ifft(kspace.data, axes=(-1,)), atol=2e-5)


def test_hybrid_output_keeps_kspace_for_readouts_it_cannot_transform():
    """Asymmetric echo, discarded samples and IS_REVERSE lines stay in k-space (the accumulator
    brings them to the buffer's domain); noise is untouched."""
    from inline.buffers import KSPACE, domain_of

    gadget = RemoveReadoutOversampling(context(make_header(**OS_HEADER)), RemoveReadoutOversampling.Params(output_domain="hybrid"))
    assert RemoveReadoutOversampling.emits_hybrid(gadget.params)
    assert not RemoveReadoutOversampling.emits_hybrid(RemoveReadoutOversampling.Params())
    asymmetric = make_acq(np.ones((2, 200)), center=70)
    discards = make_acq(np.ones((2, 256)))
    discards.discard_pre = 4
    reverse = make_acq(np.ones((2, 256)), flags=[ismrmrd.ACQ_IS_REVERSE])
    for acq in (asymmetric, discards, reverse):
        assert domain_of(gadget.apply(acq)) == KSPACE
    noise = make_acq(np.ones((2, 256)), flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT], center=0)
    assert gadget.apply(noise) is noise
