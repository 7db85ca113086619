"""Per-message spans of one session or offline run, exported as JSON or Chrome trace.

A span is one ``process`` (or ``close``) call of one stage on one message: which stage and
gadget, what kind of message (its type name), when it started and how long the gadget's
own work took (the time spent handing outputs to the next queue is not counted, as in
:class:`inline.engine.StageTimes`). The session adds a ``send`` span per message it writes
back to the scanner. Recording is a tuple append per call from the worker threads; nothing
is formatted until export.

Formats:

* ``json``: ``{"format": "inline-spans/1", "session": ..., "config": ..., "clock": ...,
  "t0_ns": ..., "stages": [...], "spans": [{"stage", "gadget", "kind", "start_us",
  "duration_us"}, ...]}``, ``start_us`` relative to ``t0_ns`` (the session's start on the
  :func:`inline.trace.now_ns` clock), spans in start order.
* ``chrome``: the Trace Event Format (``{"traceEvents": [{"ph": "X", ...}]}``) that
  ``chrome://tracing``, Perfetto (https://ui.perfetto.dev) and speedscope open; one track
  (``tid``) per stage, named with ``thread_name`` metadata events.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from inline.trace import now_ns

TraceFormat = Literal["json", "chrome"]
FORMATS: tuple[str, ...] = ("json", "chrome")

#: Pseudo-stage of the spans the session itself records (replies written to the socket).
SEND_STAGE = "send"


class SpanRecorder:
    """Collects spans; thread-safe for appends (``list.append`` is atomic in CPython).

    Args:
        session_id: written into the export.
        t0_ns: origin of the exported times [ns, :func:`inline.trace.now_ns` clock]; now when omitted.
    """

    def __init__(self, session_id: str = "", t0_ns: int | None = None):
        self.session_id = session_id
        self.config = ""
        self.t0_ns = now_ns() if t0_ns is None else t0_ns
        self.stages: list[tuple[str, str]] = []  # (stage name, gadget class) by stage index
        self._spans: list[tuple[int, str, int, int]] = []  # (stage index, kind, start_ns, took_ns)
        self._extra: dict[str, int] = {}  # index of pseudo-stages (SEND_STAGE) in self.stages

    def bind(self, config: str, stages: list[tuple[str, str]]) -> None:
        """Name the stages of the chain whose spans follow (index = position in the chain)."""
        self.config = config
        self.stages = list(stages)
        self._extra = {}

    def stage_span(self, index: int, kind: str, start_ns: int, took_ns: int) -> None:
        """The :class:`~inline.engine.ChainRunner` ``on_span`` callback."""
        self._spans.append((index, kind, start_ns, took_ns))

    def span(self, stage: str, gadget: str, kind: str, start_ns: int, took_ns: int) -> None:
        """A span of a pseudo-stage outside the chain (e.g. :data:`SEND_STAGE`)."""
        index = self._extra.get(stage)
        if index is None:
            index = self._extra[stage] = len(self.stages)
            self.stages.append((stage, gadget))
        self._spans.append((index, kind, start_ns, took_ns))

    def __len__(self) -> int:
        return len(self._spans)

    def _indexed(self) -> list[tuple[int, dict[str, Any]]]:
        """``(stage index, span dict)`` of every span, in start order."""
        out = []
        for index, kind, start, took in sorted(self._spans, key=lambda s: s[2]):
            stage, gadget = self.stages[index] if index < len(self.stages) else (f"stage{index}", "?")
            span = {"stage": stage, "gadget": gadget, "kind": kind, "start_us": (start - self.t0_ns) / 1e3, "duration_us": took / 1e3}
            out.append((index, span))
        return out

    def spans(self) -> list[dict[str, Any]]:
        """Every span as a dict, in start order."""
        return [span for _, span in self._indexed()]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "inline-spans/1",
            "session": self.session_id,
            "config": self.config,
            "clock": "time.perf_counter_ns (monotonic)",
            "t0_ns": self.t0_ns,
            "stages": [{"stage": s, "gadget": g} for s, g in self.stages],
            "spans": self.spans(),
        }

    def to_chrome(self) -> dict[str, Any]:
        pid = 1
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"inline {self.config} {self.session_id}".strip()}}
        ]
        for tid, (stage, gadget) in enumerate(self.stages):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": f"{stage} ({gadget})"}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for index, span in self._indexed():
            events.append(
                {
                    "name": span["stage"],
                    "cat": span["kind"],
                    "ph": "X",
                    "ts": span["start_us"],
                    "dur": span["duration_us"],
                    "pid": pid,
                    "tid": index,
                    "args": {"gadget": span["gadget"], "kind": span["kind"]},
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"session": self.session_id, "config": self.config}}

    def export(self, fmt: TraceFormat = "json") -> dict[str, Any]:
        if fmt == "json":
            return self.to_json()
        if fmt == "chrome":
            return self.to_chrome()
        raise ValueError(f"unknown trace format {fmt!r} (one of {', '.join(FORMATS)})")

    def write(self, path: str | Path, fmt: TraceFormat = "json") -> Path:
        """Write the export atomically (a reader never sees half a file); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.export(fmt)))
        os.replace(tmp, path)
        return path

    def write_dir(self, directory: str | Path) -> list[Path]:
        """``<session>.trace.json`` and ``<session>.chrome.json`` in ``directory``."""
        d = Path(directory)
        name = self.session_id or "trace"
        return [self.write(d / f"{name}.trace.json", "json"), self.write(d / f"{name}.chrome.json", "chrome")]
