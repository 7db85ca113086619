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
