"""The process-wide model cache and :func:`get_model`: load once per server process, share across sessions.

Keyed by (weights sha256, backend, device, precision). Lookups are thread-safe; a model is
built under a lock of its own key, so two sessions asking for the same model at once load
it once, while other models stay available. The backend is the first in the caller's
preference order that is available on this machine and builds; each skipped one is logged
with its reason, and a build that failed is not retried until :func:`clear_cache`.
Backend options (``cache_dir``, ``shape_range``, ``intra_op_threads``) are taken from the
call that loads the model; later hits share it as built.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inline.inference.backends import BACKENDS, DEFAULT_PREFERENCE, PRECISIONS, BuildContext
from inline.inference.diskcache import cache_root
from inline.inference.model import LoadedModel
from inline.inference.registry import shipped_spec
from inline.inference.shapes import Shape, ShapeRange, as_shape
from inline.inference.spec import ModelSpec, load_network

log = logging.getLogger(__name__)

CacheKey = tuple[str, str, str, str]  # (sha256, backend, device, precision)


class NoBackendAvailable(RuntimeError):
    """None of the preferred backends can run the model here; the message lists each one's reason."""


@dataclass(frozen=True)
class CacheStats:
    """Counters of the process-wide cache.

    Attributes:
        hits: :func:`get_model` calls answered from the cache.
        loads: models read, verified and built.
        failures: backend builds that raised (their backend was then skipped).
        entries: models held now.
    """

    hits: int
    loads: int
    failures: int
    entries: int


_lock = threading.Lock()
_models: dict[CacheKey, LoadedModel] = {}
_failed: dict[CacheKey, str] = {}
_key_locks: dict[CacheKey, threading.Lock] = {}
_reported: set[tuple[str, str, str, str]] = set()
_counts = {"hits": 0, "loads": 0, "failures": 0}


def cache_stats() -> CacheStats:
    """The cache's counters now."""
    with _lock:
        return CacheStats(_counts["hits"], _counts["loads"], _counts["failures"], len(_models))


def clear_cache() -> None:
    """Forget every cached model, failure and counter (tests; freeing GPU memory)."""
    with _lock:
        _models.clear()
        _failed.clear()
        _key_locks.clear()
        _reported.clear()
        _counts.update(hits=0, loads=0, failures=0)


def _report_skip(backend: str, device: Any, precision: str, reason: str) -> None:
    """Log why a backend is skipped: at INFO the first time, at DEBUG for every later session."""
    fact = (backend, str(device), precision, reason)
    with _lock:
        first = fact not in _reported
        _reported.add(fact)
    log.log(logging.INFO if first else logging.DEBUG, "inference backend %s skipped on %s/%s: %s", backend, device, precision, reason)


def resolve_device(device: Any = None) -> Any:
    """``device`` as a ``torch.device`` with an explicit index for CUDA; ``None``: ``cuda`` if
    PyTorch sees a GPU, else ``cpu``."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = torch.device("cuda", index)
    return device


def get_model(
    spec: ModelSpec | str,
    preference: Sequence[str] = DEFAULT_PREFERENCE,
    device: Any = None,
    precision: str = "fp32",
    *,
    warm_up: Iterable[Shape] = (),
    cache_dir: str | Path | None = None,
    shape_range: ShapeRange | None = None,
    intra_op_threads: int = 0,
) -> LoadedModel:
    """The shared :class:`LoadedModel` of ``spec`` on the first available backend of ``preference``.

    Args:
        spec: a :class:`ModelSpec` or the name of a shipped model (:mod:`inline.inference.registry`).
        preference: backend names, best first (``"tensorrt"``, ``"compile"``, ``"onnxruntime"``, ``"eager"``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; ``None``: a GPU if there is one.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        warm_up: k-space shapes ``(batch, coils, ky, kx)`` to warm up for (see :meth:`LoadedModel.warm_up`).
        cache_dir: on-disk cache for exports and engines (default ``$INLINE_MODEL_CACHE`` or ``~/.cache/inline``).
        shape_range: k-space shapes TensorRT engines should cover (default: each shape seen).
        intra_op_threads: ONNX Runtime intra-op threads (0: its default).

    Raises:
        ValueError: unknown backend name or precision, an empty preference, a malformed warm-up shape.
        ModelSpecError: unknown shipped model, missing or malformed weights.
        ChecksumMismatch: the weights' sha256 differs from the spec's.
        NoBackendAvailable: no preferred backend is available and builds (reasons in the message).
    """
    if isinstance(spec, str):
        spec = shipped_spec(spec)
    unknown = [name for name in preference if name not in BACKENDS]
    if unknown or not preference:
        raise ValueError(f"unknown inference backend(s) {unknown} in preference {list(preference)} (known: {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device)
    shapes = [as_shape(shape) for shape in warm_up]
    loaded = _get_or_build(spec, list(preference), device, precision, cache_root(cache_dir), shape_range, intra_op_threads, shapes)
    loaded.warm_up(shapes)  # shapes new to a model loaded by an earlier call; no-op for the rest
    return loaded


def _get_or_build(
    spec: ModelSpec, preference: list[str], device: Any, precision: str, cache_dir: Path,
    shape_range: ShapeRange | None, intra_op_threads: int, warm_up: list[Shape],
) -> LoadedModel:  # fmt: skip
    reasons: dict[str, str] = {}
    network: list[tuple[Any, dict, float]] = []  # read and verified at most once per call

    for name in preference:
        backend = BACKENDS[name]
        reason = backend.unavailable_reason(device, precision)
        if reason is not None:
            _report_skip(name, device, precision, reason)
            reasons[name] = reason
            continue
        key: CacheKey = (spec.sha256, name, str(device), precision)
        with _lock:
            key_lock = _key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with _lock:
                if key in _models:
                    _counts["hits"] += 1
                    return _models[key]
                if key in _failed:
                    reasons[name] = _failed[key]
                    log.debug("inference backend %s skipped for %s: failed before: %s", name, spec.name, _failed[key])
                    continue
            if not network:
                t0 = time.perf_counter()
                net, meta = load_network(spec)  # ModelSpecError/ChecksumMismatch propagate: not a backend problem
                network.append((net, meta, time.perf_counter() - t0))
            net, meta, read_s = network[0]
            ctx = BuildContext(spec.name, spec.sha256, device, precision, cache_dir, shape_range, intra_op_threads)
            t0 = time.perf_counter()
            try:
                loaded = LoadedModel(spec, name, device, precision, backend.build(net, ctx), meta, 0.0)
                loaded.load_s = read_s + time.perf_counter() - t0
                # exports and engine builds happen on a shape's first call: a failure there falls back too
                loaded.warm_up(warm_up)
            except Exception as e:  # an export/compile failure: report it and fall back to the next backend
                reason = f"build failed: {type(e).__name__}: {e}"
                log.warning("inference backend %s failed for %s on %s/%s: %s", name, spec.name, device, precision, reason)
                with _lock:
                    _failed[key] = reasons[name] = reason
                    _counts["failures"] += 1
                continue
            with _lock:
                _models[key] = loaded
                _counts["loads"] += 1
            log.info("inference: %s on backend %s (%s, %s), loaded in %.2f s", spec.name, name, device, precision, loaded.load_s)
            return loaded
    detail = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise NoBackendAvailable(f"no inference backend can run {spec.name} on {device} at {precision} ({detail})")
