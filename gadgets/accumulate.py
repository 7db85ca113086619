"""Accumulate readouts into k-space buffers and emit them on trigger flags.

Source: Gadgetron ``gadgets/mri_core/AcquisitionAccumulateTriggerGadget`` (accumulate until
a trigger, noise dropped) and ``BucketToBufferGadget`` (one buffer per slice / contrast /
phase / repetition / set on the encoded grid, calibration lines into a separate reference
buffer). Triggering here follows the ISMRMRD LAST_IN_* flags rather than Gadgetron's
"counter changed" rule, so a buffer leaves as soon as its last line is in.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK, copy_header, readout_placement
from gadgets.fft_recon import centred_fft, centred_ifft
from inline.buffers import (
    HYBRID,
    KSPACE,
    AcquisitionIndex,
    EarlyReference,
    EarlySnapshot,
    EncodingInfo,
    LinesSince,
    ReconBuffer,
    domain_of,
)
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.registry import register
from inline.trace import Trace

TriggerName = Literal["slice", "contrast", "phase", "repetition", "set", "average", "measurement", "none"]

_TRIGGER_FLAG: dict[str, int | None] = {
    "slice": ismrmrd.ACQ_LAST_IN_SLICE,
    "contrast": ismrmrd.ACQ_LAST_IN_CONTRAST,
    "phase": ismrmrd.ACQ_LAST_IN_PHASE,
    "repetition": ismrmrd.ACQ_LAST_IN_REPETITION,
    "set": ismrmrd.ACQ_LAST_IN_SET,
    "average": ismrmrd.ACQ_LAST_IN_AVERAGE,
    "measurement": ismrmrd.ACQ_LAST_IN_MEASUREMENT,
    "none": None,
}

_CAL = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)
_CAL_AND_IMAGING = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING - 1)
_SNAPSHOT_TOKENS = itertools.count(1)


@dataclass
class _Grid:
    """Sums and counts of the lines of one part (image or reference) of a buffer."""

    sums: np.ndarray  # (coils, kz, ky, kx) complex64
    counts: np.ndarray  # (kz, ky) int32
    center_sample: int
    domain: str = KSPACE  # of the first line; later lines are brought to it
    distinct: int = 0  # lines sampled at least once
    box: list[int] = field(default_factory=lambda: [1 << 30, -1, 1 << 30, -1])  # kz min/max, ky min/max so far
    # early snapshot (see AcquisitionAccumulateTrigger.early_lines)
    token: int | None = None
    changed: list[tuple[int, int]] = field(default_factory=list)  # (kz, ky) written after it
    resampled: bool = False
    lent: EarlySnapshot | None = None  # a snapshot that may still read ``sums``
    held: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # lines kept aside meanwhile

    def write(self, z: int, y: int, line: np.ndarray) -> None:
        """Add a ``(coils, kx)`` line at ``(z, y)``; held aside while a snapshot still reads ``sums``."""
        first = self.counts[z, y] == 0
        if self.token is not None:
            self.changed.append((z, y))
            self.resampled |= not first
        if self.lent is not None and not self.lent.released.is_set():
            self.held.append((z, y, np.array(line, np.complex64)))
        else:
            self.settle()
            self.sums[:, z, y, :] += line
        self.counts[z, y] += 1
        self.distinct += int(first)
        b = self.box
        b[0], b[1], b[2], b[3] = min(b[0], z), max(b[1], z), min(b[2], y), max(b[3], y)

    def inside(self, z: int, y: int) -> bool:
        """Whether ``(z, y)`` lies in the bounding box of the lines written so far."""
        b = self.box
        return b[0] <= z <= b[1] and b[2] <= y <= b[3]

    def settle(self) -> None:
        """Take ``sums`` back from the snapshot (withdrawn if nobody has started reading it, copied
        if it is being read) and write the held lines."""
        if self.lent is not None:
            if not self.lent.revoke():
                self.sums = self.sums.copy()
            self.lent = None
        for z, y, line in self.held:
            self.sums[:, z, y, :] += line
        self.held.clear()

    def average(self) -> tuple[np.ndarray, np.ndarray]:
        sampled = self.counts > 0
        data = self.sums
        if np.any(self.counts > 1):
            data = data / np.maximum(self.counts, 1)[None, :, :, None].astype(np.float32)
        return data.astype(np.complex64, copy=False), sampled


def _to_domain(data: np.ndarray, have: str, want: str) -> np.ndarray:
    """``data`` (``(..., kx)`` or ``(..., x)``) brought from domain ``have`` to ``want`` along the readout."""
    if have == want:
        return data
    if want == HYBRID:
        return centred_ifft(np.ascontiguousarray(data), (data.ndim - 1,), workers=1)
    return centred_fft(np.ascontiguousarray(data), (data.ndim - 1,), workers=1)


@dataclass
class _Pending:
    encoding_space: int
    index: AcquisitionIndex
    encoding: EncodingInfo
    image: _Grid | None = None
    reference: _Grid | None = None
    header: ismrmrd.AcquisitionHeader | None = None
    header_distance: int = 1 << 30
    traces: list[Trace] = field(default_factory=list)
    reference_sent: bool = False

    def buffer(self, data: np.ndarray, sampled: np.ndarray, grid: _Grid, head: ismrmrd.AcquisitionHeader) -> ReconBuffer:
        """A buffer of this index holding ``data`` with ``head`` rewritten to describe its kx axis."""
        nx = data.shape[-1]
        n_full, _ = readout_placement(nx, grid.center_sample)
        head.number_of_samples = nx
        head.center_sample = max(grid.center_sample, 0)
        head.discard_pre = head.discard_post = 0
        return ReconBuffer(
            data=data,
            sampled=sampled,
            index=self.index,
            encoding=self.encoding,
            header=head,
            readout_fov_mm=self.encoding.encoded_fov_mm[0] * n_full / self.encoding.encoded_matrix[0],
            domain=grid.domain,
        )


@register
class AcquisitionAccumulateTrigger(AccumulatingGadget):
    """Collect Cartesian readouts into ``(coils, kz, ky, kx)`` buffers; emit :class:`ReconBuffer` on triggers.

    One buffer per (encoding space, :class:`AcquisitionIndex` = slice, contrast, phase,
    repetition, set). The grid is the header's encoded matrix in ky/kz (from the
    acquisition's ``encoding_space_ref``) and the readout length in kx: the line's samples
    minus ``discard_pre``/``discard_post``. A line goes to
    ``ky = kspace_encode_step_1 + (encoded_y // 2 - ky_center)`` (same for kz with
    ``kspace_encode_step_2``), so partial-Fourier / asymmetric encodings are centred; where
    the header's limits would push lines off the grid (e.g. a converter writing centre 0)
    the offset is clamped into range and a warning logged once. Repeated lines (averages)
    are averaged. IS_REVERSE lines are flipped along the readout (``flip_reversed_lines``,
    the EPI convention; no phase correction is done).

    Routing: IS_PARALLEL_CALIBRATION lines go only to ``reference``;
    IS_PARALLEL_CALIBRATION_AND_IMAGING to both ``data`` and ``reference``; noise,
    navigator, phase-correction, RT/HP feedback, dummy-scan, surface-coil-correction and
    phase-stabilisation lines are dropped (their flags still trigger).

    Triggers: after a line with the LAST_IN_<trigger> flag (``trigger`` param) the held
    buffers whose <trigger> counter equals that line's are emitted; LAST_IN_MEASUREMENT
    always emits everything; ``close()`` flushes the rest. Buffers holding only calibration
    lines wait for imaging lines of the same index (dropped at close). Emitted buffers are
    sorted by (encoding space, index).

    Domains: a buffer takes the domain (:mod:`inline.buffers`) of its first line, k-space
    or hybrid (readout already in image space, from
    :class:`~gadgets.oversampling.RemoveReadoutOversampling` ``output_domain: hybrid``); a
    later line in the other domain is transformed along the readout to it (e.g. an
    IS_REVERSE line, flipped in k-space first). The buffer's ``domain`` says which.

    Emitted buffer: ``data`` complex64 averaged lines (0 where unsampled), ``sampled``
    ``(kz, ky)``; ``header`` = a copy of the header of the imaging line nearest the
    ky/kz centre, with ``number_of_samples``/``center_sample``/``discard_*`` rewritten to
    describe ``data``'s kx axis; ``readout_fov_mm = encoded_fov_x * n_full / encoded_matrix_x``
    where ``n_full`` is the symmetric readout length the samples belong to (the sample count
    for a symmetric echo, larger for an asymmetric one); trace = merge of all its lines.

    Early snapshots (``early_lines`` > 0): when a buffer holds all but ``early_lines`` of the
    lines its encoding limits name (``kspace_encoding_step_1/2`` minimum..maximum; off when
    the limits declare averages that are averaged here), an :class:`~inline.buffers.EarlySnapshot`
    of it goes downstream at once, so :class:`~gadgets.fft_recon.FFTRecon` transforms it while
    the last lines are still being acquired; the complete buffer follows on its trigger as
    usual, its ``since_snapshot`` naming the lines written after the snapshot. The snapshot
    shares this gadget's array (no copy): lines arriving while the consumer still reads it are
    held aside, and a buffer that must leave first is copied. The chain config requires the
    first later stage that takes buffers to accept snapshots
    (:func:`inline.config.check_early_snapshots`). Undersampled scans never reach the count
    and send no snapshot.

    Early references (``early_reference``): the first imaging-only line of a buffer that
    lands outside the ky/kz box of its calibration lines so far (the ACS block has been
    passed, in linear, reversed or centre-out order, or a separate reference scan is over)
    sends an :class:`~inline.buffers.EarlyReference` with a copy of those lines, so
    :class:`~gadgets.grappa.GRAPPA` calibrates while the rest is acquired. The complete
    buffer still carries its full reference: GRAPPA uses the early weights only if that
    reference is unchanged.

    Raises:
        ValueError: a line lands outside the encoded grid, or its channel count / readout
            length / centre differs from the buffer's first line.
    """

    class Params(GadgetParams):
        trigger: TriggerName = Field(
            "slice",
            description="LAST_IN_<trigger> flag that emits buffers: slice, contrast, phase, repetition, set, average, "
            "measurement or none (only LAST_IN_MEASUREMENT and end of stream emit).",
        )
        flip_reversed_lines: bool = Field(True, description="Reverse the sample order of IS_REVERSE (EPI) lines.")
        separate_averages: bool = Field(
            False, description="One buffer per ISMRMRD average instead of averaging repeated lines (MOCO over averages)."
        )
        early_reference: bool = Field(
            False, description="Send the calibration (ACS) lines of a buffer as soon as they are complete (GRAPPA "
            "calibrates while imaging lines are still acquired).",
        )
        early_lines: int = Field(
            0,
            ge=0,
            description="Send an early snapshot of a buffer when all but this many of its lines (encoding limits) "
            "are in, so FFTRecon transforms it before the last readouts; 0: off.",
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer, EarlySnapshot, EarlyReference)

    @classmethod
    def emits_early(cls, params: "AcquisitionAccumulateTrigger.Params") -> bool:
        """True when early snapshots are sent (checked by :func:`inline.config.check_early_snapshots`)."""
        return params.early_lines > 0
    accepts_hybrid: ClassVar[bool] = True

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._pending: dict[tuple[int, AcquisitionIndex], _Pending] = {}
        self._encodings: dict[int, tuple[EncodingInfo, int, int]] = {}
        self._snapshot_at: dict[int, int] = {}
        self._trigger_flag = _TRIGGER_FLAG[self.params.trigger]
        #: number of trigger events that emitted at least one buffer
        self.trigger_count = 0

    # -- geometry -------------------------------------------------------------------
    def _encoding(self, space: int) -> tuple[EncodingInfo, int, int]:
        """Encoding info and (ky, kz) offsets for an encoding space."""
        if space not in self._encodings:
            enc = EncodingInfo.from_header(self.header, space)
            ny, nz = enc.encoded_matrix[1], max(enc.encoded_matrix[2], 1)

            def offset(n: int, center: int, maximum: int, name: str) -> int:
                want = n // 2 - center
                hi = max(n - 1 - maximum, 0)
                got = min(max(want, 0), hi)
                if got != want:
                    self.log.warning(
                        "AcquisitionAccumulateTrigger: encoding %d %s centre %d / max %d do not fit the encoded "
                        "matrix %d; offset %d clamped to %d",
                        space,
                        name,
                        center,
                        maximum,
                        n,
                        want,
                        got,
                    )
                return got

            oy = offset(ny, enc.ky_center, enc.ky_max, "ky")
            oz = offset(nz, enc.kz_center, enc.kz_max, "kz")
            self._encodings[space] = (enc, oy, oz)
        return self._encodings[space]

    def _snapshot_count(self, space: int) -> int:
        """Distinct lines at which a buffer of encoding ``space`` is snapshot (0: never)."""
        if space not in self._snapshot_at:
            at = 0
            if self.params.early_lines > 0:
                try:
                    lim = self.header.encoding[space].encodingLimits

                    def lines(name: str) -> int:
                        lm = getattr(lim, name, None)
                        if lm is None or lm.maximum is None:
                            return 1
                        return int(lm.maximum) - int(lm.minimum or 0) + 1

                    averages = lines("average") if not self.params.separate_averages else 1
                    expected = lines("kspace_encoding_step_1") * lines("kspace_encoding_step_2")
                    if averages == 1:
                        at = max(expected - self.params.early_lines, 0)
                except (AttributeError, IndexError, TypeError):
                    at = 0
            self._snapshot_at[space] = at
        return self._snapshot_at[space]

    def _snapshot(self, p: _Pending) -> EarlySnapshot:
        grid = p.image
        data, sampled = grid.average()
        snap = EarlySnapshot(p.buffer(data, sampled, grid, ismrmrd.AcquisitionHeader.from_buffer_copy(p.header)), next(_SNAPSHOT_TOKENS))
        grid.token = snap.token
        if data is grid.sums:
            grid.lent = snap
        else:
            snap.release()
        return snap

    # -- accumulation ---------------------------------------------------------------
    def _line(self, acq: ismrmrd.Acquisition) -> tuple[np.ndarray, int]:
        n = acq.number_of_samples
        data = acq.data[:, acq.discard_pre : n - acq.discard_post]
        center = acq.center_sample - acq.discard_pre
        if self.params.flip_reversed_lines and acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
            data = data[:, ::-1]
        return data, center

    def _put(
        self, grid: _Grid | None, data: np.ndarray, center: int, z: int, y: int, nz: int, ny: int, acq, domain: str
    ) -> _Grid:
        if grid is None:
            grid = _Grid(
                sums=np.zeros((data.shape[0], nz, ny, data.shape[1]), np.complex64),
                counts=np.zeros((nz, ny), np.int32),
                center_sample=center,
                domain=domain,
            )
        else:
            data = _to_domain(data, domain, grid.domain)
        coils, _, _, nx = grid.sums.shape
        if data.shape != (coils, nx) or center != grid.center_sample:
            raise ValueError(
                f"AcquisitionAccumulateTrigger: line {acq.scan_counter} has (coils, samples) {data.shape} and centre "
                f"{center}; its buffer holds {(coils, nx)} with centre {grid.center_sample}"
            )
        grid.write(z, y, data)
        return grid

    def _early_reference(self, p: _Pending) -> EarlyReference:
        p.reference_sent = True
        ref, sampled = p.reference.average()
        ref = ref.copy() if ref is p.reference.sums else ref
        return EarlyReference(
            reference=_to_domain(ref, p.reference.domain, p.image.domain),
            reference_sampled=sampled,
            index=p.index,
            encoding=p.encoding,
            data_shape=p.image.sums.shape,
            domain=p.image.domain,
        )

    def _add(self, acq: ismrmrd.Acquisition, trace: Trace) -> list[EarlySnapshot | EarlyReference]:
        """File one line; return the early messages (:class:`EarlyReference`, :class:`EarlySnapshot`)
        its buffer is ready to send after it."""
        flags = acq.flags
        if flags & NON_IMAGING_MASK:
            return []
        to_ref = bool(flags & (_CAL | _CAL_AND_IMAGING))
        to_image = not (flags & _CAL) or bool(flags & _CAL_AND_IMAGING)
        space = acq.encoding_space_ref
        enc, oy, oz = self._encoding(space)
        ny, nz = enc.encoded_matrix[1], max(enc.encoded_matrix[2], 1)
        i = acq.idx
        y, z = i.kspace_encode_step_1 + oy, i.kspace_encode_step_2 + oz
        if not (0 <= y < ny and 0 <= z < nz):
            raise ValueError(
                f"AcquisitionAccumulateTrigger: line {acq.scan_counter} (ky {i.kspace_encode_step_1}, kz "
                f"{i.kspace_encode_step_2}) lands at ({y}, {z}), outside the encoded grid ky<{ny}, kz<{nz}"
            )
        index = AcquisitionIndex(i.slice, i.contrast, i.phase, i.repetition, i.set, i.average if self.params.separate_averages else 0)
        key = (space, index)
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending(space, index, enc)
        data, center = self._line(acq)
        domain = domain_of(acq)
        if to_image:
            p.image = self._put(p.image, data, center, z, y, nz, ny, acq, domain)
            distance = abs(y - ny // 2) + abs(z - nz // 2)
            if distance < p.header_distance:
                p.header_distance = distance
                p.header = copy_header(acq)
        if to_ref:
            p.reference = self._put(p.reference, data, center, z, y, nz, ny, acq, domain)
        p.traces.append(trace)
        early: list[EarlySnapshot | EarlyReference] = []
        if (
            self.params.early_reference
            and not to_ref
            and p.reference is not None
            and not p.reference_sent
            and not p.reference.inside(z, y)
        ):
            early.append(self._early_reference(p))
        if to_image and p.image.token is None and p.image.distinct == self._snapshot_count(space) > 0:
            early.append(self._snapshot(p))
        return early

    # -- emission -------------------------------------------------------------------
    def _emit(self, keys: list[tuple[int, AcquisitionIndex]]) -> Iterator[Output]:
        ready = sorted(k for k in keys if self._pending[k].image is not None)
        if ready:
            self.trigger_count += 1
        for key in ready:
            p = self._pending.pop(key)
            grid = p.image
            grid.settle()
            data, sampled = grid.average()
            buf = p.buffer(data, sampled, grid, p.header)
            if p.reference is not None:
                p.reference.settle()
                ref, buf.reference_sampled = p.reference.average()
                buf.reference = _to_domain(ref, p.reference.domain, grid.domain)
            if grid.token is not None:
                buf.since_snapshot = LinesSince(grid.token, tuple(grid.changed), grid.resampled)
            yield buf, Trace.merge_all(p.traces)

    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return
        for early in self._add(item, trace):
            yield early, trace
        if item.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            yield from self._emit(list(self._pending))
        elif self._trigger_flag is not None and item.is_flag_set(self._trigger_flag):
            if self.params.trigger == "measurement":
                keys = list(self._pending)
            else:
                value = getattr(item.idx, self.params.trigger)
                keys = [k for k in self._pending if getattr(k[1], self.params.trigger) == value]
            yield from self._emit(keys)

    def close(self) -> Iterator[Output]:
        yield from self._emit(list(self._pending))
        if self._pending:
            self.log.warning(
                "AcquisitionAccumulateTrigger: %d buffer(s) with calibration lines only dropped at close",
                len(self._pending),
            )
            self._pending.clear()
