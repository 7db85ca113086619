"""The QC dashboard: one web page for the control room, live from the alert bus.

A stdlib HTTP server (no web framework) that subscribes to the server's alert bus
(:class:`inline.qc.views.BusSubscriber`) and serves:

=========================  ==============================================================
``GET /``                  the page (``inline/qc/static/dashboard.html``: large type,
                           severity-coloured alert cards with message and action, the
                           sessions strip, latest images with latency)
``GET /api/state``         :meth:`inline.qc.views.ViewState.to_dict` as JSON
``GET /events``            server-sent events: ``bus`` (each bus message and
                           acknowledgement: ``{"version", "topic", "payload"}``) then
                           ``state`` (the whole state) after every change
``POST /api/ack/<id>``     acknowledge one alert (404 when no such active alert)
``POST /api/ack_all``      acknowledge every active alert
=========================  ==============================================================

Served on 127.0.0.1 by default; acknowledgement is local to this dashboard. POSTs from
another origin (a web page elsewhere driving the browser) are refused.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from inline.qc.views import BusSubscriber, ViewState

log = logging.getLogger(__name__)

SSE_KEEPALIVE_S = 10.0


def page_html() -> bytes:
    return resources.files("inline.qc").joinpath("static/dashboard.html").read_bytes()


def _finite(obj: Any) -> Any:
    """NaN and infinities as null (browsers' JSON.parse refuses them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, default=str, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(obj), default=str, allow_nan=False, separators=(",", ":"))
    return text.encode()


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.dashboard.page, "text/html; charset=utf-8")
        elif path == "/api/state":
            self._send(HTTPStatus.OK, _json(self.server.dashboard.state.to_dict()))
        elif path == "/events":
            self._events()
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._send(HTTPStatus.NOT_FOUND, _json({"error": f"no such page {path}"}))

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            self._send(HTTPStatus.FORBIDDEN, _json({"error": "cross-origin acknowledgement refused"}))
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = urlsplit(self.path).path
        state = self.server.dashboard.state
        if path == "/api/ack_all":
            self._send(HTTPStatus.OK, _json({"ok": True, "acknowledged": state.ack_all()}))
        elif path.startswith("/api/ack/"):
            alert_id = unquote(path[len("/api/ack/") :])
            ok = state.ack(alert_id)
            self._send(HTTPStatus.OK if ok else HTTPStatus.NOT_FOUND, _json({"ok": ok, "id": alert_id}))
        else:
            self._send(HTTPStatus.NOT_FOUND, _json({"error": f"no such action {path}"}))

    def _events(self) -> None:
        """Server-sent events until the client goes or the dashboard stops."""
        dash = self.server.dashboard
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            snap = dash.state.to_dict()
            version = snap["version"]
            self._event("state", snap)
            while not dash.stopping.is_set():
                new = dash.state.wait_for_change(version, timeout=SSE_KEEPALIVE_S)
                if dash.stopping.is_set():
                    break
                if new == version:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                for v, topic, payload in dash.state.events_since(version):
                    self._event("bus", {"version": v, "topic": topic, "payload": payload}, flush=False)
                snap = dash.state.to_dict()
                version = snap["version"]
                self._event("state", snap)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return

    def _event(self, name: str, data: Any, flush: bool = True) -> None:
        self.wfile.write(b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n")
        if flush:
            self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    dashboard: "DashboardServer"


class DashboardServer:
    """The dashboard's HTTP server and its own bus subscriber.

    Args:
        bus_endpoint: the server's alert bus, e.g. ``tcp://127.0.0.1:5557``.
        host: address to listen on (localhost by default: the page has no authentication).
        port: TCP port (0 picks a free port; read :attr:`port` after :meth:`start`).
        state: the view model to show (a new :class:`ViewState` by default).
    """

    def __init__(self, bus_endpoint: str, host: str = "127.0.0.1", port: int = 8080, state: ViewState | None = None):
        self.bus_endpoint = bus_endpoint
        self.host = host
        self._port = port
        self.state = state or ViewState()
        self.page = page_html()
        self.stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._subscriber: BusSubscriber | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "DashboardServer":
        """Subscribe to the bus and serve in a background thread; returns self."""
        self.stopping.clear()
        self._subscriber = BusSubscriber(self.state, self.bus_endpoint).start()
        try:
            self._httpd = _HTTPServer((self.host, self._port), _Handler)
        except OSError:
            self._subscriber.stop()
            raise
        self._httpd.dashboard = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-http", daemon=True)
        self._thread.start()
        log.info("QC dashboard on %s (bus %s)", self.url, self.bus_endpoint)
        return self

    def stop(self) -> None:
        """Stop serving (open event streams end) and unsubscribe."""
        self.stopping.set()
        self.state.wake()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._subscriber is not None:
            self._subscriber.stop()

    def serve_forever(self) -> None:
        """Start and block until Ctrl-C (for a stand-alone ``inline dashboard``)."""
        self.start()
        try:
            self.stopping.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
