"""The alert bus: ZeroMQ PUB with msgpack payloads, and the session's JSONL alert log.

Wire format (any language with ZeroMQ and msgpack can subscribe; see ``docs/alerts.md``):
two-frame messages ``[topic, payload]``; ``topic`` is UTF-8, ``payload`` a msgpack map.

    topic                          payload
    -----------------------------  ------------------------------------------------------
    alert.<severity>.<code>        Alert.to_record(): id, time_unix_s, session, scanner,
                                   series, slices, repetition, severity, code, value,
                                   threshold, unit, message, action, evidence, latency_ms
    event.session.start            session, time_unix_s, scanner, series, config, peer
    event.session.end              ... plus images, alerts, error
    event.image                    session, time_unix_s, series_index, image_index, slice,
                                   repetition, latency_ms, matrix, alerts

Subscribers filter by topic prefix: ``alert.critical.`` for critical alerts only,
``alert.`` for all alerts, ``event.`` for the activity feed. PUB drops messages for
subscribers that are not connected yet (ZeroMQ's "slow joiner"): the bus is a live feed;
the JSONL log is the record.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import msgpack
import zmq

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


class AlertBus:
    """PUB socket shared by every session of a server process (thread-safe).

    Args:
        endpoint: ZeroMQ endpoint to bind, e.g. ``tcp://127.0.0.1:5557``; ``tcp://127.0.0.1:*``
            picks a free port (see :attr:`endpoint` after binding).

    Raises:
        zmq.ZMQError: the endpoint cannot be bound (in use, bad address).
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT):
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 10000)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self.published = 0
        log.info("alert bus on %s", self.endpoint)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        data = msgpack.packb(payload, use_bin_type=True, default=_default)
        with self._lock:
            self._socket.send_multipart([topic.encode(), data])
            self.published += 1

    def close(self) -> None:
        with self._lock:
            self._socket.close(0)


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays in evidence
        return obj.tolist()
    return str(obj)


def decode(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    """``[topic, payload]`` frames -> (topic, dict)."""
    topic, data = frames
    return topic.decode(), msgpack.unpackb(data, raw=False)


class AlertLog:
    """Append-only JSONL log of one session's alerts (one JSON object per line, flushed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(record, default=_default) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL alert log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
