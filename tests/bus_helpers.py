"""A stand-in for the server's alert bus in tests: a ZeroMQ PUB on a free port and the
messages the server publishes (topics and payloads of :mod:`inline.qc.bus`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import msgpack
import zmq

from inline.qc.alert import Alert, AlertCode, Severity

SESSION = "3f9c2a71d04b4e6e"


def session_start(session: str = SESSION) -> tuple[str, dict[str, Any]]:
    return "event.session.start", {
        "session": session, "time_unix_s": time.time(), "scanner": "SIEMENS Prisma 1.5T AWP66012",
        "series": "t1_fl2d_tra / 66012_1", "config": "default", "peer": "127.0.0.1:51512",
    }  # fmt: skip


def session_end(session: str = SESSION, images: int = 1, error: str | None = None) -> tuple[str, dict[str, Any]]:
    topic, payload = session_start(session)
    payload.update(time_unix_s=time.time(), images=images, error=error)
    return "event.session.end", payload


def image_event(session: str = SESSION, slice_: int = 7, latency_ms: float = 42.5, alerts: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    return "event.image", {
        "session": session, "time_unix_s": time.time(), "series_index": 1, "image_index": slice_ + 1,
        "slice": slice_, "repetition": 0, "latency_ms": latency_ms, "matrix": [256, 256, 1], "alerts": alerts or [],
    }  # fmt: skip


def motion_alert(session: str = SESSION) -> Alert:
    return Alert(
        session=session,
        scanner="SIEMENS Prisma 1.5T AWP66012",
        series="t1_fl2d_tra / 66012_1",
        slices=[6, 7, 8],
        repetition=0,
        severity=Severity.CRITICAL,
        code=AlertCode.MOTION,
        value=4.2,
        threshold=1.5,
        unit="mm",
        message="Patient motion of 4.2 mm during slices 6-8",
        action="Ask the patient to keep still and repeat the series",
        evidence={"displacement_mm": [0.3, 4.2, 3.9]},
    )


def warning_alert(session: str = SESSION) -> Alert:
    return Alert(
        session=session,
        severity=Severity.WARNING,
        code=AlertCode.COIL_DROPOUT,
        message="Coil element 12 is silent",
        action="Check the head coil connector",
    )


class BusPublisher:
    """PUB socket bound to a free port on localhost, publishing as the server does."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.sock.send_multipart([topic.encode(), msgpack.packb(payload, use_bin_type=True)])

    def publish_alert(self, alert: Alert) -> None:
        self.publish(alert.topic, alert.to_record())

    def publish_until(self, topic: str, payload: dict[str, Any], seen: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Publish again until a subscriber has it: PUB drops messages sent before the
        subscription reaches it (ZeroMQ's slow joiner)."""
        deadline = time.monotonic() + timeout_s
        while not seen():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber saw {topic} within {timeout_s} s")
            self.publish(topic, payload)
            time.sleep(0.05)

    def close(self) -> None:
        self.sock.close(0)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)
