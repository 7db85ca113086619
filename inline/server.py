"""``inline serve``: the MRD TCP server, one thread and one chain per connection.

A failing session never takes the server down: every error is caught at the session
boundary (:mod:`inline.session`) and reported to that scanner only.

Models are loaded once per process and shared by sessions; with ``preload`` the server
warms them up at start, in a background thread, for the shapes the chains declare (the
``warm_up(params)`` classmethod of a gadget, e.g. :class:`gadgets.dl_recon.DLRecon`).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from inline.allocator import tune_process
from inline.journal import recover
from inline.session import Session, SessionSettings

if TYPE_CHECKING:
    from inline.config import Stage

log = logging.getLogger(__name__)


# -- model warm-up at server start ---------------------------------------------------------
#: ``preload`` value meaning every config on the search path with a gadget that has a warm-up hook.
PRELOAD_ALL = "all"


def warmup_stages(names: Sequence[str] | None, search_path: list[Path]) -> list[tuple[str, Stage]]:
    """``(config name, Stage)`` of every stage whose gadget class declares a ``warm_up(params)``
    classmethod, in the configs ``names`` (None: every config on ``search_path``). A config that
    does not load or validate is skipped with a log line (a warning when it was named)."""
    from inline.config import ConfigError, available_configs, load_chain, validate_chain

    found = []
    for name in available_configs(search_path) if names is None else names:
        try:
            stages = validate_chain(load_chain(name, search_path))
        except ConfigError as e:
            log.log(logging.DEBUG if names is None else logging.WARNING, "warm-up: config %s skipped: %s", name, e)
            continue
        found += [(name, st) for st in stages if callable(getattr(st.cls, "warm_up", None))]
    return found


def warm_up_chains(names: Sequence[str] | None, search_path: list[Path]) -> dict[str, str]:
    """Call the warm-up hook of every stage :func:`warmup_stages` finds, once per distinct
    (gadget class, parameters); returns ``{"config/stage": what happened}``. Never raises."""
    results: dict[str, str] = {}
    done: dict[tuple, str] = {}
    t_all = time.perf_counter()
    for config, stage in warmup_stages(names, search_path):
        label = f"{config}/{stage.name}"
        key = (stage.cls, stage.params.model_dump_json())
        if key in done:
            results[label] = f"same as {done[key]}"
            continue
        done[key] = label
        t0 = time.perf_counter()
        try:
            detail = stage.cls.warm_up(stage.params)
        except Exception as e:  # a model that cannot load must not stop the server: sessions fall back
            results[label] = f"failed: {type(e).__name__}: {e}"
            log.warning("warm-up of %s (%s) failed after %.1f s: %s: %s", label, stage.cls.__name__, time.perf_counter() - t0, type(e).__name__, e)
            continue
        results[label] = f"ok in {time.perf_counter() - t0:.2f} s: {detail}"
        log.info("warm-up of %s (%s) took %.2f s: %s", label, stage.cls.__name__, time.perf_counter() - t0, detail)
    log.info("warm-up finished in %.2f s (%d stages)", time.perf_counter() - t_all, len(results))
    return results


class _Handler(socketserver.BaseRequestHandler):
    server: "InlineServer"

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(self.request, self.server.settings)
        with self.server.lock:
            self.server.active[session.id] = session
        try:
            session.run()
        finally:
            with self.server.lock:
                self.server.active.pop(session.id, None)
                self.server.finished.append(session)
                del self.server.finished[:-100]


class InlineServer(socketserver.ThreadingTCPServer):
    """MRD streaming server.

    Args:
        host, port: address to listen on (port 0 picks a free port; see :attr:`port`).
        settings: what every session uses (configs, journal, limits, alert bus).
        bus_endpoint: bind an alert bus here (e.g. ``tcp://127.0.0.1:5557``) unless
            ``settings.bus`` is already set; None: no bus.
        preload: chain configs whose gadgets' models are loaded and warmed up at start, in a
            background thread (:func:`warm_up_chains`; :attr:`warmup_done` is set when it
            ends, :attr:`warmup_results` says what happened); :data:`PRELOAD_ALL`: every
            config with a warm-up hook; None: none.
        metrics_port: serve Prometheus metrics (:mod:`inline.metrics`) on
            ``127.0.0.1:metrics_port`` (0 picks a free port, see :attr:`metrics_port`), creating
            ``settings.metrics`` unless set; None: no endpoint. A port that cannot be bound is
            logged and skipped: metrics never stop the scanner's server.
        tap_workers: run the sessions' QC taps in this many worker processes
            (:class:`inline.tap_process.TapHost`, created unless ``settings.tap_host`` is set),
            so their checks never hold this process's interpreter lock; 0: taps on threads of
            this process.
    """

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9002,
        settings: SessionSettings | None = None,
        bus_endpoint: str | None = None,
        preload: Sequence[str] | str | None = None,
        metrics_port: int | None = None,
        tap_workers: int = 0,
    ):
        tune_process()
        self.settings = settings or SessionSettings()
        self._own_bus = None
        if bus_endpoint and self.settings.bus is None:
            from inline.qc.bus import AlertBus

            self._own_bus = self.settings.bus = AlertBus(bus_endpoint)
        self.metrics_port: int | None = None
        if metrics_port is not None:
            from inline.metrics import ServerMetrics

            if self.settings.metrics is None:
                self.settings.metrics = ServerMetrics()
            try:
                self.metrics_port = self.settings.metrics.serve(metrics_port)
                log.info("metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
            except OSError as e:
                log.warning("metrics endpoint on 127.0.0.1:%d not started: %s", metrics_port, e)
        self._own_tap_host = None
        if tap_workers > 0 and self.settings.tap_host is None:
            from inline.tap_process import TapHost

            self._own_tap_host = self.settings.tap_host = TapHost(tap_workers)
        if self.settings.metrics is not None:
            self.settings.metrics.tap_host = self.settings.tap_host
        self.active: dict[str, Session] = {}
        self.finished: list[Session] = []
        self.lock = threading.Lock()
        if self.settings.journal_dir is not None:
            for p in recover(self.settings.journal_dir):
                log.warning("recovered journal %s left by an earlier run", p)
        super().__init__((host, port), _Handler)
        self.warmup_results: dict[str, str] = {}
        self.warmup_done = threading.Event()
        if preload is None:
            self.warmup_done.set()
        else:
            names = None if preload == PRELOAD_ALL else list(preload)
            threading.Thread(target=self._warm_up, args=(names,), name="inline-warmup", daemon=True).start()

    def _warm_up(self, names: list[str] | None) -> None:
        from inline.config import config_search_path

        try:
            self.warmup_results.update(warm_up_chains(names, config_search_path(self.settings.config_dirs)))
        except Exception:  # a bug of ours: log it, keep serving
            log.exception("warm-up failed")
        finally:
            self.warmup_done.set()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, demo); stop with :meth:`stop`."""
        t = threading.Thread(target=self.serve_forever, name="inline-server", daemon=True)
        t.start()
        log.info("serving on %s:%d", *self.server_address[:2])
        return t

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self.metrics_port is not None:
            self.settings.metrics.stop()
        if self._own_bus is not None:
            self._own_bus.close()

    def server_close(self) -> None:
        super().server_close()
        if self._own_tap_host is not None:  # also on leaving ``with InlineServer(...)``
            self._own_tap_host.close()


def serve(
    host: str,
    port: int,
    settings: SessionSettings,
    bus_endpoint: str | None = None,
    dashboard_port: int | None = None,
    preload: Sequence[str] | str | None = None,
    metrics_port: int | None = None,
    tap_workers: int = 1,
) -> None:
    """Run the server in the foreground until interrupted; with a bus, also the dashboard on
    ``127.0.0.1:dashboard_port`` (None: no dashboard); ``preload``, ``metrics_port`` and
    ``tap_workers`` as :class:`InlineServer`."""
    with InlineServer(
        host, port, settings, bus_endpoint=bus_endpoint, preload=preload, metrics_port=metrics_port, tap_workers=tap_workers
    ) as server:
        dashboard = None
        if settings.bus is not None and dashboard_port is not None:
            from inline.dashboard import DashboardServer

            dashboard = DashboardServer(settings.bus.endpoint, "127.0.0.1", dashboard_port).start()
            log.info("dashboard on %s", dashboard.url)
        log.info(
            "inline serving on %s:%d (journal: %s, alert bus: %s)",
            host,
            server.port,
            settings.journal_dir or "off",
            settings.bus.endpoint if settings.bus is not None else "off",
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("interrupted; stopping")
        finally:
            if dashboard is not None:
                dashboard.stop()
