"""Accuracy of the default chain against third-party references on the same k-space.

Data: ``ismrmrd_generate_cartesian_shepp_logan`` (Debian ismrmrd-tools): 256x256 Shepp-Logan,
8 coils, 2x readout oversampling (512 samples), one noise-calibration readout (``-C``).

Reference 1, BART (Uecker et al.), the same steps as our chain:
``whiten`` (noise prewhitening from the noise readout) -> ``fft -u -i`` (centred unitary
inverse FFT over x, y) -> ``resize -c`` (crop the 2x readout oversampling in the image
domain) -> ``rss 8`` (root-sum-of-squares over coils).
Ours: NoiseAdjust -> RemoveReadoutOversampling -> AcquisitionAccumulateTrigger -> FFTRecon
-> CoilCombine(rss) -> ImageFinish(float, no scaling).

NRMSE = ||ours - ref|| / ||ref||, no global scale fitted for BART.

Reference 2, ``ismrmrd_recon_cartesian_2d`` (ismrmrd-tools' own example recon: FFT, crop,
RSS; no prewhitening, unnormalised FFT), compared with our chain with prewhitening off;
its unnormalised FFT differs from our orthonormal one by the known factor sqrt(N).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
from chain_helpers import build_chain, payloads, read_mrd, run_chain

from inline.bart import read_cfl, write_cfl
from inline.bart import bart as run_bart
from gadgets.noise import DEFAULT_RECEIVER_NOISE_BANDWIDTH, bandwidth_scale

GENERATOR = "ismrmrd_generate_cartesian_shepp_logan"
pytestmark = [
    pytest.mark.skipif(shutil.which("bart") is None, reason="bart is not on PATH (Debian package 'bart')"),
    pytest.mark.skipif(shutil.which(GENERATOR) is None, reason=f"{GENERATOR} is not on PATH (Debian 'ismrmrd-tools')"),
]

MATRIX, COILS = 256, 8


def nrmse(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def bart(tmp: Path, *args: str) -> None:
    run_bart(tmp, *args, timeout_s=60)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shepp_logan")
    subprocess.run(
        [GENERATOR, "-m", str(MATRIX), "-c", str(COILS), "-C", "-o", "raw.h5"],
        cwd=tmp,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return tmp / "raw.h5"


def our_image(path: Path, **overrides: dict) -> np.ndarray:
    header, acqs = read_mrd(path)
    chain = build_chain(header, overrides={"finish": {"data_type": "float"}, **overrides})
    images = payloads(run_chain(chain, acqs), ismrmrd.Image)
    assert len(images) == 1
    assert images[0].data.dtype == np.float32
    return images[0].data[0, 0]  # (y, x)


def test_default_chain_matches_bart(phantom: Path):
    tmp = phantom.parent
    _header, acqs = read_mrd(phantom)
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    lines = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(noise) == 1 and len(lines) == MATRIX
    nx = lines[0].number_of_samples
    assert nx == 2 * MATRIX  # 2x readout oversampling

    # BART dims: 0 = x (readout), 1 = y, 2 = z, 3 = coils
    ksp = np.zeros((nx, MATRIX, 1, COILS), np.complex64)
    for a in lines:
        ksp[:, a.idx.kspace_encode_step_1, 0, :] = a.data.T
    write_cfl(tmp / "ksp", ksp)
    write_cfl(tmp / "noise", noise[0].data.T.reshape(nx, 1, 1, COILS))

    # bart whiten gives unit-variance whitened noise (covariance / (N - 1), Cholesky), i.e.
    # our prewhitening without Gadgetron's noise-bandwidth factor. Apply that factor, computed
    # here from the formula and the file's dwell times, so both sides use the same scale.
    scale = bandwidth_scale(lines[0].sample_time_us, noise[0].sample_time_us, DEFAULT_RECEIVER_NOISE_BANDWIDTH)
    assert scale == pytest.approx(np.sqrt(2 * 0.793), rel=1e-6)  # equal dwell times in this file
    bart(tmp, "whiten", "ksp", "noise", "white")
    bart(tmp, "scale", f"{scale:.9g}", "white", "white_s")
    bart(tmp, "fft", "-u", "-i", "3", "white_s", "coilimg")  # bitmask 3 = x, y
    bart(tmp, "resize", "-c", "0", str(MATRIX), "coilimg", "crop")
    bart(tmp, "rss", "8", "crop", "rss")  # bitmask 8 = coils
    ref = np.abs(read_cfl(tmp / "rss").squeeze()).T  # (x, y) -> (y, x)

    ours = our_image(phantom)
    assert ours.shape == ref.shape == (MATRIX, MATRIX)
    err = nrmse(ours, ref)
    print(f"NRMSE vs BART: {err:.3e}")
    assert err < 1e-3
    # the comparison is not vacuous: without prewhitening the images differ clearly
    assert nrmse(our_image(phantom, noise={"perform_noise_adjust": False}), ref) > 0.05


def test_default_chain_matches_ismrmrd_recon_cartesian_2d(phantom: Path, tmp_path: Path):
    if shutil.which("ismrmrd_recon_cartesian_2d") is None:
        pytest.skip("ismrmrd_recon_cartesian_2d is not on PATH (Debian 'ismrmrd-tools')")
    copy = tmp_path / "raw.h5"
    shutil.copy(phantom, copy)
    subprocess.run(["ismrmrd_recon_cartesian_2d", str(copy)], check=True, capture_output=True, timeout=60)
    with h5py.File(copy, "r") as f:
        ref = np.asarray(f["dataset/cpp/data"][()], np.float32).reshape(MATRIX, MATRIX)

    ours = our_image(phantom, noise={"perform_noise_adjust": False})
    assert ours.shape == ref.shape
    # The tool's inverse FFT (FFTW, over the oversampled 512 x 256 grid) is unnormalised,
    # ours orthonormal: a known factor sqrt(512 * 256), not a fitted one.
    gain = np.sqrt(2 * MATRIX * MATRIX)
    err = nrmse(gain * ours, ref)
    print(f"NRMSE vs ismrmrd_recon_cartesian_2d: {err:.3e}")
    assert err < 1e-3
