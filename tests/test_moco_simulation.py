"""inline.motion.sim: known rigid motion applied in k-space; the ground truth of the motion tests."""

from __future__ import annotations

import math

import ismrmrd
import numpy as np
import pytest
from motion_helpers import POSES_2D, base_2d, scan_2d, still_2d

from inline.motion.rigid import RigidMotion
from inline.motion.sim import MotionEvent, apply_motion, move_object, pose_at, repetition_events

_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)


def _blob(shape, seed=0):
    """A smooth random complex object well inside its grid (so periodic moves do not wrap).

    Fourier shears are exact for band-limited objects; a sheared spectrum leaves the box
    a little, so a smooth object keeps the round trip error at a few 1e-3.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    x = ndimage.gaussian_filter(x.real, 2) + 1j * ndimage.gaussian_filter(x.imag, 2)
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    r2 = sum((g / (n / 5)) ** 2 for g, n in zip(grids, shape))
    return (x * np.exp(-r2)).astype(np.complex128)


def test_integer_translation_is_a_roll():
    obj = _blob((1, 32, 48))
    pose = RigidMotion.from_mm_deg((3.0, -2.0), 0.0)  # 1 mm pixels: 3 px along x, -2 along y
    out = move_object(obj, pose, (1e-3, 1e-3, 1e-3))
    np.testing.assert_allclose(out, np.roll(obj, (-2, 3), axis=(1, 2)), atol=1e-12)


def test_quarter_turn_is_exact_and_turns_x_towards_y():
    # 90 degrees is three integer shears: an exact permutation; +x goes to +y
    obj = np.zeros((1, 16, 16), complex)
    obj[0, 8, 11] = 1.0  # (y, x) = (0, +3) from the centre pixel (8, 8)
    out = move_object(obj, RigidMotion.from_mm_deg((0, 0), 90.0), (1e-3,) * 3)
    assert np.unravel_index(np.argmax(np.abs(out)), out.shape) == (0, 11, 8)  # now at y = +3, x = 0
    np.testing.assert_allclose(np.abs(out).sum(), 1.0, atol=1e-9)
    # 3D: rx turns +y towards +z
    vol = np.zeros((16, 16, 16), complex)
    vol[8, 11, 8] = 1.0
    out = move_object(vol, RigidMotion.from_mm_deg((0, 0, 0), (90.0, 0.0, 0.0)), (1e-3,) * 3)
    assert np.unravel_index(np.argmax(np.abs(out)), out.shape) == (11, 8, 8)


def test_move_and_move_back_round_trip():
    obj = _blob((16, 40, 40), seed=1)
    sp = (3e-3, 1.5e-3, 1.5e-3)  # anisotropic voxels
    pose = RigidMotion.from_mm_deg((1.3, -2.1, 0.7), (2.0, -1.5, 3.0))
    moved = move_object(obj, pose, sp)
    back = RigidMotion().relative_to(pose)  # the inverse pose
    again = move_object(moved, back, sp)
    assert np.linalg.norm(again - obj) / np.linalg.norm(obj) < 0.005
    assert np.linalg.norm(moved - obj) / np.linalg.norm(obj) > 0.3


def test_in_plane_only_for_2d():
    with pytest.raises(ValueError, match="in-plane"):
        move_object(np.ones((1, 8, 8), complex), RigidMotion.from_mm_deg((0, 0, 1.0), (0, 0, 0)), (1e-3,) * 3)


def test_identity_leaves_the_scan_untouched_and_poses_follow_the_events():
    base = base_2d()
    still = still_2d()
    assert all(np.array_equal(a.data, b.data) for a, b in zip(base.acquisitions, still.scan.acquisitions))
    ms = scan_2d()
    imaging = ms.readout_pose >= 0
    reps = np.array([a.idx.repetition for a in ms.scan.acquisitions])
    for rep, pose in enumerate(POSES_2D):
        assert {ms.poses[p] for p in ms.readout_pose[imaging & (reps == rep)]} == {pose}
    # repetition 0 untouched (noise kept), later ones changed
    for a, b in zip(base.acquisitions, ms.scan.acquisitions):
        if not int(a.flags) & _NOISE:
            assert np.array_equal(a.data, b.data) == (a.idx.repetition == 0)


def test_moved_lines_match_the_moved_object_under_fixed_coils():
    """Noise-free: each line is the centred FFT of stationary coil maps times the moved object."""
    ms = apply_motion(_clean(), [MotionEvent(0, 12, RigidMotion.from_mm_deg((2.5, -1.0), 4.0))])
    scan = ms.scan
    sp = np.asarray(ms.spacing_m)
    obj = scan.images[0:1]
    n = obj.shape[1]
    padded = np.pad(obj, ((0, 0), (n // 2, n // 2), (n // 2, n // 2)))
    moved = move_object(padded, ms.poses[1], sp)[:, n // 2 : n // 2 + n]
    maps = np.pad(scan.coil_maps[:, 0:1], ((0, 0), (0, 0), (0, 0), (n // 2, n // 2)), mode="edge")
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * moved[None], axes=(2, 3)), norm="ortho"), axes=(2, 3))
    sign = None
    for a, s in zip(scan.acquisitions, ms.shots):
        if int(a.flags) & _NOISE or a.idx.slice != 0:
            continue
        line = k[:, 0, a.idx.kspace_encode_step_1]
        if s >= 12:
            sign = sign if sign is not None else np.vdot(line, a.data) / np.vdot(line, line)
            np.testing.assert_allclose(a.data, sign * line, atol=2e-5 * np.abs(line).max())
    assert sign is not None and abs(abs(sign) - 1) < 1e-4


def _clean():
    from inline.simulate import simulate_scan

    return simulate_scan(matrix=32, slices=2, coils=4, snr=math.inf, noise_samples=0, seed=7)


def test_events_and_pose_lookup():
    a, b = RigidMotion.from_mm_deg((1, 0), 0), RigidMotion.from_mm_deg((0, 1), 0)
    events = [MotionEvent(2, 5, b), MotionEvent(1, 0, a)]
    assert pose_at(events, 0, 99) == RigidMotion()
    assert pose_at(events, 1, 0) == a and pose_at(events, 2, 4) == a and pose_at(events, 2, 5) == b
    assert repetition_events([RigidMotion(), a]) == [MotionEvent(1, 0, a)]
    with pytest.raises(ValueError, match="outside"):
        apply_motion(_clean(), [MotionEvent(3, 0, a)])
