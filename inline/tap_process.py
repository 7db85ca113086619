"""Taps (QC) in worker processes, so their Python work never holds the server's GIL.

A tap on a thread of the server process slows the data path on a small machine even though
its thread is niced: while a check runs Python code it holds the interpreter lock, and the
reconstruction thread waits for the lock between its kernels (up to the 5 ms switch
interval each time). A :class:`TapHost` runs the taps of every session in worker processes
instead: spawned once when the server starts, at nice 19, so the kernel's scheduler, not
the interpreter lock, decides who runs.

The chain still forwards every message at once; an accepted one is also put on the worker's
queue (a feeder thread pickles it into a pipe: ~0.1 ms for a 32 x 512 readout). What the
tap finds comes back on a reader thread and enters the chain after the tap, as it does for
a tap on a thread. Each tap's ``process``/``close`` time is measured in the worker and
reported to the runner like any stage's (spans, budgets). Time stamps agree across the
processes: :func:`inline.trace.now_ns` is CLOCK_MONOTONIC.

Failures: a tap that raises in the worker fails its session as a tap on a thread does
(:class:`RemoteTapError`, with the worker's traceback in the log); a worker that dies fails
the sessions it served and is replaced for the next ones.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from inline.gadget import Gadget, GadgetParams, SessionContext
from inline.trace import Trace, now_ns

log = logging.getLogger(__name__)

#: Modules a worker imports before its first session (the standard chains' taps).
DEFAULT_PRELOAD = ("gadgets.qc_readout", "gadgets.qc_image", "gadgets.motion")


class RemoteTapError(RuntimeError):
    """A tap raised in the worker process (or the worker died); ``remote_traceback`` is the worker's."""

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


@dataclass(frozen=True)
class TapSpec:
    """One tap of a chain, as a worker builds it: stage index, gadget class and parameters."""

    index: int
    cls: type[Gadget]
    params: GadgetParams


def can_run_remotely(cls: type, params: Any) -> bool:
    """True when the gadget class and its parameters pickle (module-level classes do; a class
    made inside a function does not and stays on a thread of the server)."""
    try:
        pickle.dumps((cls, params))
        return True
    except Exception:
        return False


# -- the worker process ---------------------------------------------------------------------


def _worker_main(inbox: Any, outbox: Any, preload: Sequence[str], log_level: int) -> None:
    """Worker loop: build each session's taps, feed them messages, send back what they yield."""
    try:
        os.nice(19)
    except OSError:  # pragma: no cover - not permitted: run at the server's priority
        pass
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)-7s %(name)s [qc worker]: %(message)s")
    from inline.allocator import tune_process

    tune_process()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as e:  # the session that needs it will fail with the real error
            logging.getLogger(__name__).warning("tap worker: preloading %s failed: %s", name, e)
    outbox.put(("ready", None))
    taps: dict[str, dict[int, Gadget]] = {}

    def report(key: str, index: int, e: BaseException) -> None:
        outbox.put(("error", key, index, f"{type(e).__name__}: {e}", traceback.format_exc()))

    def inspect(key: str, index: int, outputs: Any, skip: Any = None) -> int:
        """Send what the tap yields (not its echo of the input); its own time [ns]."""
        spent, it = 0, iter(outputs)
        while True:
            t0 = now_ns()
            try:
                out, tr = next(it)
            except StopIteration:
                return spent + now_ns() - t0
            spent += now_ns() - t0
            if out is not skip:
                outbox.put(("out", key, index, out, tr))

    while True:
        msg = inbox.get()
        kind, key = msg[0], msg[1]
        if kind == "stop":
            return
        if kind == "open":
            _, key, header, session_id, config_name, specs = msg
            context = SessionContext(
                header=header, session_id=session_id, config_name=config_name, log=logging.getLogger(f"inline.session.{session_id}")
            )
            taps[key] = {}
            for spec in specs:
                try:
                    taps[key][spec.index] = spec.cls(context, spec.params)
                except Exception as e:
                    report(key, spec.index, e)
        elif kind == "item":
            _, key, index, item, trace = msg
            gadget = taps.get(key, {}).get(index)
            if gadget is None:  # failed before, or the session was dropped
                continue
            t0 = now_ns()
            try:
                took = inspect(key, index, gadget.process(item, trace), skip=item)
            except Exception as e:
                report(key, index, e)
                del taps[key][index]
                continue
            outbox.put(("span", key, index, type(item).__name__, t0, took))
        elif kind == "end":
            _, key, index = msg
            gadget = taps.get(key, {}).pop(index, None)
            if gadget is not None:
                t0 = now_ns()
                try:
                    took = inspect(key, index, gadget.close())
                    outbox.put(("span", key, index, "close", t0, took))
                except Exception as e:
                    report(key, index, e)
            outbox.put(("closed", key, index))
        elif kind == "drop":
            taps.pop(key, None)


# -- the server side ------------------------------------------------------------------------


def _proc_usage(pid: int) -> tuple[float, float]:
    """CPU seconds and peak resident bytes of process ``pid`` from Linux ``/proc``; NaNs elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        peak = float("nan")
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = float(line.split()[1]) * 1024
        return cpu, peak
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")



class RemoteTaps:
    """The taps of one session in a worker. Made by :meth:`TapHost.open`.

    Callbacks run on one thread per session (in message order): ``on_output(index, item,
    trace)`` for every finding, ``on_span(index, kind, start_ns, took_ns)`` per call,
    ``on_error(index, exc)`` when a tap failed (index None: the worker died).
    """

    def __init__(
        self,
        worker: "_Worker",
        key: str,
        indices: Sequence[int],
        on_output: Callable[[int, Any, Trace], None],
        on_span: Callable[[int, str, int, int], None],
        on_error: Callable[[int | None, RemoteTapError], None],
    ):
        self._worker = worker
        self.key = key
        self._closed = {i: threading.Event() for i in indices}
        self._events: queue.Queue = queue.Queue()
        self._on_output, self._on_span, self._on_error = on_output, on_span, on_error
        self._thread = threading.Thread(target=self._dispatch, name=f"{key}:taps", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        """Process id of the worker running these taps."""
        return self._worker.proc.pid

    def put(self, index: int, item: Any, trace: Trace) -> None:
        """Hand one accepted message to tap ``index``; returns at once (the queue is unbounded,
        like a thread tap's: dropping data would make QC miss faults)."""
        self._worker.inbox.put(("item", self.key, index, item, trace))

    def end(self, index: int) -> None:
        """End of stream for tap ``index``: the worker calls its ``close``."""
        self._worker.inbox.put(("end", self.key, index))

    def wait_closed(self, index: int, timeout_s: float) -> bool:
        """Whether tap ``index`` has closed and everything it yielded was handed on."""
        return self._closed[index].wait(timeout_s)

    def drop(self) -> None:
        """Abandon the session's taps (abort): the worker forgets them, findings are dropped."""
        self._worker.inbox.put(("drop", self.key))
        self._finish()

    def _deliver(self, msg: tuple) -> None:
        self._events.put(msg)

    def _finish(self) -> None:
        self._worker.forget(self.key)
        self._events.put(None)

    def _dispatch(self) -> None:
        while True:
            msg = self._events.get()
            if msg is None:
                return
            kind = msg[0]
            try:
                if kind == "out":
                    self._on_output(msg[2], msg[3], msg[4])
                elif kind == "span":
                    self._on_span(msg[2], msg[3], msg[4], msg[5])
                elif kind == "error":
                    error = RemoteTapError(f"{msg[3]} (in the QC worker process)", msg[4])
                    self._on_error(msg[2], error)
                elif kind == "closed":
                    self._closed[msg[2]].set()
                    if all(e.is_set() for e in self._closed.values()):
                        self._finish()
            except Exception:  # a callback of ours failed: keep serving the other messages
                log.exception("tap results of %s", self.key)


class _Worker:
    """One worker process, its two queues and the thread reading its results."""

    def __init__(self, ctx: Any, preload: Sequence[str], on_death: Callable[["_Worker"], None]):
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_worker_main, args=(self.inbox, self.outbox, tuple(preload), logging.getLogger().getEffectiveLevel()),
            name="inline-qc-worker", daemon=True,
        )
        self.proc.start()
        self.ready = threading.Event()
        self.sessions: dict[str, RemoteTaps] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self._on_death = on_death
        threading.Thread(target=self._read, name=f"inline-qc-worker-{self.proc.pid}", daemon=True).start()

    def forget(self, key: str) -> None:
        with self.lock:
            self.sessions.pop(key, None)

    def _read(self) -> None:
        while True:
            try:
                msg = self.outbox.get(timeout=0.5)
            except queue.Empty:
                if self.stopping:
                    return
                if not self.proc.is_alive():
                    return self._died()
                continue
            except (EOFError, OSError):
                return self._died()
            if msg[0] == "ready":
                self.ready.set()
                continue
            with self.lock:
                handle = self.sessions.get(msg[1])
            if handle is not None:
                handle._deliver(msg)

    def _died(self) -> None:
        if self.stopping:
            return
        self.proc.join(1.0)
        text = f"QC worker process {self.proc.pid} exited (code {self.proc.exitcode})"
        log.error("%s; its sessions fail, a new worker serves the next ones", text)
        with self.lock:
            handles = list(self.sessions.values())
        for h in handles:
            h._deliver(("error", h.key, None, text, ""))
        self._on_death(self)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping = True
        try:
            self.inbox.put(("stop", None))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout_s)


class TapHost:
    """Worker processes that run the taps of a server's sessions.

    Args:
        workers: number of worker processes (>= 1); sessions are spread over them in turn.
        preload: modules each worker imports at start (the taps' own modules), so the first
            session does not wait for the imports.

    Raises:
        ValueError: ``workers`` < 1.
    """

    def __init__(self, workers: int = 1, preload: Sequence[str] = DEFAULT_PRELOAD):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._ctx = mp.get_context("spawn")  # fork would copy the server's threads and locks
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self._workers = [_Worker(self._ctx, self._preload, self._replace) for _ in range(workers)]
        self._turn = itertools.count()
        self._keys = itertools.count()
        self.closed = False
        self.broken = False
        self._cpu_s: dict[int, float] = {}
        self._peak_rss = 0.0

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def usage(self) -> tuple[float, float]:
        """``(cpu_s, peak_rss_bytes)`` of the workers: CPU seconds (user + system) of every worker
        this host started, the largest peak resident memory of one; NaN where ``/proc`` is missing.
        A dead worker counts with its last sample."""
        with self._lock:
            pids = [w.proc.pid for w in self._workers]
        for pid in pids:
            cpu, rss = _proc_usage(pid)
            if cpu == cpu:  # not NaN
                self._cpu_s[pid] = cpu
                self._peak_rss = max(self._peak_rss, rss)
        if not self._cpu_s:
            return float("nan"), float("nan")
        return float(sum(self._cpu_s.values())), float(self._peak_rss)

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Whether every worker has started and imported its preload modules."""
        return all(w.ready.wait(timeout_s) for w in self._workers)

    def open(
        self,
        context: SessionContext,
        specs: Sequence[TapSpec],
        on_output: Callable[[int, Any, Trace], None],
        on_span: Callable[[int, str, int, int], None],
        on_error: Callable[[int | None, RemoteTapError], None],
    ) -> RemoteTaps:
        """Build a session's taps in a worker; see :class:`RemoteTaps` for the callbacks."""
        with self._lock:
            if self.closed:
                raise RuntimeError("TapHost is closed")
            worker = self._workers[next(self._turn) % len(self._workers)]
            key = f"{context.session_id}#{next(self._keys)}"
        handle = RemoteTaps(worker, key, [s.index for s in specs], on_output, on_span, on_error)
        with worker.lock:
            worker.sessions[key] = handle
        worker.inbox.put(("open", key, context.header, context.session_id, context.config_name, list(specs)))
        if not worker.proc.is_alive():  # died before it could see the session
            handle._deliver(("error", key, None, f"QC worker process {worker.proc.pid} is not running", ""))
        return handle

    @property
    def available(self) -> bool:
        """False once closed, or when a worker died before it was ready (it cannot start:
        sessions then run their taps on threads, see :class:`inline.engine.ChainRunner`)."""
        return not self.closed and not self.broken

    def _replace(self, dead: _Worker) -> None:
        with self._lock:
            if self.closed or dead not in self._workers:
                return
            if not dead.ready.is_set():  # it could not even start: a new one would not either
                self.broken = True
                log.error("QC worker process could not start; taps run on threads of the server")
                return
            self._workers[self._workers.index(dead)] = _Worker(self._ctx, self._preload, self._replace)

    def close(self) -> None:
        """Stop the workers (sessions still using them lose their remaining findings)."""
        with self._lock:
            self.closed = True
            workers = list(self._workers)
        for w in workers:
            w.stop()
