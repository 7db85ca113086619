"""Training and test data for the DL reconstruction: multi-coil k-space simulated from the
MNI152 2009 templates that nilearn ships (via :func:`inline.simulate.simulate_scan`).

A *bank* holds noise-free slices: the complex object image (tissue contrast from the
T1/GM/WM templates and the signal equation, smooth background phase) and compressed coil
sensitivities (16 simulated loops -> :data:`VIRTUAL_COILS` virtual coils, the same
compression the gadget applies). A *sample* adds white complex noise at a random SNR,
undersamples along ky and gives the fully sampled RSS image as the target.

Hold-out: slices are indexed by their relative position along the slice normal,
``f = (i + 0.5) / slices - 0.5`` in ``[-0.5, 0.5]`` of the covered brain extent. Training uses
``|f| >= TRAIN_MIN_ABS_POSITION`` only; test slices are taken from ``|f| <= TEST_MAX_ABS_POSITION``,
with other coil/phase/noise seeds. The MNI152 template is one (average) anatomy, so this is a
hold-out of brain regions, not of subjects.

Axes: images ``(y, x)``, maps and k-space ``(coils, ky, kx)``, complex64; masks ``(ky,)`` bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from inline.coils import compress, compression_matrix
from inline.simulate import ORIENTATIONS, simulate_scan

__all__ = [
    "VIRTUAL_COILS", "Bank", "Sample", "acs_lines_for", "equispaced_mask", "make_bank",
    "make_sample", "fft2c", "ifft2c", "rss", "input_scale",
]

VIRTUAL_COILS = 8
PHYSICAL_COILS = 16
CONTRASTS = ("t1w", "t2w", "pd")
TRAIN_MIN_ABS_POSITION = 0.15
TEST_MAX_ABS_POSITION = 0.10
#: ACS lines as a fraction of the matrix: 24 of 256 (12 of 128), as the simulator's default
ACS_FRACTION = 24 / 256


def fft2c(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D FFT over the last two axes."""
    k = np.fft.ifftshift(image, axes=(-2, -1))
    return np.fft.fftshift(np.fft.fft2(k, norm="ortho"), axes=(-2, -1)).astype(np.complex64)


def ifft2c(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D inverse FFT over the last two axes."""
    x = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifft2(x, norm="ortho"), axes=(-2, -1)).astype(np.complex64)


def rss(coil_images: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over axis 0, float32."""
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=0)).astype(np.float32)


def acs_lines_for(matrix: int) -> int:
    """Calibration lines for a ``matrix``-line ky axis (even, >= 8)."""
    return max(8, 2 * round(ACS_FRACTION * matrix / 2))


def equispaced_mask(ny: int, acceleration: int, acs_lines: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(sampled, acs)`` ``(ny,)`` bool: every R-th line, ``(ky - ny//2 - offset) % R == 0``
    (the simulator's and a GRAPPA protocol's pattern), plus ``acs_lines`` centre lines."""
    ky = np.arange(ny)
    sampled = (ky - ny // 2 - offset) % acceleration == 0
    acs = np.zeros(ny, bool)
    if acceleration > 1:
        acs[ny // 2 - acs_lines // 2: ny // 2 + acs_lines - acs_lines // 2] = True
    else:
        acs[:] = True
    return sampled | acs, acs


def input_scale(kspace: np.ndarray, acs: np.ndarray) -> float:
    """The scale that makes an image O(1): the 99th percentile of the RSS of the ACS-only
    (low-resolution) coil images. ``kspace`` ``(coils, ky, kx)``, ``acs`` ``(ky,)`` bool."""
    low = ifft2c(np.where(acs[None, :, None], kspace, 0))
    return max(float(np.percentile(rss(low), 99)), 1e-30)


@dataclass
class Bank:
    """Noise-free slices: ``images`` ``(n, y, x)`` complex64, ``maps`` ``(n, coils, y, x)``
    complex64 (compressed), ``signal`` ``(n,)`` mean RSS over the brain, and per slice
    ``position`` (relative, see module docstring), ``orientation`` and ``contrast``."""

    images: np.ndarray
    maps: np.ndarray
    signal: np.ndarray
    position: np.ndarray
    orientation: list[str] = field(default_factory=list)
    contrast: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def make_bank(
    matrix: int, *, split: str, slices: int = 40, seeds: tuple[int, ...] = (0,),
    orientations: tuple[str, ...] = ORIENTATIONS, contrasts: tuple[str, ...] = CONTRASTS,
    fov_mm: float = 240.0, coils: int = PHYSICAL_COILS, virtual_coils: int = VIRTUAL_COILS,
) -> Bank:
    """Simulate noise-free slices for ``split`` ``"train"`` or ``"test"`` (see the module docstring).

    Raises:
        ValueError: unknown ``split``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, maps, signal, position, orient, contrast_of = [], [], [], [], [], []
    for seed in seeds:
        for orientation in orientations:
            for contrast in contrasts:
                scan = simulate_scan(
                    matrix=matrix, slices=slices, coils=coils, snr=math.inf, noise_samples=0,
                    orientation=orientation, contrast=contrast, fov_mm=fov_mm,
                    seed=seed * 1000 + 17 * ORIENTATIONS.index(orientation) + CONTRASTS.index(contrast),
                )
                for i in range(slices):
                    f = (i + 0.5) / slices - 0.5
                    keep = abs(f) >= TRAIN_MIN_ABS_POSITION if split == "train" else abs(f) <= TEST_MAX_ABS_POSITION
                    brain = scan.brain_mask[i]
                    if not keep or brain.mean() < 0.05:
                        continue
                    image = scan.images[i]
                    coil_maps = scan.coil_maps[:, i]
                    k = fft2c(coil_maps * image[None])
                    acs = np.zeros(matrix, bool)
                    n = acs_lines_for(matrix)
                    acs[matrix // 2 - n // 2: matrix // 2 + n // 2] = True
                    cc = compression_matrix(k[:, acs], virtual_coils)
                    virtual = compress(coil_maps, cc)
                    images.append(image.astype(np.complex64))
                    maps.append(virtual)
                    signal.append(float(rss(virtual * image[None])[brain].mean()))
                    position.append(f)
                    orient.append(orientation)
                    contrast_of.append(contrast)
    return Bank(np.stack(images), np.stack(maps), np.asarray(signal, np.float32), np.asarray(position, np.float32), orient, contrast_of)


@dataclass
class Sample:
    """One undersampled slice: ``kspace`` ``(coils, ky, kx)`` complex64 with zeros at
    unsampled lines, ``full`` the fully sampled noisy k-space, ``sampled``/``acs`` ``(ky,)``
    bool, ``target`` ``(y, x)`` float32 RSS of ``full``, ``acceleration`` R."""

    kspace: np.ndarray
    full: np.ndarray
    sampled: np.ndarray
    acs: np.ndarray
    target: np.ndarray
    acceleration: int


def make_sample(
    bank: Bank, index: int, acceleration: int, rng: np.random.Generator, *, snr: float | None = None,
    augment: bool = True, offset: int | None = None, acs_lines: int | None = None,
) -> Sample:
    """Noisy, undersampled k-space of slice ``index``.

    ``snr``: mean brain RSS / per-channel noise std (None: log-uniform in [15, 80]).
    ``augment``: random flips, transpose and global phase. ``offset``: the equispaced
    pattern's shift (None: random when augmenting, else 0). ``acs_lines``: calibration
    lines (None: :func:`acs_lines_for` the matrix).
    """
    image, maps = bank.images[index], bank.maps[index]
    if augment:
        if rng.random() < 0.5:
            image, maps = image[::-1], maps[:, ::-1]
        if rng.random() < 0.5:
            image, maps = image[:, ::-1], maps[:, :, ::-1]
        if rng.random() < 0.5:
            image, maps = image.T, maps.transpose(0, 2, 1)
        image = image * np.exp(1j * rng.uniform(0, 2 * np.pi)).astype(np.complex64)
    if snr is None:
        snr = float(np.exp(rng.uniform(np.log(15), np.log(80))))
    sigma = bank.signal[index] / snr
    coils, ny, nx = maps.shape
    noise = (rng.standard_normal((coils, ny, nx)) + 1j * rng.standard_normal((coils, ny, nx))) * (sigma / np.sqrt(2))
    full = (fft2c(np.ascontiguousarray(maps * image[None])) + noise).astype(np.complex64)
    if offset is None:
        offset = int(rng.integers(acceleration)) if augment else 0
    sampled, acs = equispaced_mask(ny, acceleration, acs_lines or acs_lines_for(ny), offset)
    kspace = np.where(sampled[None, :, None], full, 0).astype(np.complex64)
    return Sample(kspace, full, sampled, acs, rss(ifft2c(full)), acceleration)
