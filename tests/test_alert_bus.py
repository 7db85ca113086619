"""Alerts raised by the runtime itself (recon failure, latency budget) reach the bus, the
JSONL log and the scanner; the bus wire format decodes as documented."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from conftest import wait_for_files
from inline.client import send_scan
from inline.mrdfile import read_scan
from inline.qc.alert import Alert
from inline.qc.bus import AlertBus, decode, read_log
from inline.server import InlineServer
from inline.session import SessionSettings

pytestmark = pytest.mark.timeout(120)


class Collector:
    """SUB socket collecting every bus message in a thread."""

    def __init__(self, endpoint: str, prefix: bytes = b""):
        self.messages: list[tuple[str, dict]] = []
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self._sub.setsockopt(zmq.RCVTIMEO, 100)
        self._sub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # let the subscription reach the publisher (slow joiner)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.messages.append(decode(self._sub.recv_multipart()))
            except zmq.Again:
                continue

    def wait_for(self, topic_prefix: str, timeout_s: float = 10.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [m for m in self.messages if m[0].startswith(topic_prefix)]
            if found:
                return found
            time.sleep(0.02)
        return []

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self._sub.close(0)


@pytest.fixture
def bus_server(tmp_path):
    srv = InlineServer("127.0.0.1", 0, SessionSettings(journal_dir=tmp_path / "journal", idle_timeout_s=5.0), bus_endpoint="tcp://127.0.0.1:*")
    srv.start_background()
    collector = Collector(srv.settings.bus.endpoint)
    yield srv, collector
    collector.close()
    srv.stop()


def test_wire_format_is_two_frames_topic_and_msgpack_map():
    bus = AlertBus("tcp://127.0.0.1:*")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alert.critical.")
    sub.setsockopt(zmq.RCVTIMEO, 3000)
    sub.connect(bus.endpoint)
    time.sleep(0.3)
    a = Alert(severity="critical", code="coil_dropout", message="Coil element 7 dead.", action="Check the coil connector.")
    bus.publish("alert.warning.motion", {"ignored": True})  # filtered out by the prefix
    bus.publish(a.topic, a.to_record())
    topic, data = sub.recv_multipart()
    assert topic == b"alert.critical.coil_dropout"
    record = msgpack.unpackb(data, raw=False)
    assert record["code"] == "coil_dropout" and record["severity"] == "critical" and record["action"] == "Check the coil connector."
    assert Alert.from_record(record) == a
    sub.close(0)
    bus.close()


def test_gadget_failure_raises_a_recon_failure_alert(bus_server, small_scan):
    srv, bus = bus_server
    chain = "name: toy\ngadgets:\n  - {name: fail, class: 'toy_gadgets:FailOnLine'}\n"
    res = send_scan(read_scan(small_scan), "127.0.0.1", srv.port, config_name=None, config_text=chain)
    assert res.errors
    (topic, record), *_ = bus.wait_for("alert.critical.recon_failure")
    assert "cannot handle line 10" in record["message"] and "Raw data are kept" in record["message"]
    (log,) = wait_for_files(srv.settings.journal_dir, "*.alerts.jsonl")
    assert [r["code"] for r in read_log(log)] == ["recon_failure"]
    assert bus.wait_for("event.session.end")[0][1]["error"]


def test_latency_budget_overrun_is_alerted_once(bus_server, small_scan):
    srv, bus = bus_server
    chain = (
        "name: budgeted\nbudget_ms: 10000\ngadgets:\n"
        "  - {name: slow, class: 'toy_gadgets:SlowOnLine', budget_ms: 20}\n"
        "  - {name: noise, class: NoiseAdjust}\n  - {name: ro, class: RemoveReadoutOversampling}\n"
        "  - {name: acc, class: AcquisitionAccumulateTrigger}\n  - {name: fft, class: FFTRecon}\n"
        "  - {name: rss, class: CoilCombine}\n  - {name: finish, class: ImageFinish}\n"
    )
    res = send_scan(read_scan(small_scan), "127.0.0.1", srv.port, config_name=None, config_text=chain)
    assert res.closed and not res.errors and len(res.images) == 2
    alerts = bus.wait_for("alert.warning.latency_budget")
    assert len(alerts) == 1  # the slow line occurs in both repetitions: one alert per series
    record = alerts[0][1]
    assert record["evidence"]["stage"] == "slow" and record["value"] > 20 and record["threshold"] == 20
    texts = [t for t in res.texts if "[latency_budget]" in t]
    assert len(texts) == 1 and texts[0].startswith("WARNING ")
    images = bus.wait_for("event.image")
    assert len(images) == 2 and all(m[1]["latency_ms"] > 0 for m in images)
