"""The chain engine: each gadget in its own worker thread, bounded queues between them.

Receiving, reconstructing and sending overlap; a full queue blocks the stage before it
(backpressure all the way to the socket reader) instead of growing without bound, which
is Gadgetron's failure mode. Messages a gadget does not accept pass it untouched. An
exception in a gadget aborts the run: the error is kept (with the gadget's name) for the
session to report, and every worker stops without blocking on a dead neighbour.

NumPy/SciPy kernels release the GIL, so FFTs of one stage overlap the Python work of the
others (Holoscan's multithread scheduler makes the same bet).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from inline.buffers import KSPACE, domain_of
from inline.config import Stage
from inline.gadget import Gadget, SessionContext
from inline.trace import Trace
from inline.threads import lower_thread_priority

log = logging.getLogger(__name__)

Sink = Callable[[Any, Trace], None]


class _End:
    """End-of-stream marker between workers."""


_END = _End()



class DomainError(ValueError):
    """A gadget that needs k-space was handed hybrid-space data (see :mod:`inline.buffers`)."""


def check_domain(gadget: Gadget, item: Any) -> None:
    """Refuse hybrid-space data for a gadget that does not declare ``accepts_hybrid`` (the config
    check, :func:`inline.config.check_domains`, normally stops such a chain before it runs)."""
    domain = domain_of(item)
    if domain != KSPACE and not getattr(gadget, "accepts_hybrid", False):
        raise DomainError(
            f"{type(gadget).__name__} needs k-space but got a {type(item).__name__} in {domain} space; "
            "set RemoveReadoutOversampling output_domain: kspace for this chain"
        )


def remote_tap_indices(stages: list[Stage], gadgets: list[Gadget]) -> list[int]:
    """Stages whose tap can run in a worker process: a tap whose class and parameters pickle,
    and whose messages hold host arrays (not after a ``ToDevice`` that put them on a GPU:
    those taps stay on a thread of the server, beside their device)."""
    from inline.tap_process import can_run_remotely

    out, on_device = [], False
    for i, (stage, gadget) in enumerate(zip(stages, gadgets)):
        moved = getattr(gadget, "moves_arrays_to", None)
        if moved is not None:
            on_device = moved == "device"
        if getattr(gadget, "tap", False) and not on_device and can_run_remotely(stage.cls, stage.params):
            out.append(i)
    return out


class GadgetError(RuntimeError):
    """A gadget raised; ``stage`` names it, ``__cause__`` is the original exception."""

    def __init__(self, stage: str, gadget: str, cause: BaseException):
        super().__init__(f"gadget {stage!r} ({gadget}) failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.gadget = gadget


@dataclass
class StageTimes:
    """Wall time of every ``process``/``close`` call of one stage [ns]."""

    name: str
    gadget: str
    durations_ns: list[int] = field(default_factory=list)


class ChainRunner:
    """Runs instantiated gadgets as a pipeline of threads.

    Args:
        stages: validated stages (:func:`inline.config.validate_chain`).
        context: the session the gadgets belong to.
        sink: called (from the last worker thread) with every message that leaves the chain.
        queue_size: bound of each inter-stage queue [messages].
        on_error: called once, from the failing worker's thread, when a gadget raises.
        on_budget: called ``(stage, took_ms, budget_ms)`` the first time a stage with a
            ``budget_ms`` takes longer on one message (once per run, not per message).
        on_span: called ``(stage_index, kind, start_ns, took_ns)`` after every ``process``
            (``kind``: the message's type name) and ``close`` (``kind`` ``"close"``) call, from
            the stage's thread (:class:`inline.spans.SpanRecorder`; a tap in a worker process
            reports from its session's result thread); None: no spans.
        tap_host: a :class:`inline.tap_process.TapHost`: taps run in its worker processes
            (see :func:`remote_tap_indices` for which); None: every tap on a thread here.

    Raises:
        GadgetError: from :meth:`put`, :meth:`close` when a gadget failed (also in :attr:`error`).
    """

    def __init__(
        self,
        stages: list[Stage],
        context: SessionContext,
        sink: Sink,
        queue_size: int = 64,
        on_error: Callable[[GadgetError], None] | None = None,
        on_budget: Callable[[str, float, float], None] | None = None,
        on_span: Callable[[int, str, int, int], None] | None = None,
        tap_host: Any = None,
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.context = context
        self.names = [s.name for s in stages]
        self.gadgets: list[Gadget] = []
        for s in stages:
            try:
                self.gadgets.append(s.cls(context, s.params))
            except Exception as e:  # a constructor that rejects the header is a gadget failure
                raise GadgetError(s.name, s.cls.__name__, e) from e
        self.sink = sink
        self.on_error = on_error
        self.on_budget = on_budget
        self.on_span = on_span
        self.budgets_ms = [s.budget_ms for s in stages]
        self._overrun = [False] * len(stages)
        self.times = [StageTimes(n, type(g).__name__) for n, g in zip(self.names, self.gadgets)]
        self.error: GadgetError | None = None
        self._stages = list(stages)
        self.tap_host = tap_host
        self.remote_taps = remote_tap_indices(self._stages, self.gadgets) if tap_host is not None and tap_host.available else []
        self._remote = None  # RemoteTaps of this run, opened in start()
        self._abort = threading.Event()
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=queue_size) for _ in self.gadgets]
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"{context.session_id}:{n}", daemon=True)
            for i, n in enumerate(self.names)
        ]
        self._started = False

    # -- producer side -------------------------------------------------------------------
    def start(self) -> "ChainRunner":
        if self.remote_taps:
            from inline.tap_process import TapSpec

            specs = [TapSpec(i, self._stages[i].cls, self._stages[i].params) for i in self.remote_taps]
            self._remote = self.tap_host.open(
                self.context, specs, self._finding, lambda i, kind, t0, took: self._check_budget(i, took, t0, kind), self._remote_failed
            )
        for t in self._threads:
            t.start()
        self._started = True
        return self

    def put(self, item: Any, trace: Trace) -> None:
        """Feed one message into the first stage; blocks while the chain is full."""
        if not self._started:
            raise RuntimeError("ChainRunner.put before start()")
        self._raise_if_failed()
        if self.gadgets:
            self._put(0, (item, trace))
        else:
            self.sink(item, trace)

    def close(self, timeout_s: float | None = None) -> None:
        """Signal end of stream, wait until every stage has flushed; re-raise a gadget failure."""
        if self.gadgets and self._started:
            self._put(0, _END)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop every worker as soon as possible, dropping queued messages."""
        self._abort.set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each stage's input queue now (metrics)."""
        return {n: q.qsize() for n, q in zip(self.names, self._queues)}

    # -- workers ---------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, index: int, item: Any) -> None:
        q = self._queues[index]
        while not self._abort.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _emit(self, index: int, item: Any, trace: Trace) -> None:
        if index + 1 < len(self.gadgets):
            self._put(index + 1, (item, trace))
        else:
            self.sink(item, trace)

    def _finding(self, index: int, item: Any, trace: Trace) -> None:
        """What a tap found goes straight to the sink: an alert must not queue behind the data
        it was found in (no gadget takes alerts; the session sends them and stamps them on
        the images that follow)."""
        if not self._abort.is_set():
            self.sink(item, trace)

    def _check_budget(self, index: int, took_ns: int, start_ns: int = 0, kind: str = "close") -> None:
        self.times[index].durations_ns.append(took_ns)
        if self.on_span is not None:
            self.on_span(index, kind, start_ns, took_ns)
        budget = self.budgets_ms[index]
        if budget is not None and not self._overrun[index] and took_ns / 1e6 > budget:
            self._overrun[index] = True
            if self.on_budget is not None:
                self.on_budget(self.names[index], took_ns / 1e6, budget)

    def _run(self, index: int, outputs, skip: Any = None, emit: Callable[[int, Any, Trace], None] | None = None) -> int:
        """Emit each output as soon as the gadget yields it (``emit(index, item, trace)``,
        default the next stage); returns the gadget's own time [ns].

        A gadget that yields its input first and then computes (a QC tap) does not delay
        the stages after it; the time spent handing outputs on is not counted as its time.
        """
        emit = emit or self._emit
        spent = 0
        it = iter(outputs)
        while True:
            t0 = time.perf_counter_ns()
            try:
                out, tr = next(it)
            except StopIteration:
                return spent + time.perf_counter_ns() - t0
            spent += time.perf_counter_ns() - t0
            if out is not skip:
                emit(index, out, tr)

    def _messages(self, q: queue.Queue):
        """Messages of one stage's queue until the run is aborted (polling, so abort is seen)."""
        while not self._abort.is_set():
            try:
                yield q.get(timeout=0.05)
            except queue.Empty:
                continue

    def _forward_end(self, index: int) -> None:
        if index + 1 < len(self.gadgets):
            self._put(index + 1, _END)

    def _work(self, index: int) -> None:
        if index in self.remote_taps:
            self._work_remote_tap(index)
        elif getattr(self.gadgets[index], "tap", False):
            self._work_tap(index)
        else:
            self._work_stage(index)

    def _fail(self, index: int, e: Exception) -> None:
        self.error = GadgetError(self.names[index], type(self.gadgets[index]).__name__, e)
        self.error.__cause__ = e
        log.exception("session %s: %s", self.context.session_id, self.error)
        self._abort.set()
        if self.on_error is not None:
            self.on_error(self.error)

    def _remote_failed(self, index: int | None, e: Exception) -> None:
        log.error("session %s: %s", self.context.session_id, getattr(e, "remote_traceback", "") or e)
        self._fail(self.remote_taps[0] if index is None else index, e)

    def _work_remote_tap(self, index: int) -> None:
        """A tap in a worker process: forward every message, hand accepted ones over; at the
        end wait until the worker has closed the tap and its findings were handed on."""
        gadget, q, remote = self.gadgets[index], self._queues[index], self._remote
        try:
            for msg in self._messages(q):
                if msg is _END:
                    remote.end(index)
                    while not remote.wait_closed(index, 0.05):
                        if self._abort.is_set():
                            return
                    self._forward_end(index)
                    return
                item, trace = msg
                self._emit(index, item, trace)
                if isinstance(item, gadget.accepts):
                    check_domain(gadget, item)
                    remote.put(index, item, trace)
        except Exception as e:
            self._fail(index, e)
        finally:
            if self._abort.is_set():
                remote.drop()

    def _work_tap(self, index: int) -> None:
        """A tap (``gadget.tap = True``, e.g. QC) sits beside the data path, not on it.

        Every message goes on to the next stage at once; accepted ones are also handed to a
        second thread that runs the gadget and hands only what it finds (its echo of the
        input is dropped) straight to the sink (:meth:`_finding`). A slow check therefore
        never delays images; it only delays its own alerts. The side queue is unbounded:
        dropping data would make QC miss faults.
        """
        gadget, q = self.gadgets[index], self._queues[index]
        side: queue.Queue = queue.Queue()

        def inspect() -> None:
            lower_thread_priority()  # a tap's inspection yields the CPU to the data path
            try:
                while True:
                    msg = side.get()
                    if msg is _END:
                        t0 = time.perf_counter_ns()
                        self._check_budget(index, self._run(index, gadget.close(), emit=self._finding), t0)
                        return
                    item, trace = msg
                    check_domain(gadget, item)
                    t0 = time.perf_counter_ns()
                    took = self._run(index, gadget.process(item, trace), skip=item, emit=self._finding)
                    self._check_budget(index, took, t0, type(item).__name__)
                    if self._abort.is_set():
                        return
            except Exception as e:
                self._fail(index, e)

        worker = threading.Thread(target=inspect, name=f"{self.context.session_id}:{self.names[index]}:tap", daemon=True)
        worker.start()
        try:
            for msg in self._messages(q):
                if msg is _END:
                    side.put(_END)
                    while worker.is_alive() and not self._abort.is_set():
                        worker.join(0.05)
                    self._forward_end(index)
                    return
                item, trace = msg
                self._emit(index, item, trace)
                if isinstance(item, gadget.accepts):
                    side.put(msg)
        except Exception as e:
            self._fail(index, e)

    def _work_stage(self, index: int) -> None:
        gadget, q = self.gadgets[index], self._queues[index]
        try:
            for msg in self._messages(q):
                if msg is _END:
                    t0 = time.perf_counter_ns()
                    self._check_budget(index, self._run(index, gadget.close()), t0)
                    self._forward_end(index)
                    return
                item, trace = msg
                if not isinstance(item, gadget.accepts):
                    self._emit(index, item, trace)
                    continue
                check_domain(gadget, item)
                t0 = time.perf_counter_ns()
                self._check_budget(index, self._run(index, gadget.process(item, trace)), t0, type(item).__name__)
        except Exception as e:
            self._fail(index, e)
