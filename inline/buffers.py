"""Data containers that travel between gadgets inside a chain.

Axis order, fixed for the whole project (BART's ``mri.h`` idea: one canonical order,
defined once):

* k-space:  ``(coils, kz, ky, kx)`` -- kx is the readout, ky = kspace_encode_step_1,
  kz = kspace_encode_step_2; complex64, arbitrary scanner units.
* images:   ``(coils, z, y, x)`` complex64, or ``(z, y, x)`` after coil combination.

Lengths inside the runtime are SI [m] unless a name says otherwise: ``*_mm`` fields keep
the ISMRMRD header's millimetres because they are copied straight into image headers.

Domains. Readouts and k-space buffers are in k-space (:data:`KSPACE`) unless marked
:data:`HYBRID`: the readout axis already inverse-Fourier-transformed to image space
(``x``, centred, orthonormal, as :func:`gadgets.fft_recon.centred_ifft` does) while ky and kz
are still k-space, i.e. ``(coils, kz, ky, x)``. :class:`~gadgets.oversampling.RemoveReadoutOversampling`
produces it (``output_domain: hybrid``) because it transforms every readout anyway, so the
reconstruction after the last readout only has the ky (and kz) transform left (Gadgetron's
readout-oversampling gadget and BART's ``fft`` bitmasks allow the same split). The domain
travels as the ``domain`` attribute of the message (:func:`domain_of`). Only a gadget that
declares ``accepts_hybrid = True`` may receive hybrid data: the chain config is refused
otherwise (:func:`inline.config.validate_chain`) and the engine refuses such a message at run
time, so a k-space gadget (GRAPPA, SENSE, CS, partial Fourier, EPI, ...) never silently gets it.

Early snapshots. An accumulator may send an :class:`EarlySnapshot` of a buffer when all but
a few of its lines are in, so the reconstruction transforms it while the scanner is still
acquiring; the complete :class:`ReconBuffer` then says in ``since_snapshot`` which lines
changed after the snapshot, and only their contribution is added (a Cartesian transform is
linear, so the image of the complete buffer is the snapshot's image plus the images of the
new lines). Only a gadget that lists :class:`EarlySnapshot` in ``accepts`` may follow such an
accumulator as the first stage that takes buffers (:func:`inline.config.check_early_snapshots`).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from inline.backend import get_array_module


#: Data in k-space along every encoded axis (the default).
KSPACE = "kspace"
#: Readout axis in image space, ky/kz in k-space (see the module docstring).
HYBRID = "hybrid"
Domain = Literal["kspace", "hybrid"]


def domain_of(item: Any) -> str:
    """The domain of a readout or buffer: its ``domain`` attribute, :data:`KSPACE` when it has none."""
    return getattr(item, "domain", KSPACE)


class AcquisitionIndex(NamedTuple):
    """The loop counters that select one reconstructable buffer (ISMRMRD ``EncodingCounters``)."""

    slice: int = 0
    contrast: int = 0
    phase: int = 0
    repetition: int = 0
    set: int = 0
    average: int = 0  # 0 unless the accumulator keeps averages apart (separate_averages)


@dataclass(frozen=True)
class EncodingInfo:
    """Geometry of one ISMRMRD encoding, read from the XML header.

    Attributes:
        encoded_matrix: (x, y, z) encoded matrix size; x includes readout oversampling.
        encoded_fov_mm: (x, y, z) encoded field of view [mm].
        recon_matrix: (x, y, z) reconstructed matrix size.
        recon_fov_mm: (x, y, z) reconstructed field of view [mm].
        ky_center, kz_center: k-space centre line of encode steps 1 and 2 (encoding limits).
        ky_max, kz_max: largest encode-step indices (encoding limits), so ky runs 0..ky_max.
    """

    encoded_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    ky_center: int
    kz_center: int
    ky_max: int
    kz_max: int

    @classmethod
    def from_header(cls, header: Any, encoding: int = 0) -> "EncodingInfo":
        """Read encoding ``encoding`` of an ``ismrmrdHeader``; raises ValueError if it is absent."""
        try:
            enc = header.encoding[encoding]
        except (IndexError, TypeError):
            raise ValueError(f"header has no encoding {encoding}") from None
        e, r = enc.encodedSpace, enc.reconSpace
        lim = enc.encodingLimits

        def limit(name: str, default_max: int) -> tuple[int, int]:
            lm = getattr(lim, name, None) if lim is not None else None
            if lm is None or lm.maximum is None:
                return default_max // 2, max(default_max - 1, 0)
            center = lm.center if lm.center is not None else (lm.maximum + 1) // 2
            return int(center), int(lm.maximum)

        ky_c, ky_m = limit("kspace_encoding_step_1", e.matrixSize.y)
        kz_c, kz_m = limit("kspace_encoding_step_2", e.matrixSize.z)
        return cls(
            encoded_matrix=(e.matrixSize.x, e.matrixSize.y, e.matrixSize.z),
            encoded_fov_mm=(e.fieldOfView_mm.x, e.fieldOfView_mm.y, e.fieldOfView_mm.z),
            recon_matrix=(r.matrixSize.x, r.matrixSize.y, r.matrixSize.z),
            recon_fov_mm=(r.fieldOfView_mm.x, r.fieldOfView_mm.y, r.fieldOfView_mm.z),
            ky_center=ky_c,
            kz_center=kz_c,
            ky_max=ky_m,
            kz_max=kz_m,
        )


@dataclass
class ReconBuffer:
    """k-space of one (slice, contrast, phase, repetition, set), ready to reconstruct.

    Attributes:
        data: ``(coils, kz, ky, kx)`` complex64 on the encoded grid; kx is the readout as
            delivered (after oversampling removal, if a gadget did it); unsampled lines are 0.
        sampled: ``(kz, ky)`` bool, True where a line was acquired.
        index: the loop counters of this buffer.
        encoding: geometry of the encoding the buffer belongs to.
        header: acquisition header (``ismrmrd.AcquisitionHeader``) of the line nearest the
            k-space centre; source of position, directions, time stamps for the image.
        readout_fov_mm: field of view along kx of ``data`` [mm]; equals the encoded FOV,
            or half of it after 2x oversampling removal.
        reference: calibration (ACS) k-space ``(coils, kz, ky, kx)`` or None, for parallel
            imaging gadgets; IS_PARALLEL_CALIBRATION lines go here and not into ``data``.
        reference_sampled: ``(kz, ky)`` bool for ``reference``, or None.
        history: processing steps applied so far (ImageProcessingHistory in the image meta).
        meta: extra MRD image meta, ``{key: str or list of str}``, set by a gadget for the
            image(s) made from this buffer (e.g. ``InlineReconMethod``); FFTRecon and
            CoilCombine carry it on, ImageFinish writes it. Empty by default.
        domain: :data:`KSPACE`, or :data:`HYBRID` when the readout axis of ``data`` (and of
            ``reference``) is already in image space: ``(coils, kz, ky, x)``.
        since_snapshot: the lines that changed after this buffer's :class:`EarlySnapshot`, or
            None when none was sent; cleared by :meth:`completed` and by any gadget that makes
            new data.
    """

    data: np.ndarray
    sampled: np.ndarray
    index: AcquisitionIndex
    encoding: EncodingInfo
    header: Any
    readout_fov_mm: float
    reference: np.ndarray | None = None
    reference_sampled: np.ndarray | None = None
    history: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    domain: Domain = KSPACE
    since_snapshot: "LinesSince | None" = None

    def completed(self, data, step: str | list[str], meta: dict[str, Any] | None = None) -> "ReconBuffer":
        """This buffer with ``data`` (``(coils, kz, ky, kx)``, every line filled) as a fully
        sampled buffer: no reference, ``step`` appended to the history, ``meta`` merged in.
        What a reconstruction (SENSE, CS, DL) hands to FFTRecon."""
        xp = get_array_module(self.sampled)
        steps = [step] if isinstance(step, str) else list(step)
        return dataclasses.replace(
            self, data=data, sampled=xp.ones(self.sampled.shape, bool), reference=None, reference_sampled=None,
            history=[*self.history, *steps], meta={**self.meta, **(meta or {})}, since_snapshot=None,
        )


@dataclass(frozen=True)
class LinesSince:
    """The lines of a buffer written after its :class:`EarlySnapshot` was taken.

    Attributes:
        token: the snapshot's token.
        lines: ``(kz, ky)`` grid positions of those lines, in arrival order (a position may repeat).
        resampled: True when one of them was already sampled in the snapshot (an average or
            a repeated line), so the change is not just the new line's data.
    """

    token: int
    lines: tuple[tuple[int, int], ...]
    resampled: bool = False


@dataclass
class EarlyReference:
    """The calibration (ACS) lines of a buffer, sent as soon as they look complete, so a
    parallel-imaging gadget calibrates while the imaging lines are still being acquired.

    Attributes:
        reference: ``(coils, kz, ky, kx)`` complex64 calibration k-space (a copy), 0 where unsampled.
        reference_sampled: ``(kz, ky)`` bool.
        index: the loop counters of the buffer the lines belong to.
        encoding: its encoding geometry.
        data_shape: the shape its buffer's ``data`` will have.
        domain: :data:`KSPACE` or :data:`HYBRID`, as the buffer's.
    """

    reference: np.ndarray
    reference_sampled: np.ndarray
    index: AcquisitionIndex
    encoding: EncodingInfo
    data_shape: tuple[int, int, int, int]
    domain: Domain = KSPACE


@dataclass
class EarlySnapshot:
    """A buffer with all but a few of its lines, sent ahead so the transform runs early.

    Attributes:
        buffer: the buffer so far (unsampled lines 0; ``buffer.data`` may be the
            accumulator's own array: read it, never write it, and set ``released`` when
            done reading).
        token: unique per snapshot; the complete buffer's ``since_snapshot.token``.
        released: set by the consumer once it no longer reads ``buffer.data``; until then
            the accumulator holds later lines aside.

    A consumer calls :meth:`begin_read` before reading ``buffer.data`` and :meth:`release`
    after; the accumulator calls :meth:`revoke` when the complete buffer must leave: a
    snapshot nobody has started reading is withdrawn (the consumer then skips it), one being
    read makes the accumulator copy its array instead.
    """

    buffer: ReconBuffer
    token: int
    released: threading.Event = field(default_factory=threading.Event)
    _state: str = "new"  # new, reading, released, revoked
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin_read(self) -> bool:
        """Claim ``buffer.data`` for reading; False when the snapshot was revoked (skip it)."""
        with self._lock:
            if self._state == "revoked":
                return False
            self._state = "reading"
            return True

    def release(self) -> None:
        """Done reading (or not going to read): the accumulator may write its array again."""
        with self._lock:
            if self._state != "revoked":
                self._state = "released"
        self.released.set()

    def revoke(self) -> bool:
        """Withdraw the snapshot; True when nobody reads ``buffer.data`` any more, False when a
        consumer is reading it now (the caller must not write it)."""
        with self._lock:
            if self._state in ("new", "revoked"):
                self._state = "revoked"
                self.released.set()
                return True
            return self._state == "released"


@dataclass
class ImageBuffer:
    """Reconstructed image(s) of one buffer before image finishing.

    Attributes:
        data: ``(coils, z, y, x)`` complex64 coil images, or ``(1, z, y, x)`` after coil
            combination (complex64 or float32 magnitude).
        index: loop counters the image came from.
        header: reference acquisition header (position, directions, time stamps).
        field_of_view_mm: (x, y, z) field of view of ``data`` [mm].
        history: processing steps applied so far.
        meta: extra MRD image meta ``{key: str or list of str}`` (see :class:`ReconBuffer`).
    """

    data: np.ndarray
    index: AcquisitionIndex
    header: Any
    field_of_view_mm: tuple[float, float, float]
    history: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def combined(self) -> bool:
        return self.data.shape[0] == 1
