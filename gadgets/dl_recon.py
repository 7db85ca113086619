"""Deep-learning reconstruction of undersampled 2D Cartesian k-space (E2E-VarNet), with a timed fallback.

The network is :class:`models.varnet.VarNet` (Sriram et al., MICCAI 2020; fastMRI's model
signature ``kspace, mask, acs_mask``), trained by :mod:`models.train_varnet` on 8 virtual
coils. The gadget feeds it exactly what training fed it (:mod:`models.data`):

1. coil compression (:mod:`inline.coils`, Huang et al. 2008 / BART ``cc -S``): a
   ``(virtual_coils, coils)`` matrix from the principal components of the calibration lines,
   cached per slice geometry (slice, position, grid, coil count) so every repetition of a
   slice uses the same virtual coils;
2. ACS lines that are not imaging lines are used as data (as :mod:`gadgets.cs` does); the
   mask is every known ky line, the ACS mask the contiguous calibration block;
3. scaling by :func:`input_scale` (= :func:`models.data.input_scale`: 99th percentile of the
   RSS of the ACS-only low-resolution coil images), the network, and the inverse scaling.

The network's k-space then gets one closing CG-SENSE data-consistency step with ESPIRiT maps
and the network's image as prior (:mod:`gadgets.dl_refine`, MoDL-style; ``refine``): held-out
NRMSE at R = 4 0.060 -> 0.031, ~75 ms more per 256 x 256 slice on this CPU. The
output is the completed virtual-coil k-space, so FFTRecon, CoilCombine (rss) and
ImageFinish follow unchanged, as after :class:`gadgets.cs.CompressedSensing`.

Real time: inference runs on one worker thread per session with a time limit
(``budget_ms``). A slice whose inference raises, is not done in time, or arrives while the
worker is still busy with a late earlier slice (work never piles up), is reconstructed by
the fallback instead (:class:`gadgets.grappa.GRAPPA` or
:meth:`gadgets.cs.CompressedSensing.apply`, on the same virtual coils) and this is said:
a log warning per slice, a ``WARNING`` TEXT to the scanner once per kind of failure and a
summary at the end of the series, and the image meta (:data:`META_METHOD` etc.).

The model comes from :func:`_load_model`, the one place that knows the inference engine
(:func:`inline.inference.get_model`): loaded once per process, shared by sessions, on the
first backend of ``backends`` that works here. :meth:`DLRecon.warm_up` (the server's start-up
hook, see :mod:`inline.server`) loads it and runs it on the chain's ``warmup_shapes`` so the
first scan's first image is not slow. The engine and torch are imported only when a model is
loaded.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import Field, field_validator

from gadgets.coil_combine import rss
from gadgets.cs import CompressedSensing
from gadgets.dl_refine import REFINE_ITERATIONS, REFINE_LAMBDA, refine_maps, sense_refine
from gadgets.espirit import CalibrationError
from gadgets.fft_recon import centred_ifft
from gadgets.grappa import GRAPPA, _one_blas_thread, kernel_geometry
from inline.backend import to_host
from inline.buffers import ReconBuffer
from inline.coils import compress, compression_matrix
from inline.gadget import AccumulatingGadget, GadgetParams, Output, Text, text_message
from inline.registry import register
from inline.trace import Trace

log = logging.getLogger(__name__)

#: Image meta keys this gadget sets (carried by ReconBuffer.meta to ImageFinish).
META_METHOD = "InlineReconMethod"  # "DL-VARNET" or "GRAPPA R=4x1 (fallback: <reason>)"
META_BACKEND = "InlineDLBackend"  # backend that ran the network ("eager", "onnxruntime", ...); absent on fallback
META_MODEL = "InlineDLModel"  # model name
META_INFERENCE_MS = "InlineDLInference_ms"  # network time of this slice [ms]
META_FALLBACK = "InlineDLFallbackReason"  # why the network's image was not used
META_REFINE = "InlineDLRefine"  # the closing SENSE step: "SENSE-DC lambda=0.03, 8 CG iterations", "off" or "skipped: <why>"

DL_METHOD = "DL-VARNET"
#: Fewest contiguous calibration lines the network and the compression are given.
MIN_ACS_LINES = 4
#: Backend preference when a config gives none: ``inline.inference.DEFAULT_PREFERENCE``
#: (repeated here so importing the gadget library does not import the engine; a test pins it).
DEFAULT_BACKENDS = ("tensorrt", "compile", "eager", "onnxruntime")


class DLReconError(ValueError):
    """The buffer cannot be given to the network (3D, not 4-D, no calibration region)."""


# -- the model: the one place that knows the inference engine -----------------------------
class InferenceModel(Protocol):
    """What the gadget needs of a loaded model (:class:`inline.inference.LoadedModel`)."""

    backend: str

    def run(self, kspace: np.ndarray, mask: np.ndarray, acs_mask: np.ndarray) -> np.ndarray:
        """``(batch, coils, ky, kx)`` complex64, masks ``(batch, 1, ky, 1)`` float32 -> completed k-space."""

    def warm_up(self, shapes: Any) -> Any:
        """Run once per ``(batch, coils, ky, kx)`` shape."""


def model_spec(model: str) -> Any:
    """What :func:`inline.inference.get_model` is given for the ``model`` parameter: a shipped
    model's name as is (its weights are checked against the published sha256), or, for a path
    to a ``.pt`` checkpoint, a spec that trusts the file as it is now (development, tests)."""
    p = Path(model)
    if p.suffix == ".pt" or len(p.parts) > 1:
        from inline.inference import ModelSpec

        return ModelSpec.from_file(p)
    return model


def _load_model(params: DLRecon.Params, warm_up: Sequence[tuple[int, int, int, int]] = ()) -> InferenceModel:
    """The process-wide shared model for ``params`` (:func:`inline.inference.get_model`: loaded
    once per process, cached by weights checksum, backend, device and precision), warmed up
    for the ``(batch, coils, ky, kx)`` shapes ``warm_up``.

    Raises whatever loading raises (no torch, missing or unpublished weights, no backend):
    the gadget then falls back on every slice.
    """
    from inline.inference import get_model

    return get_model(
        model_spec(params.model),
        preference=list(params.backends),
        device=None if params.device == "auto" else params.device,
        precision=params.precision,
        warm_up=list(warm_up),
    )


def model_cache_stats() -> Any:
    """The engine's cache counters (:func:`inline.inference.cache_stats`: hits, loads, failures, entries)."""
    from inline.inference import cache_stats

    return cache_stats()


# -- k-space preparation ---------------------------------------------------------------------
def calibration_run(lines: np.ndarray, centre: int) -> np.ndarray:
    """``(ky,)`` bool: the contiguous run of True in ``lines`` that contains ``centre``, else the longest run."""
    ny = lines.shape[0]
    out = np.zeros(ny, bool)
    if 0 <= centre < ny and lines[centre]:
        lo = centre
        while lo > 0 and lines[lo - 1]:
            lo -= 1
        hi = centre
        while hi < ny - 1 and lines[hi + 1]:
            hi += 1
        out[lo : hi + 1] = True
        return out
    best, start = (0, 0), None
    for i, v in enumerate([*lines.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    out[best[0] : best[1]] = True
    return out


def centre_line(item: ReconBuffer) -> int:
    """Grid index of the k-space centre line (the accumulator's placement of ``ky_center``)."""
    ny = item.data.shape[2]
    enc = item.encoding
    offset = min(max(ny // 2 - enc.ky_center, 0), max(ny - 1 - enc.ky_max, 0))
    return enc.ky_center + offset


def detect_acceleration(sampled: np.ndarray) -> int:
    """The most common spacing of the imaging lines ``(ky,)`` (1 when fewer than two)."""
    lines = np.flatnonzero(sampled)
    if lines.size < 2:
        return 1
    return int(np.bincount(np.diff(lines)).argmax())


def grappa_kernel_ky(r: int, acs_lines: int, largest: int = 4) -> int:
    """The largest GRAPPA kernel (source lines along ky, at most ``largest``) whose span fits
    ``acs_lines`` calibration lines at acceleration ``r`` (GRAPPA's default 4 needs 3R + 1
    lines; a 12-line ACS at R = 4 gets 3). 2 when none fits (GRAPPA then says why)."""
    for k in range(largest, 1, -1):
        targets, taps = kernel_geometry((1, r), (1, k))
        lo = min(min(t[1] for t in taps), 0)
        hi = max(max(t[1] for t in taps), max((t[1] for t in targets), default=0))
        if hi - lo + 1 <= acs_lines:
            return k
    return 2


def input_scale(kspace: np.ndarray, acs: np.ndarray) -> float:
    """:func:`models.data.input_scale` (the training's scale: 99th percentile of the RSS of the
    ACS-only coil images) for ``(coils, ky, kx)`` k-space and ``(ky,)`` ``acs``, with the
    project's complex64 scipy FFT (3x faster than NumPy's here; equal to 1e-6, tested)."""
    low = np.zeros((kspace.shape[0], 1) + kspace.shape[1:], np.complex64)
    low[:, 0, acs] = kspace[:, acs]
    return max(float(np.percentile(rss(centred_ifft(low, (2, 3))), 99)), 1e-30)


@dataclass
class Prepared:
    """One slice ready for the network.

    Attributes:
        kspace: ``(virtual, ky, kx)`` complex64 compressed k-space, ACS lines filled in, unscaled.
        mask: ``(ky,)`` bool, every known line (imaging and calibration).
        acs: ``(ky,)`` bool, the contiguous calibration block.
        matrix: ``(virtual, coils)`` compression matrix.
        scale: :func:`input_scale` of ``kspace`` (the training's).
        prepare_ms: time to compress and scale [ms].
    """

    kspace: np.ndarray
    mask: np.ndarray
    acs: np.ndarray
    matrix: np.ndarray
    scale: float
    prepare_ms: float


@register
class DLRecon(AccumulatingGadget):
    """E2E-VarNet reconstruction of an undersampled 2D buffer, with GRAPPA/CS fallback.

    Input :class:`ReconBuffer` ``(coils, 1, ky, kx)`` complex64, any coil count, zeros at
    unsampled lines, calibration in ``reference`` (or a fully sampled centre of ``data``).

    Output :class:`ReconBuffer` ``(virtual, 1, ky, kx)`` complex64 (``virtual`` =
    ``min(virtual_coils, coils)``): the network's completed k-space, ``sampled`` all True,
    no reference, history + ``"DL-VARNET"``, ``"BACKEND-<backend>"``; meta
    :data:`META_METHOD` = ``"DL-VARNET"``, :data:`META_BACKEND`, :data:`META_MODEL`,
    :data:`META_INFERENCE_MS`. A fully sampled buffer passes compressed, without the network
    (meta ``"FFT (fully sampled)"``).

    Fallback (see the module docstring): the fallback's buffer (GRAPPA: all virtual coils
    filled; CS: one coil) with meta :data:`META_METHOD` = ``"<method> (fallback: <reason>)"``
    and :data:`META_FALLBACK`; ``WARNING`` :class:`Text` once per kind of failure, and a
    summary at :meth:`close`. A buffer without a calibration region falls back too.

    Raises:
        DLReconError (a ValueError): ``data`` not 4-D, or 3D (kz > 1).
    """

    class Params(GadgetParams):
        model: str = Field(
            "varnet_mni152", description="Shipped model name (inline.inference registry; sha256-checked) or a path to a .pt checkpoint."
        )
        backends: list[Literal["tensorrt", "compile", "onnxruntime", "eager"]] = Field(
            default_factory=lambda: list(DEFAULT_BACKENDS),
            min_length=1,
            description="Inference backends in order of preference; the first that works on the device is used.",
        )
        device: str = Field("auto", description="Inference device: 'auto' (cuda when available, else cpu), 'cpu', 'cuda[:N]'.")
        precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Inference precision.")
        virtual_coils: int = Field(8, ge=1, le=128, description="Virtual coils after compression (the network was trained on 8).")
        budget_ms: float | None = Field(
            500.0, gt=0, description="Inference time limit per slice [ms]; a later result is discarded for the fallback. None: wait."
        )
        fallback: Literal["grappa", "cs"] = Field(
            "grappa", description="Reconstruction when the network fails or is late: grappa (~50 ms) or cs (~0.4 s)."
        )
        refine: bool = Field(
            True, description="Close with one CG-SENSE data-consistency step (ESPIRiT maps, the network's image as prior; "
            "gadgets.dl_refine): held-out NRMSE at R=4 0.060 -> 0.031, ~75 ms more per 256 x 256 slice on this CPU.")
        refine_lambda: float = Field(REFINE_LAMBDA, gt=0, description="Weight of ||x - network image||^2 in the SENSE step.")
        refine_iterations: int = Field(REFINE_ITERATIONS, ge=1, description="Most CG iterations of the SENSE step.")
        warmup_shapes: list[tuple[int, int, int]] = Field(
            default_factory=lambda: [(8, 256, 256)],
            description="(coils, ky, kx) shapes the model is warmed up for at server start.",
        )

        @field_validator("warmup_shapes")
        @classmethod
        def _positive(cls, v: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
            if any(n < 1 for shape in v for n in shape):
                raise ValueError(f"warmup_shapes must be positive (coils, ky, kx), got {v}")
            return v

    accepts: ClassVar[tuple[type, ...]] = (ReconBuffer,)
    emits: ClassVar[tuple[type, ...]] = (ReconBuffer, Text)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self._matrices: dict[tuple, np.ndarray] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._fallback_gadget: Any = None
        self._warned: set[str] = set()
        self._last_trace: Trace | None = None
        #: slices by outcome: "dl", "fully_sampled", and fallback kinds ("error", "late", "busy", ...)
        self.counts: Counter = Counter()
        #: per slice: prepare_ms, inference_ms, total_ms, method
        self.timings: list[dict[str, Any]] = []
        self.model: InferenceModel | None = None
        self.load_error: str | None = None
        t0 = time.perf_counter()
        try:
            self.model = _load_model(self.params)
        except Exception as e:  # no torch, no weights, a backend that fails: every slice falls back
            self.load_error = f"{type(e).__name__}: {e}"
            self.log.warning("DLRecon: model %r unavailable (%s); slices use %s", self.params.model, self.load_error, self.params.fallback)
        else:
            self.log.info("DLRecon: model %r on %s ready in %.0f ms", self.params.model, self.model.backend, (time.perf_counter() - t0) * 1e3)

    # -- warm-up hook (server start) ----------------------------------------------------
    @classmethod
    def warm_up(cls, params: DLRecon.Params) -> str:
        """Load the shared model for ``params`` and run it on each of ``warmup_shapes``.

        Called by the server at start (in a background thread); returns what was done.
        Without torch it logs and returns; loading errors propagate (the server logs them).
        """
        if importlib.util.find_spec("torch") is None:
            log.info("DLRecon.warm_up: torch is not installed; %r not preloaded", params.model)
            return "skipped: torch not installed"
        shapes = [(1, min(c, params.virtual_coils), ky, kx) for c, ky, kx in params.warmup_shapes]
        model = _load_model(params, warm_up=shapes)
        return f"{params.model} on {model.backend}, shapes {shapes}"

    # -- per buffer ----------------------------------------------------------------------
    def process(self, item: ReconBuffer, trace: Trace) -> Iterator[Output]:
        if item.data.ndim != 4:
            raise DLReconError(f"DLRecon: buffer data must be (coils, kz, ky, kx), got shape {item.data.shape}")
        if item.data.shape[1] != 1:
            raise DLReconError(
                f"DLRecon: the network is 2D; got a 3D buffer with kz = {item.data.shape[1]} (use a GRAPPA or CS chain)"
            )
        t0 = time.perf_counter()
        self._last_trace = trace
        try:
            prep = self.prepare(item)
        except DLReconError as e:
            yield from self._fall_back(item, None, "calibration", str(e), trace, t0)
            return
        if prep.mask.all():
            self.counts["fully_sampled"] += 1
            out = self._buffer(item, prep.kspace, [*item.history, "COIL-COMPRESSION"], {META_METHOD: "FFT (fully sampled)"})
            self._time(prep.prepare_ms, None, t0, "fully sampled")
            yield out, trace
            return
        if self.model is None:
            yield from self._fall_back(item, prep, "unavailable", f"model unavailable ({self.load_error})", trace, t0)
            return
        k = (prep.kspace / np.float32(prep.scale))[None]
        mask = prep.mask.astype(np.float32)[None, None, :, None]
        acs = prep.acs.astype(np.float32)[None, None, :, None]
        kind, detail, result, inference_ms = self._infer(k, mask, acs)
        if kind is not None:
            yield from self._fall_back(item, prep, kind, detail, trace, t0)
            return
        history = [*item.history, DL_METHOD, f"BACKEND-{self.model.backend.upper()}"]
        network_k, refined = result[0], "off"
        if self.params.refine:
            network_k, refined = self._refine(network_k, k[0], prep)
            if not refined.startswith("skipped"):
                history.append("SENSE-DC")
        completed = (network_k * np.float32(prep.scale)).astype(np.complex64, copy=False)
        self.counts["dl"] += 1
        meta = {
            META_METHOD: DL_METHOD,
            META_BACKEND: self.model.backend,
            META_MODEL: self.params.model,
            META_INFERENCE_MS: f"{inference_ms:.1f}",
            META_REFINE: refined,
        }
        out = self._buffer(item, completed, history, meta)
        self._time(prep.prepare_ms, inference_ms, t0, DL_METHOD)
        yield out, trace

    def prepare(self, item: ReconBuffer) -> Prepared:
        """Compress, fill in the ACS-only lines, find the masks and the input scale of a 2D buffer.

        Only the known lines are gathered and compressed (a quarter of the data at R = 4).

        Raises:
            DLReconError: no calibration region of at least :data:`MIN_ACS_LINES` lines.
        """
        t0 = time.perf_counter()
        data = to_host(item.data)  # (coils, 1, ky, kx)
        sampled = np.asarray(to_host(item.sampled))[0]
        known, extra, ref_lines = sampled.copy(), None, None
        if item.reference is not None and item.reference_sampled is not None:
            ref_lines = np.asarray(to_host(item.reference_sampled))[0]
            extra = ref_lines & ~sampled
            known |= extra
        acs = calibration_run(ref_lines if ref_lines is not None and ref_lines.any() else known, centre_line(item))
        if acs.sum() < MIN_ACS_LINES:
            raise DLReconError(f"no calibration region: {int(acs.sum())} contiguous fully sampled lines, need {MIN_ACS_LINES}")
        lines = np.flatnonzero(known)
        block = data[:, 0, lines]  # (coils, known lines, kx), a copy
        if extra is not None and extra.any():
            block[:, extra[lines]] = to_host(item.reference)[:, 0, extra]
        matrix = self._matrix(item, block[:, acs[lines]])
        kspace = np.zeros((matrix.shape[0],) + data.shape[2:], np.complex64)
        with _one_blas_thread():  # a small product: BLAS threads only wait for busy cores (1 ms vs 8-16 ms here)
            kspace[:, lines] = compress(block, matrix)  # unknown lines stay 0
        return Prepared(kspace, known, acs, matrix, input_scale(kspace, acs), (time.perf_counter() - t0) * 1e3)

    def _matrix(self, item: ReconBuffer, calibration: np.ndarray) -> np.ndarray:
        pos = getattr(item.header, "position", None) if item.header is not None else None
        pos = tuple(round(float(p), 3) for p in pos) if pos is not None else ()
        key = (item.index.slice, pos, item.data.shape)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = self._matrices[key] = compression_matrix(np.ascontiguousarray(calibration), self.params.virtual_coils)
        return matrix

    def _refine(self, network_k: np.ndarray, measured: np.ndarray, prep: Prepared) -> tuple[np.ndarray, str]:
        """The SENSE step on the scaled k-space: ``(k-space, META_REFINE text)``; the network's k-space if it cannot run.

        The maps are made after the network, not meanwhile: the network's intra-op threads use
        both cores, and sharing them cost more than it saved (DLRecon 288 vs 246 ms per slice in
        ``inline bench --case dl_r8_2d_32ch_256``, 173 ms without the step)."""
        try:
            maps = refine_maps(prep.kspace, prep.acs)
            out, iterations = sense_refine(
                network_k, measured, prep.mask, maps, self.params.refine_lambda, self.params.refine_iterations
            )
        except CalibrationError as e:  # fewer calibration lines than the ESPIRiT kernel: the network's image stands
            reason = f"no coil maps ({e})"
        except Exception as e:  # a failing step must not cost the slice its image
            reason = f"{type(e).__name__}: {e}"
        else:
            return out, f"SENSE-DC lambda={self.params.refine_lambda:g}, {iterations} CG iterations"
        if "refine" not in self._warned:
            self._warned.add("refine")
            self.log.warning("DLRecon: SENSE step skipped, the network's image is used as it is (%s)", reason)
        return network_k, f"skipped: {reason}"

    def _infer(self, k: np.ndarray, mask: np.ndarray, acs: np.ndarray) -> tuple[str | None, str, np.ndarray | None, float]:
        """Run the network within the budget: ``(failure kind or None, detail, result, ms)``."""
        assert self.model is not None
        budget = self.params.budget_ms
        t0 = time.perf_counter()
        if budget is None:
            try:
                return None, "", self.model.run(k, mask, acs), (time.perf_counter() - t0) * 1e3
            except Exception as e:
                return "error", f"inference error ({type(e).__name__}: {e})", None, (time.perf_counter() - t0) * 1e3
        if self._pending is not None and not self._pending.done():
            return "busy", "network still busy with an earlier, late slice", None, 0.0
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.context.session_id}:dl")
        future = self._executor.submit(self.model.run, k, mask, acs)
        self._pending = future
        try:
            result = future.result(timeout=budget / 1e3)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(self._late)
            return "late", f"inference not done within {budget:g} ms", None, (time.perf_counter() - t0) * 1e3
        except Exception as e:
            return "error", f"inference error ({type(e).__name__}: {e})", None, (time.perf_counter() - t0) * 1e3
        return None, "", result, (time.perf_counter() - t0) * 1e3

    def _late(self, future: concurrent.futures.Future) -> None:
        error = future.exception()
        self.log.info("DLRecon: a late network result was discarded%s", f" ({type(error).__name__}: {error})" if error else "")

    # -- fallback ------------------------------------------------------------------------
    def _fall_back(self, item: ReconBuffer, prep: Prepared | None, kind: str, detail: str, trace: Trace, t0: float) -> Iterator[Output]:
        self.counts[kind] += 1
        buf = self._compressed_input(item, prep) if prep is not None else item
        name = self.params.fallback.upper()
        msg = f"DLRecon: slice {item.index.slice} (repetition {item.index.repetition}) reconstructed by {name}: {detail}"
        self.log.warning(msg)
        if kind not in self._warned:
            self._warned.add(kind)
            yield text_message("WARNING", msg), trace
        try:
            out, texts = self._run_fallback(buf, int(prep.acs.sum()) if prep is not None else 0)
        except ValueError as e:  # e.g. GRAPPA on irregular sampling: still give the operator an image
            self.log.error("DLRecon: fallback %s failed on slice %d: %s; zero-filled image", name, item.index.slice, e)
            yield text_message("ERROR", f"DLRecon: {name} fallback failed ({e}); slice {item.index.slice} is zero-filled (aliased)"), trace
            out, texts = replace(buf, history=[*buf.history, "ZERO-FILLED"]), []
            name = "ZERO-FILLED"
        for text in texts:
            yield text, trace
        method = out.history[-1] if len(out.history) > len(buf.history) else name
        meta = {**item.meta, META_METHOD: f"{method} (fallback: {detail})", META_FALLBACK: detail, META_MODEL: self.params.model}
        out = replace(out, meta=meta)
        self._time(prep.prepare_ms if prep is not None else None, None, t0, f"{name} fallback ({kind})")
        yield out, trace

    def _compressed_input(self, item: ReconBuffer, prep: Prepared) -> ReconBuffer:
        """``item`` on the virtual coils, imaging lines in ``data`` and ACS in ``reference`` as before."""
        data = to_host(item.data)
        sampled = np.asarray(to_host(item.sampled))
        k = np.zeros((prep.matrix.shape[0],) + data.shape[1:], np.complex64)
        ref = None
        with _one_blas_thread():
            k[:, sampled] = compress(data[:, sampled], prep.matrix)
            if item.reference is not None and item.reference_sampled is not None:
                rs = np.asarray(to_host(item.reference_sampled))
                ref = np.zeros_like(k)
                ref[:, rs] = compress(to_host(item.reference)[:, rs], prep.matrix)
        return replace(item, data=k, reference=ref, since_snapshot=None)

    def _run_fallback(self, buf: ReconBuffer, acs_lines: int) -> tuple[ReconBuffer, list[Text]]:
        if self.params.fallback == "cs":
            if self._fallback_gadget is None:
                self._fallback_gadget = CompressedSensing(self.context)
            return self._fallback_gadget.apply(buf), []
        if self._fallback_gadget is None:
            self._fallback_gadget = GRAPPA(self.context)
        grappa = self._fallback_gadget
        if grappa.acceleration() == (1, 1):  # header without parallelImaging: read R off the sampling
            grappa.params.acceleration_ky = max(detect_acceleration(np.asarray(buf.sampled)[0]), 1)
        grappa.params.kernel_ky = grappa_kernel_ky(grappa.acceleration()[1], acs_lines)
        out, texts = None, []
        for payload, _ in grappa.process(buf, Trace.arrived()):
            if isinstance(payload, ReconBuffer):
                out = payload
            else:
                texts.append(payload)
        if out is None:
            raise ValueError("GRAPPA produced no buffer")
        return out, texts

    # -- helpers -------------------------------------------------------------------------
    def _buffer(self, item: ReconBuffer, kspace: np.ndarray, history: list[str], meta: dict[str, Any]) -> ReconBuffer:
        return item.completed(kspace[:, None], history[len(item.history):], meta)

    def _time(self, prepare_ms: float | None, inference_ms: float | None, t0: float, method: str) -> None:
        self.timings.append(
            {"prepare_ms": prepare_ms, "inference_ms": inference_ms, "total_ms": (time.perf_counter() - t0) * 1e3, "method": method}
        )

    def close(self) -> Iterator[Output]:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        fallbacks = {k: n for k, n in self.counts.items() if k not in ("dl", "fully_sampled")}
        if fallbacks:
            total = sum(self.counts.values())
            detail = ", ".join(f"{n} {k}" for k, n in sorted(fallbacks.items()))
            msg = f"DLRecon: {sum(fallbacks.values())} of {total} slices reconstructed by {self.params.fallback.upper()} instead of the network ({detail})"
            self.log.warning(msg)
            yield text_message("WARNING", msg), self._last_trace or Trace.arrived()

