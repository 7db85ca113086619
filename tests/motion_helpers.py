"""Simulated scans with known rigid motion, cached per test process (tests of inline.motion and gadgets.motion).

Poses are ground truth: applied in k-space by :mod:`inline.motion.sim` to scans of
:func:`inline.simulate.simulate_scan` at a realistic SNR (30: mean brain RSS over the
per-channel noise std; ImageQC warns below 10).
"""

from __future__ import annotations

import functools

import ismrmrd
import numpy as np
from chain_helpers import build_stages, payloads, run_chain

from inline.buffers import ImageBuffer
from inline.motion.rigid import RigidMotion
from inline.motion.sim import MotionScan, apply_motion, repetition_events
from inline.simulate import SimulatedScan, simulate_scan

SNR = 30.0

#: Per repetition: translation (x, y) [mm], rotation rz [deg]; 1.875 mm pixels at 128 / 240 mm.
POSES_2D = [
    RigidMotion(),
    RigidMotion.from_mm_deg((2.0, -1.3), 0.0),
    RigidMotion.from_mm_deg((0.0, 0.0), 2.0),
    RigidMotion.from_mm_deg((-3.1, 2.2), -3.0),
    RigidMotion.from_mm_deg((0.4, 0.3), 0.7),
    RigidMotion.from_mm_deg((0.6, 0.2), 0.8),  # 0.3 mm from the previous: below the 1 mm alert
]

#: 3D slab, 3.75 mm isotropic voxels: translations (x, y, z) [mm], rotations (rx, ry, rz) [deg].
POSES_3D = [
    RigidMotion(),
    RigidMotion.from_mm_deg((1.5, -1.0, 0.8), (1.5, -1.0, 2.0)),
    RigidMotion.from_mm_deg((-1.2, 0.9, -0.6), (-1.0, 1.5, -0.5)),
]


@functools.lru_cache(maxsize=None)
def base_2d(seed: int = 2, repetitions: int = len(POSES_2D), slices: int = 2, contrast: str = "t1w") -> SimulatedScan:
    return simulate_scan(matrix=128, slices=slices, coils=8, repetitions=repetitions, snr=SNR, seed=seed,
                         contrast=contrast, noise_samples=1024)


@functools.lru_cache(maxsize=None)
def scan_2d() -> MotionScan:
    """2 slices, 8 coils, 128 x 128, the repetitions at :data:`POSES_2D`."""
    return apply_motion(base_2d(), repetition_events(POSES_2D))


@functools.lru_cache(maxsize=None)
def still_2d() -> MotionScan:
    """The same scan (same noise) without motion."""
    return apply_motion(base_2d(), [])


@functools.lru_cache(maxsize=None)
def scan_3d() -> MotionScan:
    """A 64 x 64 x 32 slab, 8 coils, the repetitions at :data:`POSES_3D`."""
    base = simulate_scan(matrix=64, slices=1, kz=32, slice_thickness_mm=3.75, coils=8, repetitions=len(POSES_3D),
                         snr=SNR, seed=2, noise_samples=1024)
    return apply_motion(base, repetition_events(POSES_3D))


def header(ms: MotionScan):
    return ms.scan.header


def images(ms: MotionScan) -> list[ImageBuffer]:
    """RSS images of the default chain (noise, oversampling, accumulate, fft, combine), one per slice and repetition."""
    stages = build_stages(ms.scan.header, ("noise", "oversampling", "accumulate", "fft", "combine"))
    return payloads(run_chain(stages, ms.scan.acquisitions), ImageBuffer)


@functools.lru_cache(maxsize=None)
def images_2d() -> tuple[ImageBuffer, ...]:
    return tuple(images(scan_2d()))


@functools.lru_cache(maxsize=None)
def images_3d() -> tuple[ImageBuffer, ...]:
    return tuple(images(scan_3d()))


def fresh(imgs) -> list[ImageBuffer]:
    """Copies of cached images (gadgets change meta in place)."""
    return [ImageBuffer(data=im.data.copy(), index=im.index, header=im.header, field_of_view_mm=im.field_of_view_mm,
                        history=list(im.history), meta=dict(im.meta)) for im in imgs]


def head_mask(reference: np.ndarray) -> np.ndarray:
    return reference > 0.1 * np.percentile(reference, 99)


def nrmse(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm((image - reference)[mask]) / np.linalg.norm(reference[mask]))


def sharpness(image: np.ndarray, mask: np.ndarray) -> float:
    """Gradient energy over signal energy in ``mask`` (Sobel, both in-plane axes; Tenengrad-like)."""
    from scipy import ndimage

    g2 = ndimage.sobel(image, axis=-1) ** 2 + ndimage.sobel(image, axis=-2) ** 2
    return float(g2[mask].sum() / (image[mask] ** 2).sum())


def copy_acquisitions(acqs: list[ismrmrd.Acquisition]) -> list[ismrmrd.Acquisition]:
    return [ismrmrd.Acquisition(head=ismrmrd.AcquisitionHeader.from_buffer_copy(a.getHead()), data=np.array(a.data))
            for a in acqs]
