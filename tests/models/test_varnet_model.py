"""The E2E-VarNet building blocks (models/varnet.py) and its training data (models/data.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install 'inline[dl]')")

from models.data import acs_lines_for, equispaced_mask, fft2c, make_bank, make_sample  # noqa: E402
from models.varnet import RealViewVarNet, SensitivityModel, VarNet, ifft2c, rss  # noqa: E402
from models import varnet  # noqa: E402


def test_centred_ffts_match_numpy_and_are_orthonormal():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 32, 48)) + 1j * rng.standard_normal((3, 32, 48))).astype(np.complex64)
    k = varnet.fft2c(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(k, fft2c(x), atol=1e-5)
    assert np.linalg.norm(k) == pytest.approx(np.linalg.norm(x), rel=1e-5)
    np.testing.assert_allclose(ifft2c(torch.from_numpy(k)).numpy(), x, atol=1e-5)


def test_acs_sensitivities_have_unit_rss():
    rng = np.random.default_rng(1)
    k = torch.from_numpy((rng.standard_normal((1, 4, 32, 32)) + 1j * rng.standard_normal((1, 4, 32, 32))).astype(np.complex64))
    acs = torch.zeros(1, 1, 32, 1)
    acs[..., 12:20, :] = 1
    maps = SensitivityModel(0, 2)(k, acs)
    np.testing.assert_allclose(rss(maps).numpy(), 1.0, atol=1e-4)


def test_forward_shapes_and_real_view_agree():
    torch.manual_seed(0)
    net = VarNet(cascades=2, chans=4, pools=2, sens_chans=2).eval()
    rng = np.random.default_rng(2)
    sampled, acs = equispaced_mask(40, 4, 8)
    k = (rng.standard_normal((1, 3, 40, 36)) + 1j * rng.standard_normal((1, 3, 40, 36))).astype(np.complex64) * sampled[None, None, :, None]
    mask = torch.from_numpy(sampled.astype(np.float32)).view(1, 1, -1, 1)
    acs_mask = torch.from_numpy(acs.astype(np.float32)).view(1, 1, -1, 1)
    with torch.inference_mode():
        out = net(torch.from_numpy(k), mask, acs_mask)
        real = RealViewVarNet(net)(torch.view_as_real(torch.from_numpy(k)).contiguous(), mask, acs_mask)
    assert out.shape == (1, 3, 40, 36) and out.dtype == torch.complex64
    np.testing.assert_allclose(torch.view_as_real(out).numpy(), real.numpy(), atol=1e-6)


def test_mask_matches_the_simulators_sampling():
    from inline.simulate import simulate_scan
    import ismrmrd

    scan = simulate_scan(matrix=64, slices=1, coils=2, acceleration=4, acs_lines=acs_lines_for(64), noise_samples=0, snr=math.inf)
    lines = {a.idx.kspace_encode_step_1 for a in scan.acquisitions if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)}
    sampled, acs = equispaced_mask(64, 4, acs_lines_for(64))
    assert lines == set(np.flatnonzero(sampled).tolist())
    assert acs.sum() == acs_lines_for(64) == 8


def test_train_and_test_slices_are_disjoint_regions():
    train = make_bank(64, split="train", slices=20, orientations=("axial",), contrasts=("t1w",))
    test = make_bank(64, split="test", slices=20, orientations=("axial",), contrasts=("t1w",))
    assert len(train) and len(test)
    assert np.abs(train.position).min() >= 0.15 and np.abs(test.position).max() <= 0.10
    sample = make_sample(test, 0, 6, np.random.default_rng(0), snr=40.0, augment=False)
    assert sample.kspace.shape == (8, 64, 64)
    unsampled = ~sample.sampled
    assert not np.any(sample.kspace[:, unsampled]) and np.all(sample.kspace[:, sample.sampled] == sample.full[:, sample.sampled])
