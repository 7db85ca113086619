"""Inline motion: rigid estimation per frame, motion-corrected averaging, shot-wise k-space detection.

* :class:`MotionEstimate` registers each frame (repetition, cardiac phase, average) of a
  slice or slab to the series' first frame, writes ``MotionTranslation_mm`` /
  ``MotionRotation_deg`` into the image meta and raises a ``motion`` alert when the patient
  moved more than a threshold between two frames.
* :class:`MocoAverage` resamples each frame onto the reference with that estimate and
  averages (Gadgetron's MOCO averaging chains, e.g. ``CmrRealTimeLGEPSIRMocoAve``: rigid
  here, not their non-rigid demons); uncorrected and corrected frames and averages leave
  tagged by role, and :class:`ImageSeries` gives each role its image series index.
* :class:`ShotMotionQC` (a tap on the readouts) finds the shot in which the patient moved,
  from the consistency of each shot with the reference repetition (:mod:`inline.motion.kspace`).

Algorithms and sources: :mod:`inline.motion.rigid` (SimpleITK registration, B-spline
resampling), :mod:`inline.motion.kspace`. Overview: ``docs/motion.md``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from gadgets._common import NON_IMAGING_MASK
from inline.backend import get_array_module, to_host
from inline.buffers import ImageBuffer
from inline.gadget import AccumulatingGadget, GadgetParams, Output
from inline.motion.kspace import ShotChange, find_change, line_stats, shot_scores
from inline.motion.rigid import Registration, RigidMotion, register_rigid, resample_rigid
from inline.qc.alert import Alert, AlertCode, AlertFactory, Severity, slice_label
from inline.registry import register
from inline.trace import Trace

FrameCounter = Literal["repetition", "phase", "average", "set", "contrast"]

#: Image meta key naming the role of an image in a motion-corrected chain (read by :class:`ImageSeries`).
ROLE_META_KEY = "InlineSeriesRole"
#: Roles: frames as acquired, frames resampled onto the reference, their averages.
ROLES = ("frames", "moco_frames", "average", "moco_average")

_CAL = 1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1)
_NAV = 1 << (ismrmrd.ACQ_IS_NAVIGATION_DATA - 1)
_NOISE = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)


def _frame_and_group(index, counter: str) -> tuple[int, tuple]:
    """The frame number of an :class:`~inline.buffers.AcquisitionIndex` and the rest of it (the group)."""
    fields = index._fields
    if counter not in fields:
        raise ValueError(f"frame counter {counter!r} is not part of the buffer index {fields}")
    frame = int(getattr(index, counter))
    group = tuple((f, int(getattr(index, f))) for f in fields if f != counter)
    return frame, group


def _counter_limit(header, counter: str) -> int | None:
    """Number of frames the header announces for ``counter`` (encoding limits maximum + 1), or None."""
    try:
        lim = getattr(header.encoding[0].encodingLimits, counter)
    except (AttributeError, IndexError, TypeError):
        return None
    if lim is None or lim.maximum is None:
        return None
    return int(lim.maximum) + 1


def image_spacing_m(item: ImageBuffer) -> tuple[float, float, float]:
    """``(dz, dy, dx)`` pixel spacing [m] of an :class:`ImageBuffer` from its FOV and matrix."""
    _, nz, ny, nx = item.data.shape
    fx, fy, fz = item.field_of_view_mm
    return (fz / nz * 1e-3, fy / ny * 1e-3, fx / nx * 1e-3)


def _magnitude(data) -> np.ndarray:
    """``(z, y, x)`` float32 host magnitude of ``(channels, z, y, x)`` (RSS over channels)."""
    xp = get_array_module(data)
    mag = xp.sqrt(xp.sum(xp.abs(data) ** 2, axis=0)) if data.shape[0] > 1 else xp.abs(data[0])
    return to_host(mag).astype(np.float32, copy=False)


def _slice_position_m(item: ImageBuffer) -> float:
    """Position of an image's slice along its slice direction [m] (ISMRMRD ``position . slice_dir``)."""
    h = item.header
    if h is None:
        return float(item.index.slice)
    return float(np.dot(np.asarray(h.position[:], dtype=np.float64), np.asarray(h.slice_dir[:], dtype=np.float64))) * 1e-3


class _SliceStacks:
    """Collects the slices of one frame until all ``slices`` are in (MotionEstimate / MocoAverage ``stack_slices``)."""

    def __init__(self, slices: int):
        self.slices = slices
        self._open: dict[tuple, list[tuple[ImageBuffer, Trace]]] = {}

    def add(self, key: tuple, item: ImageBuffer, trace: Trace) -> list[tuple[ImageBuffer, Trace]] | None:
        """Add a slice; the frame's slices in arrival order once it is complete, else None."""
        items = self._open.setdefault(key, [])
        items.append((item, trace))
        if len({it.index.slice for it, _ in items}) < self.slices:
            return None
        return self._open.pop(key)

    def pending(self) -> list[list[tuple[ImageBuffer, Trace]]]:
        """Incomplete frames (end of stream), oldest first."""
        out = list(self._open.values())
        self._open.clear()
        return out


def stack_volume(items: list[ImageBuffer]):
    """Slices ``(channels, 1, y, x)`` stacked into ``(channels, z, y, x)`` in slice-position order.

    Returns:
        ``(volume, order, spacing_m)``: the stack (same device as the slices), the index of each
        stacked slice in ``items``, and ``(dz, dy, dx)`` [m] with ``dz`` the median distance between
        neighbouring slice positions (slice thickness + gap).

    Raises:
        ValueError: slices of different shapes, or slices that are not single planes.
    """
    if any(it.data.ndim != 4 or it.data.shape[1] != 1 or it.data.shape != items[0].data.shape for it in items):
        raise ValueError(f"stack_volume: need single-plane slices of one shape, got {[it.data.shape for it in items]}")
    pos = np.array([_slice_position_m(it) for it in items])
    order = list(np.argsort(pos, kind="stable"))
    xp = get_array_module(items[0].data)
    volume = xp.concatenate([items[i].data for i in order], axis=1)
    _, dy, dx = image_spacing_m(items[0])
    gaps = np.abs(np.diff(pos[order]))
    dz = float(np.median(gaps)) if gaps.size and np.median(gaps) > 0 else image_spacing_m(items[0])[0]
    return volume, order, (dz, dy, dx)


@dataclass
class _Group:
    """Motion state of one series (slice, contrast, ... without the frame counter)."""

    reference: np.ndarray  # (z, y, x) float32 magnitude of the reference frame
    reference_frame: int
    spacing_m: tuple[float, float, float]
    previous: RigidMotion = field(default_factory=RigidMotion)
    previous_frame: int = 0


@register
class MotionEstimate(AccumulatingGadget):
    """Rigid motion of every frame against the first frame of its series, in the image meta.

    Per :class:`ImageBuffer` (``(channels, z, y, x)``; channels are combined by RSS for the
    estimate): the series is the buffer index without ``frame_counter`` (e.g. one slice of
    a multi-slice scan); its first frame to arrive is the reference. Each later frame is
    registered to it with :func:`inline.motion.rigid.register_rigid` (2D, ``tx ty rz``, per
    slice when ``z == 1``; 3D, six parameters, for slabs), on the host. The image passes on
    with meta

    * ``MotionTranslation_mm``: ``[x, y, z]`` [mm] along read, phase, slice direction;
    * ``MotionRotation_deg``: ``[rx, ry, rz]`` [deg] about them (``R = Rz Ry Rx``, ``rz`` from
      read towards phase), the pose relative to the reference (zeros for the reference);
    * ``MotionReference``: the reference frame number, ``MotionFrameCounter`` the counter
      (and ``MotionStackSlices``, the slices registered together, with ``stack_slices``).

    When the displacement between this frame and the previous one of the series (the
    largest displacement of a point within ``radius_mm`` of the centre,
    :meth:`RigidMotion.displacement_m`) reaches ``alert_threshold_mm``, a ``motion`` alert
    follows the image ("Patient moved 2.3 mm between repetitions 4 and 5"), once per frame.

    With ``stack_slices`` the slices of a frame are held until the last one arrives, stacked
    in slice-position order (spacing: the median distance between neighbouring slices) and
    registered as one volume; every slice of the frame gets the stack's pose (about the
    stack's centre pixel) and the frame's images leave together, in arrival order.

    The registration runs in the data path: its time (bench/moco_latency.py) adds to the
    image latency. Estimates are kept in :attr:`estimates` for inspection.

    Raises:
        ValueError: at construction, a ``frame_counter`` the buffer index does not have;
            per image, a frame whose shape differs from its reference's.
    """

    class Params(GadgetParams):
        frame_counter: FrameCounter = Field(
            "repetition", description="Index counter that numbers the frames of a series (repetition: dynamics, "
            "repeated measurements; phase: cardiac phases / time frames)."
        )
        dimensions: Literal["auto", "2d", "3d"] = Field(
            "auto", description="2d: tx, ty, rz per plane; 3d: six parameters; auto: 3d when an image has z > 1."
        )
        alert_threshold_mm: float = Field(
            1.0, gt=0, description="Displacement between consecutive frames that raises a motion alert [mm] "
            "(estimation error at SNR 30: < 0.05 mm)."
        )
        radius_mm: float = Field(
            50.0, gt=0, description="Radius of the sphere (head) whose largest point displacement is reported [mm] "
            "(Power's framewise displacement uses 50 mm)."
        )
        normalise_sigma_px: float = Field(
            1.5, ge=0, description="Local intensity normalisation before registration [pixels] (stationary coil "
            "shading; 0: off)."
        )
        iterations: int = Field(200, ge=1, description="Optimiser iterations per pyramid level.")
        threads: int = Field(1, ge=1, description="ITK threads per registration (1 is fastest beside the rest of "
                             "the chain on a few cores; bench/moco_latency.py).")
        sampling: float | None = Field(
            None, gt=0, le=1, description="Fraction of the pixels the metric samples (regular grid); None: all in "
            "2D, half in 3D. 0.5 in 2D: -30 % time for fMRI-size slices, errors still < 0.1 deg."
        )
        stack_slices: bool = Field(
            False, description="Register the slices of a frame together, as one volume (3D, six parameters, about "
            "the stack's centre; the fMRI way): a third of the time of slice by slice for 36 slices of 64^2, "
            "through-plane motion measured, but each slice waits for the last of its frame. Needs the header's "
            "slice limit."
        )

    accepts: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer, Alert)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        from inline.buffers import AcquisitionIndex

        if self.params.frame_counter not in AcquisitionIndex._fields:
            raise ValueError(
                f"MotionEstimate: frame_counter {self.params.frame_counter!r} is not a buffer index field "
                f"{AcquisitionIndex._fields}"
            )
        self.alerts = AlertFactory(context)
        self._groups: dict[tuple, _Group] = {}
        self._alerted: set[int] = set()  # frames alerted (once per frame, whichever slice shows it)
        self._stacks: _SliceStacks | None = None
        if self.params.stack_slices:
            slices = _counter_limit(self.header, "slice")
            if slices is None:
                raise ValueError("MotionEstimate: stack_slices needs the header's slice encoding limit")
            self._stacks = _SliceStacks(slices)
        #: (group, frame) -> Registration of every registered frame
        self.estimates: dict[tuple[tuple, int], Registration] = {}
        #: registration time of each registered frame [s], in arrival order
        self.latencies_s: list[float] = []

    def process(self, item: ImageBuffer, trace: Trace) -> Iterator[Output]:
        if item.data.ndim != 4:
            raise ValueError(f"MotionEstimate: image data must be (channels, z, y, x), got {item.data.shape}")
        frame, group = _frame_and_group(item.index, self.params.frame_counter)
        if self._stacks is None:
            motion, st = self._estimate(group, frame, _magnitude(item.data), image_spacing_m(item))
            yield from self._emit([(item, trace)], group, st, frame, motion)
            return
        group = tuple(kv for kv in group if kv[0] != "slice")
        items = self._stacks.add((group, frame), item, trace)
        if items is not None:
            yield from self._stacked(items, group, frame)

    def _stacked(self, items: list[tuple[ImageBuffer, Trace]], group: tuple, frame: int) -> Iterator[Output]:
        volume, _, spacing = stack_volume([it for it, _ in items])
        motion, st = self._estimate(group, frame, _magnitude(volume), spacing)
        yield from self._emit(items, group, st, frame, motion)

    def _estimate(self, group: tuple, frame: int, mag: np.ndarray, spacing) -> tuple[RigidMotion, _Group]:
        """Pose of ``mag`` ``(z, y, x)`` against its group's reference (which it becomes when first)."""
        counter = self.params.frame_counter
        st = self._groups.get(group)
        if st is None:
            st = self._groups[group] = _Group(mag, frame, spacing, RigidMotion(), frame)
            return RigidMotion(), st
        if mag.shape != st.reference.shape:
            raise ValueError(
                f"MotionEstimate: {counter} {frame} of {dict(group)} has shape {mag.shape}, its reference "
                f"{st.reference.shape}"
            )
        dims = {"auto": None, "2d": 2, "3d": 3}[self.params.dimensions]
        if self._stacks is not None:
            dims = 3 if mag.shape[0] > 1 else dims
        t0 = time.perf_counter()
        reg = register_rigid(
            st.reference, mag, st.spacing_m, dimensions=dims, iterations=self.params.iterations,
            normalise_sigma_px=self.params.normalise_sigma_px, threads=self.params.threads,
            sampling=self.params.sampling,
        )
        self.latencies_s.append(time.perf_counter() - t0)
        self.estimates[(group, frame)] = reg
        return reg.motion, st

    def _emit(self, items, group: tuple, st: _Group, frame: int, motion: RigidMotion) -> Iterator[Output]:
        for item, trace in items:
            item.meta.update(motion.meta())
            item.meta["MotionReference"] = str(st.reference_frame)
            item.meta["MotionFrameCounter"] = self.params.frame_counter
            if self._stacks is not None:
                item.meta["MotionStackSlices"] = str(len(items))
            yield item, trace
        if frame != st.reference_frame:
            item, trace = items[-1]
            yield from self._check(item, trace, st, frame, motion, sorted({int(it.index.slice) for it, _ in items}))
        st.previous, st.previous_frame = motion, frame

    def close(self) -> Iterator[Output]:
        if self._stacks is None:
            return
        for items in self._stacks.pending():
            self.log.warning("MotionEstimate: frame with %d of %d slices at the end of the stream; registered as is",
                             len(items), self._stacks.slices)
            frame, group = _frame_and_group(items[0][0].index, self.params.frame_counter)
            group = tuple(kv for kv in group if kv[0] != "slice")
            st = self._groups.get(group)
            if st is not None and st.reference.shape[0] != len(items):
                yield from self._emit(items, group, st, frame, RigidMotion())  # no like-for-like reference
                continue
            yield from self._stacked(items, group, frame)

    def _check(
        self, item: ImageBuffer, trace: Trace, st: _Group, frame: int, motion: RigidMotion, slices: list[int]
    ) -> Iterator[Output]:
        p = self.params
        moved_m = motion.displacement_m(st.previous, p.radius_mm * 1e-3)
        if moved_m * 1e3 < p.alert_threshold_mm or (frame in self._alerted):
            return
        self._alerted.add(frame)
        counter = p.frame_counter
        plural = {"repetition": "repetitions", "phase": "phases", "average": "averages", "set": "sets",
                  "contrast": "contrasts"}[counter]
        rel = motion.relative_to(st.previous)
        t, r = motion.translation_mm, motion.rotation_deg
        alert = self.alerts.make(
            AlertCode.MOTION, Severity.WARNING,
            f"Patient moved {moved_m * 1e3:.1f} mm between {plural} {st.previous_frame} and {frame} "
            f"(series {self.alerts.series}, {slice_label(slices)}; against {counter} {st.reference_frame}: translation "
            f"{t[0]:.1f} / {t[1]:.1f} / {t[2]:.1f} mm read / phase / slice, rotation {r[0]:.1f} / {r[1]:.1f} / "
            f"{r[2]:.1f} deg).",
            f"Ask the patient to keep still; check the {plural} from {frame} on (a MOCO series corrects rigid motion "
            f"between {plural}) and repeat the series if they are blurred.",
            revealed_ns=trace.last_arrival_ns, slices=slices,
            repetition=int(item.index.repetition), value=moved_m * 1e3, threshold=p.alert_threshold_mm, unit="mm",
            evidence={
                "source": "image_registration", "frame_counter": counter, "frames": [st.previous_frame, frame],
                "reference": st.reference_frame,
                "translation_mm": [round(float(v), 3) for v in t], "rotation_deg": [round(float(v), 3) for v in r],
                "step_translation_mm": [round(float(v), 3) for v in rel.translation_mm],
                "step_rotation_deg": [round(float(v), 3) for v in rel.rotation_deg],
                "radius_mm": p.radius_mm,
            },
        )
        yield alert, trace


@dataclass
class _Average:
    """Running sums of one series for :class:`MocoAverage`."""

    reference: ImageBuffer
    plain: object  # (channels, z, y, x) sum of the frames as acquired (host or device array)
    corrected: object  # (channels, z, y, x) sum of the frames resampled onto the reference
    frames: list[int] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)


@register
class MocoAverage(AccumulatingGadget):
    """Motion-corrected averaging: frames resampled onto the reference, then averaged.

    Place after :class:`MotionEstimate` (it reads ``MotionTranslation_mm`` /
    ``MotionRotation_deg`` from the meta) and before ImageFinish and :class:`ImageSeries`.
    Per :class:`ImageBuffer` ``(channels, z, y, x)`` (host or device; the resampling runs
    where the data are, :func:`inline.motion.rigid.resample_rigid`, cubic B-spline):

    * the frame passes on as acquired, tagged ``InlineSeriesRole=frames`` (``emit_frames``);
    * the frame resampled onto the reference, tagged ``moco_frames`` (``emit_corrected_frames``);
    * when the series has all its frames (``frames``, or the header's encoding limit of the
      counter + 1; otherwise at the end of the stream): the mean of the frames as acquired
      (``average``, ``emit_average``) and of the corrected frames (``moco_average``), with the
      reference frame's index and header and meta ``MocoFrames`` (the frames averaged).

    Complex data are averaged complex, magnitudes as magnitudes. With ``stack_slices`` the
    slices of a frame are held until the last one, stacked as :class:`MotionEstimate` stacks
    them, resampled as one volume (the pose is the stack's) and split again.

    Raises:
        ValueError: a frame without the motion meta, or with a shape unlike its series'.
    """

    class Params(GadgetParams):
        frame_counter: FrameCounter = Field("repetition", description="Counter that numbers the frames averaged.")
        frames: int | None = Field(
            None, ge=1, description="Frames per average; None: the header's encoding limit of the counter + 1 "
            "(or all frames at the end of the stream)."
        )
        emit_frames: bool = Field(True, description="Pass the frames on as acquired (role 'frames').")
        emit_corrected_frames: bool = Field(True, description="Emit each frame resampled onto the reference "
                                            "(role 'moco_frames').")
        emit_average: bool = Field(True, description="Emit the uncorrected average too (role 'average').")
        interpolation_order: int = Field(3, ge=0, le=5, description="Spline order of the resampling (3: cubic).")
        stack_slices: bool = Field(
            False, description="Resample the slices of a frame together, as one volume (after MotionEstimate with "
            "stack_slices): through-plane motion is corrected between slices. Needs the header's slice limit."
        )

    accepts: ClassVar[tuple[type, ...]] = (ImageBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ImageBuffer,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._expected = self.params.frames or _counter_limit(self.header, self.params.frame_counter)
        self._series: dict[tuple, _Average] = {}
        self._stacks: _SliceStacks | None = None
        if self.params.stack_slices:
            slices = _counter_limit(self.header, "slice")
            if slices is None:
                raise ValueError("MocoAverage: stack_slices needs the header's slice encoding limit")
            self._stacks = _SliceStacks(slices)

    @staticmethod
    def _tagged(item: ImageBuffer, data, role: str, step: str | None) -> ImageBuffer:
        meta = dict(item.meta)
        meta[ROLE_META_KEY] = role
        return ImageBuffer(
            data=data, index=item.index, header=item.header, field_of_view_mm=item.field_of_view_mm,
            history=[*item.history, step] if step else list(item.history), meta=meta,
        )

    def process(self, item: ImageBuffer, trace: Trace) -> Iterator[Output]:
        motion = self._motion(item)
        if self._stacks is None:
            corrected = resample_rigid(item.data, motion, image_spacing_m(item), order=self.params.interpolation_order)
            yield from self._add(item, corrected, trace)
            return
        frame, group = _frame_and_group(item.index, self.params.frame_counter)
        items = self._stacks.add((tuple(kv for kv in group if kv[0] != "slice"), frame), item, trace)
        if items is not None:
            yield from self._stacked(items)

    @staticmethod
    def _motion(item: ImageBuffer) -> RigidMotion:
        try:
            return RigidMotion.from_meta(item.meta)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"MocoAverage: image {item.index} has no motion estimate ({e}); put MotionEstimate before MocoAverage"
            ) from e

    def _stacked(self, items: list[tuple[ImageBuffer, Trace]]) -> Iterator[Output]:
        volume, order, spacing = stack_volume([it for it, _ in items])
        corrected = resample_rigid(volume, self._motion(items[0][0]), spacing, order=self.params.interpolation_order)
        for z, i in enumerate(order):
            item, trace = items[i]
            yield from self._add(item, corrected[:, z : z + 1], trace)

    def _add(self, item: ImageBuffer, corrected, trace: Trace) -> Iterator[Output]:
        frame, group = _frame_and_group(item.index, self.params.frame_counter)
        st = self._series.get(group)
        if st is None:
            xp = get_array_module(item.data)
            st = self._series[group] = _Average(item, xp.zeros_like(item.data), xp.zeros_like(corrected))
        if item.data.shape != st.reference.data.shape:
            raise ValueError(f"MocoAverage: frame {frame} has shape {item.data.shape}, its series "
                             f"{st.reference.data.shape}")
        st.plain += item.data
        st.corrected += corrected
        st.frames.append(frame)
        st.traces.append(trace)
        if self.params.emit_frames:
            yield self._tagged(item, item.data, "frames", None), trace
        if self.params.emit_corrected_frames:
            yield self._tagged(item, corrected, "moco_frames", "MOCO"), trace
        if self._expected is not None and len(st.frames) >= self._expected:
            yield from self._finish(group)

    def _finish(self, group: tuple) -> Iterator[Output]:
        st = self._series.pop(group)
        n = len(st.frames)
        ref = st.reference
        trace = Trace.merge_all(st.traces)
        outputs = [("moco_average", st.corrected, "MOCO_AVERAGE")]
        if self.params.emit_average:
            outputs.insert(0, ("average", st.plain, "AVERAGE"))
        for role, total, step in outputs:
            out = self._tagged(ref, (total / np.float32(n)).astype(ref.data.dtype, copy=False), role, step)
            out.meta.update(RigidMotion().meta())
            out.meta["MocoFrames"] = [str(f) for f in st.frames]
            yield out, trace

    def close(self) -> Iterator[Output]:
        if self._stacks is not None:
            for items in self._stacks.pending():
                yield from self._stacked(items)
        for group in list(self._series):
            yield from self._finish(group)


@register
class ImageSeries(AccumulatingGadget):
    """Give each image role its own series: ``image_series_index``, ``image_index`` and description.

    Place after ImageFinish. An ``ismrmrd.Image`` whose meta has ``InlineSeriesRole`` (set by
    :class:`MocoAverage`) gets the role's ``image_series_index`` from ``series_index``,
    ``image_index`` 1, 2, ... within that series, and ``SeriesDescription`` + the role's
    suffix; images without a role, or with a role not listed, pass unchanged. A reader can
    so compare the uncorrected and the motion-corrected series side by side.
    """

    class Params(GadgetParams):
        series_index: dict[str, int] = Field(
            {"frames": 1, "moco_frames": 2, "average": 3, "moco_average": 4},
            description="image_series_index per role (frames, moco_frames, average, moco_average).",
        )
        description_suffix: dict[str, str] = Field(
            {"frames": "", "moco_frames": " MOCO", "average": " AVE", "moco_average": " MOCO AVE"},
            description="Appended to SeriesDescription per role.",
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Image,)
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Image,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._next: dict[int, int] = {}

    def process(self, item: ismrmrd.Image, trace: Trace) -> Iterator[Output]:
        meta = item.meta
        role = meta.get(ROLE_META_KEY) if meta is not None else None
        if isinstance(role, list):
            role = role[0] if role else None
        index = self.params.series_index.get(role) if role else None
        if index is not None:
            item.image_series_index = index
            n = self._next.get(index, 1)
            item.image_index = n
            self._next[index] = n + 1
            desc = meta.get("SeriesDescription", "")
            meta["SeriesDescription"] = f"{desc if isinstance(desc, str) else ' '.join(desc)}" + \
                self.params.description_suffix.get(role, "")
            item.meta = meta
        yield item, trace


# -- k-space: when did the patient move ------------------------------------------------


@dataclass
class _Shot:
    """One shot of a compared frame: where and when, and its summed line statistics."""

    order: int  # scan_counter of its first readout
    buffer: tuple  # (slice, contrast, phase, set, other counter)
    shot: int
    time_stamp: int
    ky: list[int] = field(default_factory=list)
    kz: list[int] = field(default_factory=list)
    band: float = 0.0
    samples: int = 0
    reference_band: float = 0.0
    lines: list[tuple[float, int, float, float]] = field(default_factory=list)  # (band, samples, edge, ref energy)


def noise_power(lines: list[tuple[float, int, float, float]], by: Literal["reference", "change"] = "reference") -> float:
    """Noise power per sample of the readout differences of a frame, from its weakest readouts.

    The ends of a readout hold little signal, but a moved object with sharp edges (CSF in a
    T2-weighted image) raises them too; when most readouts have moved, the median over all
    would be high. So: the median end power over the quarter of the readouts with the least
    reference signal (the k-space periphery, where motion changes little). The choice rests
    on the reference alone, so it does not bias the noise of the differences (choosing the
    least changed readouts would: 3 % low on simulated TSE scans). Navigators all share one
    reference line: ``by="change"`` takes the least changed quarter instead (the 3 % are
    small against a single line's spread).
    """
    arr = np.asarray(lines, dtype=np.float64)  # (readouts, 4): band, samples, edge, reference energy
    per_sample = arr[:, 3 if by == "reference" else 0] / np.maximum(arr[:, 1], 1.0)
    quiet = per_sample <= np.quantile(per_sample, 0.25)
    return float(np.median(arr[quiet, 2]))


@dataclass(frozen=True)
class ShotMotionResult:
    """What :class:`ShotMotionQC` found for one frame.

    Attributes:
        frame: the frame (e.g. repetition) compared with the reference frame.
        shots: the shots in acquisition order (each with buffer, shot index, ky, time stamp).
        ratio: ``(shots,)`` inconsistency ``r_s`` (1: noise only).
        tau: ``(shots,)`` thresholds on ``log r_s``.
        change: the run found (:class:`~inline.motion.kspace.ShotChange`).
    """

    frame: int
    shots: list[_Shot]
    ratio: np.ndarray
    tau: np.ndarray
    change: ShotChange

    @property
    def onset(self) -> _Shot | None:
        """The first shot after the patient moved (a localised change), else None."""
        m = self.change.moment
        return self.shots[m] if m is not None else None


@register
class ShotMotionQC(AccumulatingGadget):
    """QC tap on readouts: in which shot did the patient move (k-space consistency).

    Two sources, each searched for the run of inconsistent shots
    (:func:`inline.motion.kspace.find_change`) when a frame ends (its LAST_IN_<counter> flag,
    the end of the measurement or of the stream):

    * the reference frame: readouts of ``reference_frame`` of ``frame_counter`` (e.g.
      repetition 0) are kept per (slice, contrast, phase, set, other counter, kz, ky); each
      readout of a later frame is compared with its reference line as it arrives
      (:func:`inline.motion.kspace.line_stats`, all channels); readouts are grouped in shots
      (``shot_length`` consecutive readouts of one buffer, by default the header's
      ``echoTrainLength``), and the shots of all slices are taken in acquisition order.
      Needs a second frame; results in :attr:`results`.
    * navigators (``ACQ_IS_NAVIGATION_DATA`` readouts, e.g. one per shot): each against the
      first navigator of its series, so motion within any frame, the first included, is
      found; a navigator belongs to the shot it precedes. Results in :attr:`navigator_results`.

    A run that starts within the frame where the shots before it would have shown the
    motion (or ends where the shots after it would) raises a ``motion`` alert naming the
    shot, ky, slice and how far into the frame; a frame inconsistent from its start (motion
    between frames, :class:`MotionEstimate`'s business) raises none.

    Calibration-only and noise readouts are not compared. Memory: the reference frame's
    readouts (complex64), e.g. 84 MB for 32 channels x 512 samples x 256 lines x 5 slices.
    """

    class Params(GadgetParams):
        frame_counter: Literal["repetition", "average", "phase", "set", "contrast"] = Field(
            "repetition", description="Readout counter that numbers the frames compared with the reference frame."
        )
        reference_frame: int = Field(0, ge=0, description="Frame the others are compared with.")
        shot_length: int | None = Field(
            None, ge=1, description="Readouts per shot (echo train); None: the header's echoTrainLength, else 1."
        )
        edge_fraction: float = Field(
            0.0625, gt=0, lt=0.25, description="Fraction of the readout at each end that measures the noise."
        )
        k_sigma: float = Field(4.0, gt=0, description="Per-shot threshold on log r in noise spreads.")
        skip_single_frame: bool = Field(
            True,
            description="Keep no reference readouts when the header's encoding limits say the frame counter has no "
            "frame after the reference (a single-repetition scan: nothing to compare; saves the reference's memory "
            "and copies in the standard chains). Navigators are still compared.",
        )
        min_evidence: float = Field(
            3.0, gt=0, description="Smallest run sum (log inconsistency above threshold) reported as motion; "
            "clean repetitions (simulated, the real 2-repetition phantom) stay below 0.5."
        )

    accepts: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition,)
    tap: ClassVar[bool] = True
    emits: ClassVar[tuple[type, ...]] = (ismrmrd.Acquisition, Alert)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.alerts = AlertFactory(context)
        p = self.params
        enc = self.header.encoding[0] if getattr(self.header, "encoding", None) else None
        self._etl = int(p.shot_length or getattr(enc, "echoTrainLength", None) or 1)
        lim = getattr(getattr(enc, "encodingLimits", None), p.frame_counter, None)
        maximum = getattr(lim, "maximum", None)
        #: False: the header promises no frame after the reference, imaging readouts are not kept
        self.compares_frames = not (p.skip_single_frame and maximum is not None and int(maximum) <= p.reference_frame)
        self._other = "average" if p.frame_counter != "average" else "repetition"
        self._last_flag = 1 << (getattr(ismrmrd, f"ACQ_LAST_IN_{p.frame_counter.upper()}") - 1)
        self._end_flag = 1 << (ismrmrd.ACQ_LAST_IN_MEASUREMENT - 1)
        self._reference: dict[tuple, np.ndarray] = {}
        self._counts: dict[tuple, int] = {}
        self._shots: dict[int, dict[tuple, _Shot]] = {}
        self._lines: dict[int, int] = {}
        self._last_trace: dict[int, Trace] = {}
        self._nav_reference: dict[tuple, np.ndarray] = {}
        self._navs: dict[int, dict[tuple, _Shot]] = {}
        #: frame -> :class:`ShotMotionResult` against the reference frame
        self.results: dict[int, ShotMotionResult] = {}
        #: frame -> :class:`ShotMotionResult` of its navigators against the series' first navigator
        self.navigator_results: dict[int, ShotMotionResult] = {}

    def process(self, item: ismrmrd.Acquisition, trace: Trace) -> Iterator[Output]:
        yield item, trace
        flags = int(item.flags)
        if flags & _NAV:
            self._add_navigator(item, trace)
        elif not flags & (NON_IMAGING_MASK | _CAL):
            self._add(item, trace)
        if flags & self._end_flag:
            for frame in sorted(set(self._shots) | set(self._navs)):
                yield from self._evaluate(frame)
        elif flags & self._last_flag:
            frame = int(getattr(item.idx, self.params.frame_counter))
            yield from self._evaluate(frame)

    def _add(self, acq: ismrmrd.Acquisition, trace: Trace) -> None:
        i = acq.idx
        frame = int(getattr(i, self.params.frame_counter))
        buffer = tuple(int(getattr(i, f)) for f in ("slice", "contrast", "phase", "set")) + (
            int(getattr(i, self._other)),
        )
        if self.params.frame_counter in ("phase", "set", "contrast"):
            buffer = buffer + (int(i.repetition), int(i.average))
        line = buffer + (int(i.kspace_encode_step_2), int(i.kspace_encode_step_1))
        n = self._counts.get((frame, buffer), 0)
        self._counts[(frame, buffer)] = n + 1  # also numbers the navigators' shots
        if not self.compares_frames:
            return
        if frame == self.params.reference_frame:
            self._reference[line] = np.array(acq.data, dtype=np.complex64)
            return
        ref = self._reference.get(line)
        if ref is None or ref.shape != acq.data.shape or frame in self.results:
            return
        band, samples, edge = line_stats(ref, acq.data, self.params.edge_fraction)
        e = max(1, int(round(ref.shape[1] * self.params.edge_fraction)))
        core = ref[:, e : ref.shape[1] - e]
        shots = self._shots.setdefault(frame, {})
        key = (buffer, n // self._etl)
        sh = shots.get(key)
        if sh is None:
            sh = shots[key] = _Shot(int(acq.scan_counter), buffer, n // self._etl, int(acq.acquisition_time_stamp))
        sh.ky.append(int(i.kspace_encode_step_1))
        sh.kz.append(int(i.kspace_encode_step_2))
        sh.band += band
        sh.samples += samples
        energy = float(np.vdot(core, core).real)
        sh.reference_band += energy
        sh.lines.append((band, samples, edge, energy))
        self._last_trace[frame] = trace

    def _add_navigator(self, acq: ismrmrd.Acquisition, trace: Trace) -> None:
        """A navigator readout against the first navigator of its series (same slice, contrast, phase, set)."""
        i = acq.idx
        frame = int(getattr(i, self.params.frame_counter))
        series = tuple(int(getattr(i, f)) for f in ("slice", "contrast", "phase", "set"))
        ref = self._nav_reference.get(series)
        if ref is None or ref.shape != acq.data.shape:
            self._nav_reference[series] = np.array(acq.data, dtype=np.complex64)
            return
        band, samples, edge = line_stats(ref, acq.data, self.params.edge_fraction)
        e = max(1, int(round(ref.shape[1] * self.params.edge_fraction)))
        core = ref[:, e : ref.shape[1] - e]
        navs = self._navs.setdefault(frame, {})
        # the shot a navigator precedes: the number of imaging readouts of its buffer so far / shot length
        buffer = series + (int(getattr(i, self._other)),)
        n = self._counts.get((frame, buffer), 0)
        navs[(buffer, len(navs))] = _Shot(
            int(acq.scan_counter), buffer, -(-n // self._etl), int(acq.acquisition_time_stamp),
            [int(i.kspace_encode_step_1)], [int(i.kspace_encode_step_2)], band, samples,
            float(np.vdot(core, core).real), [(band, samples, edge, float(np.vdot(core, core).real))],
        )
        self._last_trace[frame] = trace

    def _evaluate(self, frame: int) -> Iterator[Output]:
        yield from self._evaluate_navigators(frame)
        shots = self._shots.pop(frame, None)
        if not shots or frame in self.results:
            return
        order = sorted(shots.values(), key=lambda s: s.order)
        result = self._score(frame, order, "reference")
        self.results[frame] = result
        yield from self._report(frame, result, f"k-space is inconsistent with {self.params.frame_counter} "
                                f"{self.params.reference_frame}", "kspace_shot_consistency")

    def _evaluate_navigators(self, frame: int) -> Iterator[Output]:
        navs = self._navs.pop(frame, None)
        if not navs or frame in self.navigator_results:
            return
        order = sorted(navs.values(), key=lambda s: s.order)
        result = self._score(frame, order, "change")
        self.navigator_results[frame] = result
        yield from self._report(frame, result, "the navigators differ from the first navigator", "navigator")

    def _score(self, frame: int, order: list[_Shot], by: Literal["reference", "change"]) -> ShotMotionResult:
        noise = noise_power([ln for s in order for ln in s.lines], by)
        band = np.array([s.band for s in order])
        samples = np.array([s.samples for s in order])
        ratio = shot_scores(band, samples, noise)
        # the reference's own noise adds half the difference's noise power: not signal
        signal = np.maximum(shot_scores(np.array([s.reference_band for s in order]), samples, noise) - 0.5, 0.0)
        p = self.params
        change, tau = find_change(ratio, samples, signal, k_sigma=p.k_sigma, min_evidence=p.min_evidence)
        return ShotMotionResult(frame, order, ratio, tau, change)

    def _report(self, frame: int, result: ShotMotionResult, finding: str, source: str) -> Iterator[Output]:
        onset = result.onset
        if onset is None:
            return
        p = self.params
        change, order = result.change, result.shots
        trace = self._last_trace.get(frame) or Trace.arrived()
        counter = p.frame_counter
        s = onset.buffer[0]
        into = change.moment / len(order)
        per_buffer = max(o.shot for o in order if o.buffer == onset.buffer) + 1
        where = f"ky {onset.ky[0]}" + (f", kz {onset.kz[0]}" if any(o.kz[0] for o in order) else "")
        what = "navigator" if source == "navigator" else "shot"
        yield self.alerts.make(
            AlertCode.MOTION, Severity.WARNING,
            f"Patient moved during {counter} {frame} of series {self.alerts.series}: from {what} {onset.shot} of "
            f"{per_buffer} ({slice_label([s])}, {where}; {100 * into:.0f}% into the {counter}) "
            f"{'on' if change.start_localised else 'back'}: {finding}"
            f"{'' if change.start_localised else ' before it'}.",
            f"Ask the patient to keep still; repeat {counter} {frame} (or the series) if its images show artefacts.",
            revealed_ns=trace.last_arrival_ns, slices=[s], repetition=frame if counter == "repetition" else None,
            value=change.evidence, threshold=p.min_evidence, unit="log inconsistency above threshold (run sum)",
            evidence={
                "source": source, "frame_counter": counter, "frame": frame,
                "reference": p.reference_frame if source != "navigator" else "first navigator",
                "shot": onset.shot, "shots": len(order), "ky": onset.ky,
                "kz": onset.kz, "scan_counter": onset.order, "acquisition_time_stamp": onset.time_stamp,
                "fraction_into_frame": round(into, 4), "run": [change.start, change.stop],
                "moved_back": not change.start_localised,
            },
        ), trace

    def close(self) -> Iterator[Output]:
        for frame in sorted(set(self._shots) | set(self._navs)):
            yield from self._evaluate(frame)
