"""configs/moco_average.yaml: motion-corrected averaging, four series, and what the correction buys.

Ground truth: the simulated 2-slice scan with six repetitions at known poses
(motion_helpers.POSES_2D, up to 3.8 mm and 3 deg) and the same scan, same noise, without
motion. Correction metric: NRMSE of each average to the motion-free average over the head,
and sharpness (gradient energy over signal energy, Tenengrad-like). Measured (slices 0 / 1):
NRMSE 0.141 / 0.114 uncorrected, 0.019 / 0.016 corrected; sharpness 0.76 / 0.77 x the
motion-free average's uncorrected, 0.98 / 0.99 x corrected (bench/moco_accuracy.py reports
more seeds).
"""

from __future__ import annotations

import functools

import ismrmrd
import numpy as np
import pytest
from chain_helpers import REPO, build_chain, context, payloads, run_chain
from motion_helpers import (
    POSES_2D,
    copy_acquisitions,
    fresh,
    head_mask,
    images,
    images_2d,
    nrmse,
    scan_2d,
    sharpness,
    still_2d,
)

from gadgets.motion import ROLE_META_KEY, ImageSeries, MocoAverage, MotionEstimate
from inline.buffers import ImageBuffer
from inline.config import load_chain, validate_chain
from inline.motion.rigid import RigidMotion, resample_rigid
from inline.motion.sim import move_object
from inline.qc.alert import Alert

CONFIG = REPO / "configs" / "moco_average.yaml"


@functools.lru_cache(maxsize=None)
def _averages():
    """Averages per role and slice, and the motion-free average (MotionEstimate + MocoAverage on the RSS images)."""
    ms = scan_2d()
    ctx = context(ms.scan.header)
    out = payloads(run_chain([MotionEstimate(ctx), MocoAverage(ctx)], fresh(images_2d())), ImageBuffer)
    by_role = {}
    for im in out:
        by_role.setdefault(im.meta[ROLE_META_KEY], {}).setdefault(im.index.slice, []).append(im)
    still = images(still_2d())
    truth = {s: np.mean([im.data[0, 0] for im in still if im.index.slice == s], axis=0) for s in (0, 1)}
    return by_role, truth


def test_moco_average_beats_plain_average():
    by_role, truth = _averages()
    assert {r: sum(map(len, v.values())) for r, v in by_role.items()} == {
        "frames": 12, "moco_frames": 12, "average": 2, "moco_average": 2}
    for s in (0, 1):
        mask = head_mask(truth[s])
        plain = by_role["average"][s][0].data[0, 0]
        moco = by_role["moco_average"][s][0].data[0, 0]
        assert by_role["moco_average"][s][0].meta["MocoFrames"] == [str(i) for i in range(len(POSES_2D))]
        e_plain, e_moco = nrmse(plain, truth[s], mask), nrmse(moco, truth[s], mask)
        sh_truth, sh_plain, sh_moco = (sharpness(x, mask) for x in (truth[s], plain, moco))
        assert e_plain > 0.1 and e_moco < 0.03 and e_moco < e_plain / 4
        assert sh_plain < 0.8 * sh_truth and sh_moco > 0.95 * sh_truth
    # the corrected frames line up with the reference frame
    ref = {s: v[0].data[0, 0] for s, v in by_role["frames"].items()}
    for s, frames in by_role["moco_frames"].items():
        mask = head_mask(ref[s])
        for im in frames[1:]:
            assert nrmse(im.data[0, 0], ref[s], mask) < 0.12
            assert "MOCO" in im.history


def test_chain_config_emits_four_series_with_their_own_indices():
    ms = scan_2d()
    spec = load_chain(CONFIG)
    assert spec.name == "moco_average" and len(validate_chain(spec)) == len(spec.gadgets)
    chain = build_chain(ms.scan.header, CONFIG)
    out = run_chain(chain, copy_acquisitions(ms.scan.acquisitions))
    imgs = payloads(out, ismrmrd.Image)
    series = {}
    for im in imgs:
        series.setdefault(im.image_series_index, []).append(im)
    assert {k: len(v) for k, v in series.items()} == {1: 12, 2: 12, 3: 2, 4: 2}
    for k, v in series.items():
        assert [im.image_index for im in v] == list(range(1, len(v) + 1))
        role = {1: "frames", 2: "moco_frames", 3: "average", 4: "moco_average"}[k]
        assert all(im.meta[ROLE_META_KEY] == role for im in v)
    assert {im.meta["SeriesDescription"] for im in series[4]} == {"inline MOCO AVE"}
    # the motion meta reaches the stored images, in mm and deg
    for im in series[1]:
        est = RigidMotion.from_meta(im.meta)
        true = POSES_2D[im.repetition]
        assert np.abs(est.translation_mm - true.translation_mm).max() < 0.1
        assert np.abs(est.rotation_deg - true.rotation_deg).max() < 0.1
    alerts = payloads(out, Alert)
    reg = sorted({a.repetition for a in alerts if a.evidence.get("source") == "image_registration"})
    assert reg == [1, 2, 3, 4]
    # no repetition has motion inside it: the k-space shot detector stays quiet
    assert not [a for a in alerts if a.evidence.get("source") == "kspace_shot_consistency"]
    shots = next(g for g in chain if type(g).__name__ == "ShotMotionQC")
    assert sorted(shots.results) == [1, 2, 3, 4, 5]
    assert all(not r.change.during for r in shots.results.values())


def test_moco_average_needs_the_motion_meta():
    ms = scan_2d()
    g = MocoAverage(context(ms.scan.header))
    with pytest.raises(ValueError, match="MotionEstimate"):
        list(g.process(fresh(images_2d()[:1])[0], None))


def test_image_series_routes_roles_and_leaves_others():
    ms = scan_2d()
    g = ImageSeries(context(ms.scan.header), ImageSeries.Params(series_index={"moco_average": 7}))

    def image(role):
        im = ismrmrd.Image.from_array(np.zeros((4, 4), np.uint16))
        im.image_series_index = 1
        meta = ismrmrd.Meta({"SeriesDescription": "t1"})
        if role:
            meta[ROLE_META_KEY] = role
        im.meta = meta
        return im

    out = payloads(run_chain([g], [image("moco_average"), image(None), image("frames"), image("moco_average")]))
    assert [(im.image_series_index, im.image_index) for im in out] == [(7, 1), (1, 0), (1, 0), (7, 2)]
    assert out[0].meta["SeriesDescription"] == "t1 MOCO AVE" and out[1].meta["SeriesDescription"] == "t1"


def _blob(n=64, seed=3):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((1, n, n)), 2)
    yy, xx = np.mgrid[:n, :n] - n // 2
    return (x * np.exp(-(xx**2 + yy**2) / (n / 5) ** 2)).astype(np.float32)


def test_resample_undoes_the_simulated_motion():
    obj = _blob()
    sp = (3e-3, 1e-3, 1.2e-3)
    pose = RigidMotion.from_mm_deg((2.3, -1.7), 4.0)
    moved = np.real(move_object(obj.astype(complex), pose, sp)).astype(np.float32)
    back = resample_rigid(moved[None], pose, sp)[0]
    mask = np.abs(obj) > 0.05 * np.abs(obj).max()
    assert nrmse(back, obj, mask) < 0.03 < nrmse(moved, obj, mask)
    # complex data: real and imaginary parts alike
    cplx = resample_rigid((moved + 1j * moved)[None].astype(np.complex64), pose, sp)[0]
    np.testing.assert_allclose(cplx.real, back, atol=1e-5)
    np.testing.assert_allclose(cplx.imag, back, atol=1e-5)
    with pytest.raises(ValueError, match="out-of-plane"):
        resample_rigid(moved[None], RigidMotion.from_mm_deg((0, 0, 1.0), (0, 0, 0)), sp)


@pytest.mark.gpu
def test_resample_numpy_cupy_parity():
    cp = pytest.importorskip("cupy")
    from inline.backend import cupy_available

    if not cupy_available():
        pytest.skip("no CUDA device")
    vol = np.stack([_blob(48, s)[0] for s in range(16)])[None]  # (1, 16, 48, 48)
    sp = (2e-3, 1e-3, 1e-3)
    pose = RigidMotion.from_mm_deg((1.1, -0.6, 0.4), (1.0, -2.0, 3.0))
    host = resample_rigid(vol, pose, sp)
    dev = resample_rigid(cp.asarray(vol), pose, sp)
    assert isinstance(dev, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(dev), host, atol=1e-4 * np.abs(host).max())
