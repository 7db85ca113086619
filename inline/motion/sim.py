"""Known rigid motion applied in k-space to simulated scans: ground truth for motion estimation.

The patient moves, the receive coils do not. For each pose the object of a
:class:`~inline.simulate.SimulatedScan` is moved in k-space -- translation as a linear phase
ramp (the Fourier shift theorem), rotation as three Fourier shears per axis (Unser, Thévenaz
& Yaroslavsky, IEEE Trans Image Process 1995;4:1371; Eddy, Fitzgerald & Noll, MRM
1996;36:923: exact for a band-limited object) on a grid padded 2x so nothing wraps -- then
multiplied by the stationary coil maps and Fourier transformed as :mod:`inline.simulate`
does (centred, orthonormal, readout 2x oversampled). Each affected readout gets the
difference between the moved and the unmoved noise-free line added, so the scan keeps its
own noise, and a readout whose pose is the identity is untouched.

Poses follow :class:`~inline.motion.rigid.RigidMotion` (image axes x = readout, y = phase,
z = slice/partition; rotation about pixel ``(nz//2, ny//2, nx//2)`` of the recon grid).
When: a :class:`MotionEvent` ``(repetition, shot, pose)`` puts the object at ``pose`` (relative
to its position at the start of the scan) from that shot of that repetition on. A readout's
shot is its ordinal within its (slice, repetition) buffer divided by the echo-train length,
so in an interleaved multi-slice scan shot ``k`` of every slice falls in the same TR.
2D multi-slice scans take in-plane motion only (``tx, ty, rz``); 3D slabs all six.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import ismrmrd
import numpy as np
from scipy import fft as sfft

from inline.motion.rigid import RigidMotion
from inline.simulate import SimulatedScan, simulate_scan

_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)


@dataclass(frozen=True)
class MotionEvent:
    """From shot ``shot`` of repetition ``repetition`` on, the object is at ``pose``.

    Attributes:
        repetition: ISMRMRD repetition counter.
        shot: shot (echo train) index within each (slice, repetition) buffer; 0 = from the
            start of the repetition.
        pose: position relative to the start of the scan (not to the previous event).
    """

    repetition: int
    shot: int
    pose: RigidMotion


@dataclass
class MotionScan:
    """A simulated scan with known motion.

    Attributes:
        scan: the scan; its imaging acquisitions carry the moved k-space (new copies).
        events: the motion events, sorted by (repetition, shot).
        shot_length: readouts per shot (echo-train length) used to number shots.
        spacing_m: ``(dz, dy, dx)`` recon pixel spacing [m].
        readout_pose: per acquisition of ``scan.acquisitions`` the index into ``poses`` of
            its pose (-1 for noise readouts).
        poses: the distinct poses, ``poses[0]`` the identity.
        shots: per acquisition its shot index (-1 for noise readouts; a navigator has the
            shot it precedes).
    """

    scan: SimulatedScan
    events: tuple[MotionEvent, ...]
    shot_length: int
    spacing_m: tuple[float, float, float]
    readout_pose: np.ndarray
    poses: list[RigidMotion] = field(default_factory=list)
    shots: np.ndarray | None = None

    def pose(self, repetition: int, shot: int = 0) -> RigidMotion:
        """The pose at shot ``shot`` of repetition ``repetition``."""
        return pose_at(self.events, repetition, shot)


def pose_at(events: Sequence[MotionEvent], repetition: int, shot: int) -> RigidMotion:
    """The pose of the latest event at or before ``(repetition, shot)``; identity before any."""
    pose = RigidMotion()
    for e in sorted(events, key=lambda e: (e.repetition, e.shot)):
        if (e.repetition, e.shot) <= (repetition, shot):
            pose = e.pose
    return pose


def repetition_events(poses: Sequence[RigidMotion]) -> list[MotionEvent]:
    """Events putting repetition ``i`` at ``poses[i]`` for its whole duration."""
    return [MotionEvent(i, 0, p) for i, p in enumerate(poses) if i > 0 or not p.is_identity]


# -- moving an object in k-space ------------------------------------------------------


def _shift_along(img: np.ndarray, axis: int, shift_px: np.ndarray) -> np.ndarray:
    """Shift ``img`` along ``axis`` by ``shift_px`` pixels (broadcast over the other axes), Fourier."""
    n = img.shape[axis]
    f = sfft.fftfreq(n)
    shape = [1] * img.ndim
    shape[axis] = n
    phase = np.exp(-2j * np.pi * f.reshape(shape) * shift_px)
    return sfft.ifft(sfft.fft(img, axis=axis, workers=-1) * phase, axis=axis, workers=-1)


def _coords_px(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) - n // 2


def _shear(img: np.ndarray, along: int, by: int, coef: float, spacing: np.ndarray) -> np.ndarray:
    """Push-forward shear ``u += coef * v`` (physical) with u = axis ``along``, v = axis ``by``."""
    shape = [1] * img.ndim
    shape[by] = img.shape[by]
    v_px = _coords_px(img.shape[by]).reshape(shape)
    return _shift_along(img, along, coef * v_px * spacing[by] / spacing[along])


def _rotate_plane(img: np.ndarray, u: int, v: int, angle: float, spacing: np.ndarray) -> np.ndarray:
    """Rotate ``(z, y, x)`` ``img`` by ``angle`` [rad] from axis ``u`` towards axis ``v`` (three shears)."""
    if angle == 0.0:
        return img
    if abs(angle) > math.pi / 2:
        raise ValueError(f"rotations beyond 90 degrees are not simulated, got {math.degrees(angle):.1f}")
    a = -math.tan(angle / 2.0)
    b = math.sin(angle)
    img = _shear(img, u, v, a, spacing)
    img = _shear(img, v, u, b, spacing)
    return _shear(img, u, v, a, spacing)


def move_object(obj: np.ndarray, pose: RigidMotion, spacing_m: Sequence[float]) -> np.ndarray:
    """The object ``(z, y, x)`` complex moved to ``pose`` (band-limited, periodic over its grid).

    ``out(R p + t) = obj(p)`` about pixel ``(nz//2, ny//2, nx//2)``: rotation about x, then
    y, then z (``R = Rz Ry Rx``), each as three Fourier shears, then the translation as a
    phase ramp. Pad the grid beforehand so the moved object does not wrap around.

    Raises:
        ValueError: a single plane with out-of-plane motion, or a rotation beyond 90 degrees.
    """
    s = np.asarray(spacing_m, dtype=np.float64)  # (dz, dy, dx)
    out = np.asarray(obj, dtype=np.complex128)
    if out.shape[0] == 1 and not pose.in_plane:
        raise ValueError(f"a 2D slice takes in-plane motion only (tx, ty, rz), got {pose}")
    rx, ry, rz = pose.rotation_rad
    z, y, x = 0, 1, 2
    out = _rotate_plane(out, y, z, rx, s)  # +y towards +z
    out = _rotate_plane(out, z, x, ry, s)  # +z towards +x
    out = _rotate_plane(out, x, y, rz, s)  # +x towards +y
    tx, ty, tz = pose.translation_m
    for axis, t in ((x, tx), (y, ty), (z, tz)):
        if t:
            out = _shift_along(out, axis, np.asarray(t / s[axis]))
    return out


def _coil_kspace(obj: np.ndarray, maps: np.ndarray, three_d: bool) -> np.ndarray:
    """``(coils, z, ky, 2 nx)`` centred orthonormal k-space of ``maps * obj`` (obj already 2x wide in x)."""
    axes = (1, 2, 3) if three_d else (2, 3)
    x = maps * obj[None]
    x = sfft.ifftshift(x, axes=axes)
    k = sfft.fftn(x, axes=axes, norm="ortho", workers=-1)
    return sfft.fftshift(k, axes=axes).astype(np.complex64)


def _volume_kspace(
    obj: np.ndarray, maps: np.ndarray, pose: RigidMotion, spacing: np.ndarray, three_d: bool
) -> np.ndarray:
    """Coil k-space ``(coils, z, ny, 2 nx)`` of ``obj`` ``(z, ny, nx)`` moved to ``pose`` under fixed coils."""
    nz, ny, nx = obj.shape
    pz = nz // 2 if three_d else 0
    padded = np.pad(obj, ((pz, pz), (ny // 2, ny // 2), (nx // 2, nx // 2)))
    moved = move_object(padded, pose, spacing) if not pose.is_identity else padded
    moved = moved[pz : pz + nz, ny // 2 : ny // 2 + ny]  # what leaves the FOV in y/z is not seen (no fold-over)
    # coil maps exist on the recon FOV; the readout's oversampled margin takes their edge values
    wide_maps = np.pad(maps, ((0, 0), (0, 0), (0, 0), (nx // 2, nx // 2)), mode="edge")
    return _coil_kspace(moved, wide_maps, three_d)


def _convention(k0: np.ndarray, acquisitions, vol: int, three_d: bool) -> np.complex64:
    """The global phase (+-1, +-i) between :mod:`inline.simulate`'s lines of volume ``vol`` and ``k0``.

    The simulator's centred DFT carries a slice-count-dependent sign in 2D multi-slice scans
    (harmless for images, not for a difference added to its lines); it is fitted over all
    the volume's lines (noise averages out) and snapped to the nearest quarter turn.

    Raises:
        ValueError: the lines do not match ``k0`` up to such a phase.
    """
    num, den = 0j, 0.0
    for a in acquisitions:
        if int(a.flags) & _NOISE or (not three_d and int(a.idx.slice) != vol):
            continue
        ref = k0[:, int(a.idx.kspace_encode_step_2) if three_d else 0, int(a.idx.kspace_encode_step_1)]
        num += complex(np.vdot(ref, a.data))
        den += float(np.vdot(ref, ref).real)
    g = num / max(den, 1e-300)
    snapped = complex(np.round(g.real), np.round(g.imag))
    if abs(abs(snapped) - 1.0) > 1e-6 or abs(g - snapped) > 0.05:
        raise ValueError(f"simulated k-space of volume {vol} does not match its object and coil maps (gain {g:.3f})")
    return np.complex64(snapped)


def _spacing(header) -> tuple[float, float, float]:
    enc = header.encoding[0]
    fov, mat = enc.reconSpace.fieldOfView_mm, enc.reconSpace.matrixSize
    return (fov.z / max(mat.z, 1) * 1e-3, fov.y / mat.y * 1e-3, fov.x / mat.x * 1e-3)


def apply_motion(
    scan: SimulatedScan,
    events: Sequence[MotionEvent],
    shot_length: int | None = None,
    navigators: bool = False,
    seed: int = 0,
) -> MotionScan:
    """Apply ``events`` to a simulated scan; returns a :class:`MotionScan` with new acquisitions.

    Args:
        scan: a :func:`~inline.simulate.simulate_scan` result (fully sampled or not; the
            moved object is sampled wherever the scan samples).
        events: :class:`MotionEvent` list; poses are relative to the start of the scan.
        shot_length: readouts per shot; None: the header's ``echoTrainLength`` (1 if absent).
        navigators: put a navigator readout (``ACQ_IS_NAVIGATION_DATA``) before every shot:
            the k-space centre line (ky and kz centre, full readout) of the object at that
            shot's pose, with noise of the scan's covariance (a "k-space centre" / FID-like
            line navigator). Scan counters are renumbered.
        seed: seeds the navigators' noise.

    Raises:
        ValueError: out-of-plane motion of a 2D scan, or an event outside the scan.
    """
    header = scan.header
    enc = header.encoding[0]
    etl = int(shot_length or getattr(enc, "echoTrainLength", None) or 1)
    nz_enc = int(enc.encodedSpace.matrixSize.z or 1)
    three_d = nz_enc > 1
    spacing = np.asarray(_spacing(header))
    events = tuple(sorted(events, key=lambda e: (e.repetition, e.shot)))
    if not three_d and any(not e.pose.in_plane for e in events):
        raise ValueError("a 2D multi-slice scan takes in-plane motion only (tx, ty, rz)")
    reps = int(enc.encodingLimits.repetition.maximum or 0) + 1 if enc.encodingLimits.repetition else 1
    if any(not 0 <= e.repetition < reps or e.shot < 0 for e in events):
        raise ValueError(f"motion events {events} outside the scan's {reps} repetitions")

    poses = [RigidMotion()]
    acqs = []
    readout_pose, shots = [], []
    counts: dict[tuple[int, int], int] = {}
    need: dict[tuple[int, int], list[int]] = {}  # (volume, pose) -> acquisition numbers
    navs: list[tuple[int, int, int]] = []  # (acquisition number, volume, pose) of navigators
    for a in scan.acquisitions:
        acq = ismrmrd.Acquisition(head=ismrmrd.AcquisitionHeader.from_buffer_copy(a.getHead()), data=np.array(a.data))
        if int(acq.flags) & _NOISE:
            acqs.append(acq)
            readout_pose.append(-1)
            shots.append(-1)
            continue
        key = (int(acq.idx.slice), int(acq.idx.repetition))
        n = counts.get(key, 0)
        counts[key] = n + 1
        shot = n // etl
        pose = pose_at(events, key[1], shot)
        if pose not in poses:
            poses.append(pose)
        p = poses.index(pose)
        vol = 0 if three_d else key[0]
        if navigators and n % etl == 0:
            nav = ismrmrd.Acquisition(head=ismrmrd.AcquisitionHeader.from_buffer_copy(a.getHead()),
                                      data=np.zeros_like(acq.data))
            nav.clear_all_flags()
            nav.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
            nav.idx.kspace_encode_step_1 = int(enc.encodedSpace.matrixSize.y) // 2
            nav.idx.kspace_encode_step_2 = nz_enc // 2 if three_d else 0
            navs.append((len(acqs), vol, p))
            acqs.append(nav)
            readout_pose.append(p)
            shots.append(shot)
        if p:
            need.setdefault((vol, p), []).append(len(acqs))
        acqs.append(acq)
        readout_pose.append(p)
        shots.append(shot)

    kspace: dict[tuple[int, int], np.ndarray] = {}  # (volume, pose) -> k-space in the simulator's convention
    unmoved: dict[int, tuple[np.ndarray, np.complex64]] = {}

    def volume(vol: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(moved k-space, unmoved k-space) of volume ``vol`` at pose ``p``, simulator convention."""
        planes = slice(None) if three_d else slice(vol, vol + 1)
        obj, maps = scan.images[planes], scan.coil_maps[:, planes]
        if vol not in unmoved:
            k0 = _volume_kspace(obj, maps, RigidMotion(), spacing, three_d)
            unmoved.clear()  # one volume at a time: (coils, z, ky, kx) can be large
            unmoved[vol] = (k0, _convention(k0, scan.acquisitions, vol, three_d))
        k0, sign = unmoved[vol]
        if (vol, p) not in kspace:
            kspace.clear()
            kspace[(vol, p)] = (_volume_kspace(obj, maps, poses[p], spacing, three_d) if p else k0) * sign
        return kspace[(vol, p)], k0 * sign

    for (vol, p), items in sorted(need.items()):
        moved_k, k0 = volume(vol, p)
        for i in items:
            acq = acqs[i]
            kz = int(acq.idx.kspace_encode_step_2) if three_d else 0
            ky = int(acq.idx.kspace_encode_step_1)
            acq.data[:] += moved_k[:, kz, ky, :] - k0[:, kz, ky, :]
    if navs:
        from inline.simulate import _complex_normal

        rng = np.random.default_rng(seed)
        cov = np.asarray(scan.noise_covariance, dtype=np.complex128)
        chol = np.linalg.cholesky(cov).astype(np.complex64) if np.any(cov) else None
        for i, vol, p in sorted(navs, key=lambda t: (t[1], t[2])):
            moved_k, _ = volume(vol, p)
            nav = acqs[i]
            line = moved_k[:, int(nav.idx.kspace_encode_step_2), int(nav.idx.kspace_encode_step_1), :]
            noise = chol @ _complex_normal(rng, line.shape) if chol is not None else 0
            nav.data[:] = line + noise
        first = next((int(a.scan_counter) for a in scan.acquisitions), 1)
        for j, acq in enumerate(acqs):
            acq.scan_counter = first + j

    moved = SimulatedScan(
        header_xml=scan.header_xml,
        acquisitions=acqs,
        images=scan.images,
        coil_maps=scan.coil_maps,
        noise_covariance=scan.noise_covariance,
        brain_mask=scan.brain_mask,
    )
    return MotionScan(
        scan=moved, events=events, shot_length=etl, spacing_m=tuple(float(v) for v in spacing),
        readout_pose=np.asarray(readout_pose, np.int64), poses=poses, shots=np.asarray(shots, np.int64),
    )


def simulate_motion_scan(
    events: Sequence[MotionEvent], shot_length: int | None = None, navigators: bool = False, **simulate
) -> MotionScan:
    """:func:`~inline.simulate.simulate_scan` (keyword arguments ``simulate``) then :func:`apply_motion`."""
    return apply_motion(simulate_scan(**simulate), events, shot_length, navigators, seed=simulate.get("seed", 0))
