"""The default chain (configs/default.yaml) on real scanner data from ../shared/data.

Each file must give the expected number of images on the header's recon matrix; file-specific
checks cover what the data exercise: a noise scan with a different dwell time and embedded
calibration lines (Skyra), repetitions (twix GRE), phase-correction navigators (EPI), and
recon matrix / FOV different from the encoded ones (pulseq).
"""

from __future__ import annotations

from functools import cache

import ismrmrd
import numpy as np
import pytest
from chain_helpers import DATA_DIR, build_chain, centred_ifft, payloads, read_mrd, run_chain

from gadgets._common import NON_IMAGING_MASK
from gadgets.noise import bandwidth_scale
from inline.buffers import HYBRID, AcquisitionIndex, ReconBuffer

EXPECTED_IMAGES = {
    "pulseq_gre_16ch_128_phantom.h5": 1,
    "pulseq_gre_32ch_64x64_phantom.h5": 1,
    "siemens_skyra_ssfp_14ch_R3_phantom.h5": 1,
    "twix_epi_2ch_phantom.h5": 1,
    "twix_gre_2ch_2rep_phantom.h5": 2,
}
CAL_ONLY = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)


@cache
def load(name: str):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"real scanner data {path} not found (expected in ../shared/data next to the repo)")
    return read_mrd(path)


QC = ("ReadoutQC", "ShotMotionQC", "ImageQC")


def run(name: str, stages: slice = slice(None)):
    """The default chain's reconstruction stages (QC taps left out: tests/gadgets/test_qc_*)."""
    header, acqs = load(name)
    chain = [g for g in build_chain(header) if type(g).__name__ not in QC][stages]
    return chain, run_chain(chain, acqs)


@pytest.mark.parametrize("name", sorted(EXPECTED_IMAGES))
def test_image_count_and_recon_matrix(name):
    header, acqs = load(name)
    _, out = run(name)
    images = payloads(out, ismrmrd.Image)
    assert len(out) == len(images)  # nothing but images leaves the chain

    # expected count from the data: distinct loop counters of imaging lines
    indices = {
        AcquisitionIndex(a.idx.slice, a.idx.contrast, a.idx.phase, a.idx.repetition, a.idx.set)
        for a in acqs
        if not a.flags & (NON_IMAGING_MASK | CAL_ONLY)
    }
    assert len(images) == len(indices) == EXPECTED_IMAGES[name]

    recon = header.encoding[0].reconSpace
    for n, im in enumerate(images, start=1):
        assert list(im.matrix_size) == [recon.matrixSize.x, recon.matrixSize.y, 1]
        np.testing.assert_allclose(im.field_of_view[:2], [recon.fieldOfView_mm.x, recon.fieldOfView_mm.y])
        assert im.data.dtype == np.uint16 and 0 < im.data.max() <= 4095
        assert im.image_index == n and im.image_series_index == 1
        assert ismrmrd.Meta.deserialize(im.attribute_string)["DataRole"] == "Image"


def test_skyra_noise_scan_and_embedded_calibration():
    name = "siemens_skyra_ssfp_14ch_R3_phantom.h5"
    _header, acqs = load(name)
    chain, out = run(name, slice(0, 3))  # noise, oversampling, accumulate
    noise = chain[0]
    assert noise.noise_dwell_time_us == pytest.approx(20.0)
    assert noise.number_of_noise_samples == 384
    cov = noise.noise_covariance
    assert cov.shape == (14, 14)
    np.testing.assert_allclose(cov, cov.conj().T)
    assert np.linalg.eigvalsh(cov).min() > 0
    assert noise.receiver_noise_bandwidth == pytest.approx(0.793)
    acq_dwell = next(a.sample_time_us for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    assert acq_dwell == pytest.approx(2.4, abs=1e-6)
    scale = bandwidth_scale(acq_dwell, 20.0, 0.793)
    assert scale == pytest.approx(0.43626, rel=1e-4)
    np.testing.assert_allclose(noise.scaled_matrix(acq_dwell), scale * noise.prewhitening_matrix, rtol=1e-5, atol=1e-9)

    (buf,) = payloads(out, ReconBuffer)
    offset = 144 // 2 - 54  # encoded y 144, ky centre 54
    cal_only = {a.idx.kspace_encode_step_1 + offset for a in acqs if a.flags & CAL_ONLY}
    cal_and_imaging = {
        a.idx.kspace_encode_step_1 + offset
        for a in acqs
        if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    }
    sampled = set(np.flatnonzero(buf.sampled[0]).tolist())
    assert len(cal_only) == 32 and len(cal_and_imaging) == 16
    assert len(sampled) == 36  # every third line of 106 (R = 3)
    assert not sampled & cal_only  # calibration-only lines stay out of the image
    assert cal_and_imaging <= sampled
    assert set(np.flatnonzero(buf.reference_sampled[0]).tolist()) == cal_only | cal_and_imaging
    assert buf.data.shape == (14, 1, 144, 192)  # readout oversampling removed
    assert buf.readout_fov_mm == pytest.approx(280.0)


def test_twix_gre_two_repetitions():
    _, out = run("twix_gre_2ch_2rep_phantom.h5")
    images = payloads(out, ismrmrd.Image)
    assert [im.repetition for im in images] == [0, 1]
    assert [im.image_index for im in images] == [1, 2]
    # same phantom twice, one series scale: the images agree closely
    a, b = (im.data.astype(float) for im in images)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1


def test_epi_phase_correction_navigators_stay_out():
    name = "twix_epi_2ch_phantom.h5"
    _, acqs = load(name)
    navs = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA)]
    assert len(navs) == 3 and {a.idx.kspace_encode_step_1 for a in navs} == {50}
    _, out = run(name, slice(0, 3))
    (buf,) = payloads(out, ReconBuffer)
    assert buf.sampled.sum() == 100
    # ky 50 holds the imaging line only, not an average with the navigators at ky 50
    line50 = next(a for a in acqs if a.idx.kspace_encode_step_1 == 50 and not a.flags & NON_IMAGING_MASK)
    assert not line50.is_flag_set(ismrmrd.ACQ_IS_REVERSE)
    expected = centred_ifft(line50.data, axes=(-1,))[:, 50:150]  # after 2x oversampling removal
    # the default chain keeps readouts in hybrid space (x transformed); reversed EPI lines are
    # flipped in k-space and brought to the buffer's domain
    assert buf.domain == HYBRID
    np.testing.assert_allclose(buf.data[:, 0, 50], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pulseq_recon_matrix_smaller_than_encoded():
    name = "pulseq_gre_16ch_128_phantom.h5"
    header, _ = load(name)
    enc = header.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (128, 128)
    assert (enc.encodedSpace.fieldOfView_mm.x, enc.encodedSpace.fieldOfView_mm.y) == (512.0, 256.0)
    assert (enc.reconSpace.fieldOfView_mm.x, enc.reconSpace.fieldOfView_mm.y) == (256.0, 256.0)
    _, out = run(name)
    (image,) = payloads(out, ismrmrd.Image)
    assert list(image.matrix_size) == [64, 64, 1]  # 4 mm pixels: ky cropped from 128 to 64 in k-space
