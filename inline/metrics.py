"""Prometheus metrics of a server process (prometheus-client), served on localhost.

Nothing is added to the data path: the engine already keeps every gadget call's duration
(:class:`inline.engine.StageTimes`) and the session every image latency and its reader's
byte and message counts. :class:`ServerMetrics` is a custom collector that, when scraped
(and once more when a session ends), folds the samples that are new since its last look
into cumulative histograms, and reads the live counters of the active sessions. A scrape
therefore costs the server a little; a message costs it nothing.

Metrics (``inline_`` prefix; times in seconds, Prometheus' convention):

==========================================  =========  ==================================
name                                        type       labels
==========================================  =========  ==================================
``inline_gadget_seconds``                   histogram  config, stage, gadget
``inline_image_latency_seconds``            histogram  config (last readout -> image sent)
``inline_queue_depth``                      gauge      session, stage (active sessions)
``inline_sessions_active``                  gauge
``inline_sessions_total``                   counter    outcome (ok, error)
``inline_bytes_received_total``             counter
``inline_messages_received_total``          counter
``inline_acquisitions_received_total``      counter
``inline_images_sent_total``                counter    config
``inline_budget_overruns_total``            counter    config, scope (chain, stage), stage
``inline_process_peak_resident_bytes``      gauge      (``getrusage`` maximum RSS)
``inline_gpu_memory_bytes``                 gauge      library (cupy, torch), kind (used, held, peak)
==========================================  =========  ==================================

plus prometheus-client's ``process_*`` (CPU seconds, resident memory) and ``python_*``.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from inline.session import Session

log = logging.getLogger(__name__)

#: Upper bounds of the per-gadget-call histogram [s].
GADGET_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Upper bounds of the image latency histogram [s].
LATENCY_BUCKETS_S = (2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    """Cumulative Prometheus-style histogram fed with nanosecond samples in batches."""

    def __init__(self, bounds_s: tuple[float, ...]):
        self.bounds_s = bounds_s
        self._bounds_ns = np.asarray(bounds_s) * 1e9
        self.counts = np.zeros(len(bounds_s) + 1, dtype=np.int64)  # last: above every bound (+Inf only)
        self.sum_s = 0.0

    def add(self, values_ns: list[int]) -> None:
        if not values_ns:
            return
        v = np.asarray(values_ns, dtype=np.float64)
        # bucket i holds bounds[i-1] < v <= bounds[i] (Prometheus' "le")
        self.counts += np.bincount(np.searchsorted(self._bounds_ns, v, side="left"), minlength=len(self.counts))
        self.sum_s += float(v.sum()) / 1e9

    def buckets(self) -> list[tuple[str, float]]:
        cum = np.cumsum(self.counts)
        return [(repr(float(b)), float(c)) for b, c in zip(self.bounds_s, cum)] + [("+Inf", float(cum[-1]))]


@dataclass
class _Watched:
    """An active session and how far its sample lists have been folded in."""

    session: Session
    stage_offsets: list[int] = field(default_factory=list)
    latency_offset: int = 0


class ServerMetrics:
    """Metrics of one server process; pass it as ``SessionSettings.metrics``.

    Args:
        registry: where to register; a fresh :class:`~prometheus_client.CollectorRegistry`
            (with the process, platform and GC collectors) when omitted, so that several
            servers in one process (tests) do not collide.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.tap_host = None  # the server's inline.tap_process.TapHost, when taps run in workers
        self._lock = threading.Lock()
        self._active: dict[str, _Watched] = {}
        self._gadget: dict[tuple[str, str, str], _Histogram] = {}
        self._latency: dict[str, _Histogram] = {}
        self._sessions_total = {"ok": 0, "error": 0}
        self._retired = {"bytes": 0, "messages": 0, "acquisitions": 0}
        self._images: dict[str, int] = {}
        self._overruns: dict[tuple[str, str, str], int] = {}
        self.http_server: Any = None
        registry.register(self)

    # -- what sessions report --------------------------------------------------------------
    def session_started(self, session: Session) -> None:
        with self._lock:
            self._active[session.id] = _Watched(session)

    def session_ended(self, session: Session) -> None:
        with self._lock:
            watched = self._active.pop(session.id, None)
            if watched is None:
                return
            self._fold(watched)
            self._retired["bytes"] += session.reader.bytes_received
            self._retired["messages"] += session.reader.messages_received
            self._retired["acquisitions"] += session.acquisitions_received
            self._sessions_total["error" if session.error else "ok"] += 1

    def budget_overrun(self, config: str, scope: str, stage: str = "") -> None:
        """A latency budget was exceeded (``scope``: ``"chain"`` or ``"stage"``)."""
        with self._lock:
            key = (config, scope, stage)
            self._overruns[key] = self._overruns.get(key, 0) + 1

    # -- folding samples in -----------------------------------------------------------------
    def _fold(self, w: _Watched) -> None:
        """Add the samples ``w``'s session recorded since the last fold (lock held)."""
        s = w.session
        runner = s.runner
        if runner is None:
            return
        config = runner.context.config_name or s.config_label
        if not w.stage_offsets:
            w.stage_offsets = [0] * len(runner.times)
        for i, st in enumerate(runner.times):
            n = len(st.durations_ns)  # lists only grow (appends from worker threads)
            if n > w.stage_offsets[i]:
                key = (config, st.name, st.gadget)
                hist = self._gadget.get(key) or self._gadget.setdefault(key, _Histogram(GADGET_BUCKETS_S))
                hist.add(st.durations_ns[w.stage_offsets[i] : n])
                w.stage_offsets[i] = n
        n = len(s.latencies_ns)
        if n > w.latency_offset:
            hist = self._latency.get(config) or self._latency.setdefault(config, _Histogram(LATENCY_BUCKETS_S))
            hist.add(s.latencies_ns[w.latency_offset : n])
            self._images[config] = self._images.get(config, 0) + n - w.latency_offset
            w.latency_offset = n

    # -- prometheus-client collector protocol ----------------------------------------------
    def describe(self) -> list:
        return []  # no describe-time work: families are built at collect time

    def collect(self) -> Iterator:
        with self._lock:
            active = list(self._active.values())
            for w in active:
                self._fold(w)
            live_bytes = sum(w.session.reader.bytes_received for w in active)
            live_messages = sum(w.session.reader.messages_received for w in active)
            live_acq = sum(w.session.acquisitions_received for w in active)

            gadget = HistogramMetricFamily("inline_gadget_seconds", "Time of one gadget process/close call", labels=["config", "stage", "gadget"])
            for (config, stage, name), h in sorted(self._gadget.items()):
                gadget.add_metric([config, stage, name], h.buckets(), h.sum_s)
            latency = HistogramMetricFamily(
                "inline_image_latency_seconds", "Image latency from the arrival of its last readout to its send", labels=["config"]
            )
            for config, h in sorted(self._latency.items()):
                latency.add_metric([config], h.buckets(), h.sum_s)
            images = CounterMetricFamily("inline_images_sent", "Images sent to scanners", labels=["config"])
            for config, n in sorted(self._images.items()):
                images.add_metric([config], n)
            overruns = CounterMetricFamily(
                "inline_budget_overruns", "Latency budget overruns (alerted once per series)", labels=["config", "scope", "stage"]
            )
            for key, n in sorted(self._overruns.items()):
                overruns.add_metric(list(key), n)
            sessions = CounterMetricFamily("inline_sessions", "Sessions that ended", labels=["outcome"])
            for outcome, n in self._sessions_total.items():
                sessions.add_metric([outcome], n)
            retired = dict(self._retired)
        depth = GaugeMetricFamily("inline_queue_depth", "Messages waiting in a stage's input queue", labels=["session", "stage"])
        for w in active:
            if w.session.runner is not None:
                for stage, n in w.session.runner.queue_depths().items():
                    depth.add_metric([w.session.id, stage], n)
        yield gadget
        yield latency
        yield depth
        yield GaugeMetricFamily("inline_sessions_active", "Sessions connected now", value=len(active))
        yield sessions
        yield CounterMetricFamily("inline_bytes_received", "Bytes of MRD stream received", value=retired["bytes"] + live_bytes)
        yield CounterMetricFamily("inline_messages_received", "MRD messages received", value=retired["messages"] + live_messages)
        yield CounterMetricFamily("inline_acquisitions_received", "ACQUISITION messages received", value=retired["acquisitions"] + live_acq)
        yield images
        yield overruns
        yield GaugeMetricFamily("inline_process_peak_resident_bytes", "Peak resident memory of this process", value=peak_rss_bytes())
        if self.tap_host is not None:  # QC taps in worker processes: their cost is the server's too
            cpu, rss = self.tap_host.usage()
            yield CounterMetricFamily("inline_qc_worker_cpu_seconds", "CPU time of the QC tap worker processes", value=cpu)
            yield GaugeMetricFamily("inline_qc_worker_peak_resident_bytes", "Largest peak resident memory of a QC tap worker process", value=rss)
        gpu = GaugeMetricFamily("inline_gpu_memory_bytes", "GPU memory held by this process", labels=["library", "kind"])
        for library, kind, value in gpu_memory_bytes():
            gpu.add_metric([library, kind], value)
        yield gpu

    # -- HTTP endpoint ----------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port (``port`` 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.http_server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


def peak_rss_bytes() -> float:
    """Peak resident set size of this process [bytes]; NaN where ``resource`` is missing."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def gpu_memory_bytes() -> list[tuple[str, str, float]]:
    """``(library, kind, bytes)`` for the GPU libraries this process has already imported
    (never imports one: a CPU-only server stays CPU-only)."""
    out: list[tuple[str, str, float]] = []
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            pool = cupy.get_default_memory_pool()
            out += [("cupy", "used", float(pool.used_bytes())), ("cupy", "held", float(pool.total_bytes()))]
        except Exception:  # no device or a broken runtime: report nothing
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out += [("torch", "used", float(torch.cuda.memory_allocated())), ("torch", "peak", float(torch.cuda.max_memory_allocated()))]
        except Exception:
            pass
    return out
