"""Software coil compression: project many receive channels onto a few virtual coils.

Source: F. Huang, S. Vijayakumar, Y. Li, S. Hertel, G. R. Duensing, "A software channel
compression technique for faster reconstruction with many channels", Magn Reson Imaging
2008;26:133-141; M. Buehrer, K. P. Pruessmann, P. Boesiger, S. Kozerke, "Array compression
for MRI with large coil arrays", Magn Reson Med 2007;57:1131-1139 (single compression
matrix from the principal components of the calibration data). BART ``cc -S`` is the same.

With white channel noise (after prewhitening) the compression matrix has orthonormal rows,
so the virtual coils' noise stays white with the same variance and the RSS of the virtual
coil images keeps the energy of the retained components.

Axis order: k-space ``(coils, ...)`` with the channel axis first, complex64.
"""

from __future__ import annotations

import numpy as np

from inline.backend import get_array_module

__all__ = ["compression_matrix", "compress"]


def compression_matrix(calibration, virtual_coils: int):
    """The ``(virtual_coils, coils)`` complex64 matrix with orthonormal rows that keeps the
    largest principal components of ``calibration``.

    Args:
        calibration: ``(coils, ...)`` complex k-space (the ACS region, or any fully sampled
            part of the data), NumPy or CuPy.
        virtual_coils: coils to keep, ``1 <= virtual_coils``; at most ``coils`` are kept.

    Raises:
        ValueError: ``virtual_coils < 1`` or ``calibration`` has no samples.
    """
    if virtual_coils < 1:
        raise ValueError(f"virtual_coils must be >= 1, got {virtual_coils}")
    xp = get_array_module(calibration)
    coils = calibration.shape[0]
    samples = calibration.reshape(coils, -1)
    if samples.shape[1] == 0:
        raise ValueError("coil compression needs calibration samples, got none")
    covariance = samples @ samples.conj().T
    # eigh returns ascending eigenvalues; keep the largest
    _, vectors = xp.linalg.eigh(covariance.astype(xp.complex128))
    keep = min(virtual_coils, coils)
    return vectors[:, ::-1][:, :keep].conj().T.astype(xp.complex64)


def compress(data, matrix):
    """``(coils, ...)`` -> ``(virtual_coils, ...)``: ``matrix @ data`` over the channel axis.

    Raises:
        ValueError: the channel counts of ``data`` and ``matrix`` differ.
    """
    if data.shape[0] != matrix.shape[1]:
        raise ValueError(f"data has {data.shape[0]} coils, the compression matrix expects {matrix.shape[1]}")
    coils = data.shape[0]
    out = matrix @ data.reshape(coils, -1)
    return out.reshape((matrix.shape[0],) + data.shape[1:]).astype(np.complex64, copy=False)
