"""Accumulate readouts into k-space buffers and emit them on trigger flags.

Source: Gadgetron ``gadgets/mri_core/AcquisitionAccumulateTriggerGadget`` (accumulate until
a trigger, noise dropped) and ``BucketToBufferGadget`` (one buffer per slice / contrast /
phase / repetition / set on the encoded grid, calibration lines into a separate reference
buffer). Triggering here follows the ISMRMRD LAST_IN_* flags rather than Gadgetron's
"counter changed" rule, so a buffer leaves as soon as its last line is in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK, copy_header, readout_placement
from gadgets.fft_recon import centred_fft, centred_ifft
from inline.buffers import HYBRID, KSPACE, AcquisitionIndex, EncodingInfo, ReconBuffer, domain_of
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


@dataclass
class _Grid:
    """Sums and counts of the lines of one part (image or reference) of a buffer."""

    sums: np.ndarray  # (coils, kz, ky, kx) complex64
    counts: np.ndarray  # (kz, ky) int32
    center_sample: int
    domain: str = KSPACE  # of the first line; later lines are brought to it

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

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    accepts_hybrid: ClassVar[bool] = True

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._pending: dict[tuple[int, AcquisitionIndex], _Pending] = {}
        self._encodings: dict[int, tuple[EncodingInfo, int, int]] = {}
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
        grid.sums[:, z, y, :] += data
        grid.counts[z, y] += 1
        return grid

    def _add(self, acq: ismrmrd.Acquisition, trace: Trace) -> None:
        flags = acq.flags
        if flags & NON_IMAGING_MASK:
            return
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

    # -- emission -------------------------------------------------------------------
    def _emit(self, keys: list[tuple[int, AcquisitionIndex]]) -> Iterator[Output]:
        ready = sorted(k for k in keys if self._pending[k].image is not None)
        if ready:
            self.trigger_count += 1
        for key in ready:
            p = self._pending.pop(key)
            data, sampled = p.image.average()
            nx = data.shape[-1]
            n_full, _ = readout_placement(nx, p.image.center_sample)
            head = p.header
            head.number_of_samples = nx
            head.center_sample = max(p.image.center_sample, 0)
            head.discard_pre = head.discard_post = 0
            ref, ref_sampled = p.reference.average() if p.reference is not None else (None, None)
            if ref is not None:
                ref = _to_domain(ref, p.reference.domain, p.image.domain)
            buf = ReconBuffer(
                data=data,
                sampled=sampled,
                index=p.index,
                encoding=p.encoding,
                header=head,
                readout_fov_mm=p.encoding.encoded_fov_mm[0] * n_full / p.encoding.encoded_matrix[0],
                reference=ref,
                reference_sampled=ref_sampled,
                domain=p.image.domain,
            )
            yield buf, Trace.merge_all(p.traces)

    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return
        self._add(item, trace)
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
