"""Helpers shared by the standard gadgets: acquisition flags and copies, centred resizing.

Axis conventions are those of :mod:`inline.buffers`: k-space ``(coils, kz, ky, kx)``,
images ``(coils, z, y, x)``. "Centred" always means the centre index ``n // 2`` of an
axis of length ``n`` maps to ``m // 2`` of the resized axis of length ``m`` (the
``fftshift`` convention, also BART's for even sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import ismrmrd
import numpy as np

from inline.backend import get_array_module

#: Acquisitions that never go into an image: noise, navigators, phase-correction and
#: feedback lines, dummy scans, surface-coil-correction and phase-stabilisation data.
NON_IMAGING_FLAGS: tuple[int, ...] = (
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    ismrmrd.ACQ_IS_NAVIGATION_DATA,
    ismrmrd.ACQ_IS_PHASECORR_DATA,
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION,
)


def flag_mask(flags: Sequence[int]) -> int:
    """Bit mask of ISMRMRD flag numbers (flag ``f`` is bit ``f - 1``)."""
    mask = 0
    for f in flags:
        mask |= 1 << (f - 1)
    return mask


NON_IMAGING_MASK = flag_mask(NON_IMAGING_FLAGS)


def copy_header(acq: ismrmrd.Acquisition) -> ismrmrd.AcquisitionHeader:
    """An independent copy of an acquisition's header."""
    return ismrmrd.AcquisitionHeader.from_buffer_copy(acq.getHead())


def with_data(acq: ismrmrd.Acquisition, data: np.ndarray, **header_fields: int) -> ismrmrd.Acquisition:
    """A new acquisition with ``acq``'s header (fields in ``header_fields`` replaced) and ``data``.

    ``data`` is ``(coils, samples)`` complex64; ``number_of_samples`` and ``active_channels``
    follow its shape. The trajectory is kept only when the sample count is unchanged.
    """
    head = copy_header(acq)
    for name, value in header_fields.items():
        setattr(head, name, value)
    head.active_channels, head.number_of_samples = data.shape
    traj = np.array(acq.traj) if acq.traj.shape[0] == data.shape[1] else None
    if traj is None:
        head.trajectory_dimensions = 0
    return ismrmrd.Acquisition(head=head, data=np.ascontiguousarray(data, dtype=np.complex64), trajectory=traj)


def centred_resize(x: np.ndarray, shape: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """Crop or zero-pad ``x`` along ``axes`` to ``shape``, keeping index ``n // 2`` at ``m // 2``.

    Returns ``x`` itself when nothing changes, else a new array of ``x``'s dtype.
    """
    axes = [a % x.ndim for a in axes]
    if all(x.shape[a] == m for a, m in zip(axes, shape)):
        return x
    out_shape = list(x.shape)
    src: list[slice] = [slice(None)] * x.ndim
    dst: list[slice] = [slice(None)] * x.ndim
    for a, m in zip(axes, shape):
        n = x.shape[a]
        out_shape[a] = m
        if m >= n:  # pad: source fully inside
            start = m // 2 - n // 2
            dst[a] = slice(start, start + n)
        else:  # crop
            start = n // 2 - m // 2
            src[a] = slice(start, start + m)
    out = get_array_module(x).zeros(out_shape, dtype=x.dtype)
    out[tuple(dst)] = x[tuple(src)]
    return out


def readout_placement(number_of_samples: int, center_sample: int) -> tuple[int, int]:
    """Length of the symmetric readout an (a)symmetric echo belongs to, and where it starts in it.

    A readout of ``n`` samples whose k-space centre is at sample ``c`` is the part
    ``[offset, offset + n)`` of a symmetric readout of ``n_full`` samples with its centre at
    ``n_full // 2``. A centre outside ``1..n-1`` (0 is what converters write when they do not
    know) or equal to ``n // 2`` means a symmetric readout: ``(n, 0)``.
    """
    n, c = int(number_of_samples), int(center_sample)
    if c <= 0 or c >= n or c == n // 2:
        return n, 0
    n_full = 2 * max(c, n - c)
    return n_full, n_full // 2 - c
