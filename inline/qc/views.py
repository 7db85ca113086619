"""The radiographer's view of the alert bus: one state model shared by console and dashboard.

:class:`ViewState` is a pure, thread-safe model fed with the ``(topic, payload)`` pairs the
server publishes on the alert bus (:mod:`inline.qc.bus`): sessions, the latest images with
their latencies, alerts newest first and their acknowledgement. :class:`BusSubscriber`
feeds it from a ZeroMQ SUB socket in a thread. ``inline console`` (:mod:`inline.console`)
and the web dashboard (:mod:`inline.dashboard`) render the same :meth:`ViewState.to_dict`.

Bus topics (multipart ``[topic, msgpack payload]``):

- ``alert.<severity>.<code>``: :meth:`inline.qc.alert.Alert.to_record`;
- ``event.session.start`` / ``event.session.end``: session id, scanner, series, config, peer
  (+ images, error at end);
- ``event.image``: session, indices, ``latency_ms``, matrix, alert codes;
- ``event.alert.ack``: ``{"id": ...}`` or ``{"all": true}`` (optional: acknowledgement made
  elsewhere, shared by every view).

Acknowledgement is otherwise local to one view.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

SEVERITIES = ("critical", "warning", "info")


def _severity_of(topic: str, payload: dict[str, Any]) -> str:
    sev = str(payload.get("severity") or (topic.split(".")[1] if topic.count(".") >= 2 else "info"))
    return sev if sev in SEVERITIES else "info"


class ViewState:
    """What the radiographer sees: sessions, latest images, alerts and their acknowledgement.

    Feed it with :meth:`feed`; read it with :meth:`to_dict` (JSON-serialisable). Every
    change bumps :attr:`version` and wakes :meth:`wait_for_change`.

    Args:
        max_images: latest images kept [images].
        max_alerts: alerts kept, active and acknowledged together (oldest acknowledged go first).
        max_sessions: sessions kept (oldest ended go first).
        max_events: bus messages kept for :meth:`events_since` (server-sent events).
        clock: wall clock [s since the epoch] (injectable for tests).
    """

    def __init__(
        self,
        max_images: int = 20,
        max_alerts: int = 200,
        max_sessions: int = 20,
        max_events: int = 500,
        clock: Callable[[], float] = time.time,
    ):
        self.max_images = max_images
        self.max_alerts = max_alerts
        self.max_sessions = max_sessions
        self.clock = clock
        self.endpoint = ""
        self._cond = threading.Condition(threading.Lock())
        self._version = 0
        self._sessions: dict[str, dict[str, Any]] = {}
        self._images: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_images)
        self._alerts: dict[str, dict[str, Any]] = {}  # id -> alert, insertion = arrival order
        self._alert_number = 0
        self._events: collections.deque[tuple[int, str, Any]] = collections.deque(maxlen=max_events)
        self._messages = 0
        self._errors = 0
        self._last_message_unix_s: float | None = None

    # -- feeding ---------------------------------------------------------------------

    def feed(self, topic: str | bytes, payload: Any) -> bool:
        """Apply one bus message; returns False (and counts a bus error) when it is not understood."""
        if isinstance(topic, bytes):
            topic = topic.decode("utf-8", "replace")
        with self._cond:
            self._messages += 1
            self._last_message_unix_s = self.clock()
            ok = isinstance(payload, dict)
            try:
                if ok and topic.startswith("alert."):
                    self._on_alert(topic, payload)
                elif ok and topic == "event.session.start":
                    self._on_session(payload, active=True)
                elif ok and topic == "event.session.end":
                    self._on_session(payload, active=False)
                elif ok and topic == "event.image":
                    self._on_image(payload)
                elif ok and topic == "event.alert.ack":
                    self._on_remote_ack(payload)
                else:
                    ok = False
            except (KeyError, TypeError, ValueError) as e:
                log.warning("bus message %s not understood: %s", topic, e)
                ok = False
            if not ok:
                self._errors += 1
            self._changed(topic, payload)
            return ok

    def _on_alert(self, topic: str, payload: dict[str, Any]) -> None:
        alert_id = str(payload.get("id") or f"anon-{self._alert_number + 1}")
        if alert_id in self._alerts:
            return
        self._alert_number += 1
        alert = dict(payload)
        alert.update(
            id=alert_id,
            number=self._alert_number,
            severity=_severity_of(topic, payload),
            code=str(payload.get("code") or topic.split(".", 2)[-1]),
            message=str(payload.get("message", "")),
            action=str(payload.get("action", "")),
            received_unix_s=self.clock(),
            acknowledged=False,
            acknowledged_unix_s=None,
        )
        self._alerts[alert_id] = alert
        session = self._sessions.get(str(alert.get("session", "")))
        if session is not None:
            session["alerts"] += 1
        self._trim_alerts()

    def _trim_alerts(self) -> None:
        excess = len(self._alerts) - self.max_alerts
        if excess <= 0:
            return
        # oldest acknowledged alerts go first, then the oldest active ones
        order = [a for a in self._alerts.values() if a["acknowledged"]] + [a for a in self._alerts.values() if not a["acknowledged"]]
        for a in order[:excess]:
            del self._alerts[a["id"]]

    def _session(self, session_id: str) -> dict[str, Any]:
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = {
                "id": session_id, "scanner": "", "series": "", "config": "", "peer": "",
                "active": True, "started_unix_s": None, "ended_unix_s": None, "images": 0,
                "error": None, "latency_last_ms": None, "latency_max_ms": None, "alerts": 0,
            }  # fmt: skip
            self._trim_sessions()
        return s

    def _trim_sessions(self) -> None:
        while len(self._sessions) > self.max_sessions:
            ended = [k for k, s in self._sessions.items() if not s["active"]]
            del self._sessions[(ended or list(self._sessions))[0]]

    def _on_session(self, payload: dict[str, Any], active: bool) -> None:
        s = self._session(str(payload["session"]))
        for key in ("scanner", "series", "config", "peer"):
            if payload.get(key) is not None:
                s[key] = str(payload[key])
        s["active"] = active
        t = payload.get("time_unix_s")
        if active:
            s["started_unix_s"] = t
        else:
            s["ended_unix_s"] = t
            if payload.get("images") is not None:
                s["images"] = int(payload["images"])
            s["error"] = payload.get("error")

    def _on_image(self, payload: dict[str, Any]) -> None:
        image = dict(payload)
        image["session"] = str(payload["session"])
        latency = payload.get("latency_ms")
        image["latency_ms"] = None if latency is None else float(latency)
        image["alerts"] = [str(c) for c in payload.get("alerts") or []]
        self._images.appendleft(image)
        s = self._session(image["session"])
        s["images"] += 1
        if image["latency_ms"] is not None:
            s["latency_last_ms"] = image["latency_ms"]
            s["latency_max_ms"] = max(s["latency_max_ms"] or 0.0, image["latency_ms"])

    def _on_remote_ack(self, payload: dict[str, Any]) -> None:
        if payload.get("all"):
            self._ack_all()
        else:
            self._ack(str(payload["id"]))

    # -- acknowledgement -------------------------------------------------------------

    def ack(self, alert_id: str) -> bool:
        """Acknowledge one alert by id; False when there is no such active alert."""
        with self._cond:
            done = self._ack(alert_id)
            if done:
                self._changed("view.ack", {"id": alert_id})
            return done

    def ack_number(self, number: int) -> bool:
        """Acknowledge one alert by its display number (``#n``, stable per view)."""
        with self._cond:
            alert_id = next((a["id"] for a in self._alerts.values() if a["number"] == number), None)
        return alert_id is not None and self.ack(alert_id)

    def ack_all(self) -> int:
        """Acknowledge every active alert; returns how many."""
        with self._cond:
            n = self._ack_all()
            if n:
                self._changed("view.ack", {"all": True, "count": n})
            return n

    def _ack(self, alert_id: str) -> bool:
        a = self._alerts.get(alert_id)
        if a is None or a["acknowledged"]:
            return False
        a["acknowledged"] = True
        a["acknowledged_unix_s"] = self.clock()
        return True

    def _ack_all(self) -> int:
        return sum(self._ack(i) for i in list(self._alerts))

    # -- reading ---------------------------------------------------------------------

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def _changed(self, topic: str, payload: Any) -> None:
        self._version += 1
        self._events.append((self._version, topic, payload))
        self._cond.notify_all()

    def wait_for_change(self, since_version: int, timeout: float | None = None) -> int:
        """Block until :attr:`version` exceeds ``since_version``, :meth:`wake` or timeout; returns the version."""
        with self._cond:
            if self._version <= since_version:
                self._cond.wait(timeout)
            return self._version

    def wake(self) -> None:
        """Wake every :meth:`wait_for_change` (to let waiters see a stop flag)."""
        with self._cond:
            self._cond.notify_all()

    def events_since(self, version: int) -> list[tuple[int, str, Any]]:
        """Messages and acknowledgements after ``version``: ``(version, topic, payload)``, oldest first."""
        with self._cond:
            return [e for e in self._events if e[0] > version]

    def counts(self, include_acknowledged: bool = False) -> dict[str, int]:
        """Alerts per severity (active only by default)."""
        with self._cond:
            return self._counts(list(self._alerts.values()), include_acknowledged)

    def to_dict(self) -> dict[str, Any]:
        """Snapshot for rendering and ``/api/state`` (JSON-serialisable copies, newest first)."""
        with self._cond:
            alerts = [dict(a) for a in reversed(self._alerts.values())]
            sessions = sorted(
                (dict(s) for s in self._sessions.values()),
                key=lambda s: (not s["active"], -(s["started_unix_s"] or 0.0)),
            )
            return {
                "version": self._version,
                "endpoint": self.endpoint,
                "now_unix_s": self.clock(),
                "messages": self._messages,
                "bus_errors": self._errors,
                "last_message_unix_s": self._last_message_unix_s,
                "counts": self._counts(alerts, False),
                "counts_total": self._counts(alerts, True),
                "sessions": sessions,
                "images": [dict(i) for i in self._images],
                "alerts": [a for a in alerts if not a["acknowledged"]],
                "acknowledged": [a for a in alerts if a["acknowledged"]],
            }

    @staticmethod
    def _counts(alerts: list[dict[str, Any]], include_acknowledged: bool) -> dict[str, int]:
        out = dict.fromkeys(SEVERITIES, 0)
        for a in alerts:
            if include_acknowledged or not a["acknowledged"]:
                out[a["severity"]] += 1
        return out


class BusSubscriber:
    """A thread that subscribes to the alert bus and feeds a :class:`ViewState`.

    Args:
        state: the model to feed (its ``endpoint`` is set to ``endpoint``).
        endpoint: the server's PUB address, e.g. ``tcp://127.0.0.1:5557``.
        topics: topic prefixes to subscribe to.
        poll_ms: how often the thread checks for :meth:`stop` [ms].
    """

    def __init__(self, state: ViewState, endpoint: str, topics: tuple[bytes, ...] = (b"alert.", b"event."), poll_ms: int = 100):
        self.state = state
        self.endpoint = endpoint
        self.topics = topics
        self.poll_ms = poll_ms
        state.endpoint = endpoint
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> "BusSubscriber":
        """Connect and start receiving; returns once the socket is connected."""
        self._thread = threading.Thread(target=self._run, name=f"bus-subscriber {self.endpoint}", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BusSubscriber":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        import msgpack
        import zmq

        ctx = zmq.Context.instance()
        try:
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            for t in self.topics:
                sock.setsockopt(zmq.SUBSCRIBE, t)
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            self.error = ValueError(f"cannot subscribe to the alert bus at {self.endpoint!r}: {e}")
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(self.poll_ms):
                    continue
                frames = sock.recv_multipart()
                if len(frames) < 2:
                    self.state.feed(frames[0] if frames else b"", None)
                    continue
                try:
                    payload = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
                    log.warning("undecodable bus message on %r: %s", frames[0], e)
                    payload = None
                self.state.feed(frames[0], payload)
        finally:
            sock.close(0)
