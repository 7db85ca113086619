"""``inline serve``: the MRD TCP server, one thread and one chain per connection.

A failing session never takes the server down: every error is caught at the session
boundary (:mod:`inline.session`) and reported to that scanner only.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading

from inline.allocator import tune_process
from inline.journal import recover
from inline.session import Session, SessionSettings

log = logging.getLogger(__name__)


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
    ):
        tune_process()
        self.settings = settings or SessionSettings()
        self._own_bus = None
        if bus_endpoint and self.settings.bus is None:
            from inline.qc.bus import AlertBus

            self._own_bus = self.settings.bus = AlertBus(bus_endpoint)
        self.active: dict[str, Session] = {}
        self.finished: list[Session] = []
        self.lock = threading.Lock()
        if self.settings.journal_dir is not None:
            for p in recover(self.settings.journal_dir):
                log.warning("recovered journal %s left by an earlier run", p)
        super().__init__((host, port), _Handler)

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
        if self._own_bus is not None:
            self._own_bus.close()


def serve(host: str, port: int, settings: SessionSettings, bus_endpoint: str | None = None, dashboard_port: int | None = None) -> None:
    """Run the server in the foreground until interrupted; with a bus, also the dashboard on
    ``127.0.0.1:dashboard_port`` (None: no dashboard)."""
    with InlineServer(host, port, settings, bus_endpoint=bus_endpoint) as server:
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
