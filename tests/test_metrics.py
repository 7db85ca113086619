"""The Prometheus endpoint of ``inline serve``, scraped over HTTP after a real session: the
counters and histograms count what was sent (acquisitions, bytes, messages, images, gadget
calls, budget overruns); the chain budget alerts once per series. No timing is asserted."""

from __future__ import annotations

import io
import socket
import time
import urllib.request

import ismrmrd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inline.client import send_scan
from inline.mrdfile import read_scan
from inline.protocol import ConfigText, MessageWriter
from inline.server import InlineServer
from inline.session import SessionSettings

pytestmark = pytest.mark.timeout(120)

#: Every image is over the chain budget (0.001 ms); the first readouts of line 5 are over the stage's.
CHAIN = (
    "name: metered\nbudget_ms: 0.001\ngadgets:\n"
    "  - {name: slow, class: 'toy_gadgets:SlowOnLine', budget_ms: 20}\n"
    "  - {name: noise, class: NoiseAdjust}\n  - {name: ro, class: RemoveReadoutOversampling}\n"
    "  - {name: acc, class: AcquisitionAccumulateTrigger}\n  - {name: fft, class: FFTRecon}\n"
    "  - {name: rss, class: CoilCombine}\n  - {name: finish, class: ImageFinish}\n"
)


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    found = [v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert found, f"{name}{labels} not exported"
    return sum(found)


def scrape_when_idle(port: int, sessions: int, timeout_s: float = 10.0) -> dict:
    """The session ends (and is folded in) just after its CLOSE: wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(port)
        if value(m, "inline_sessions_active") == 0 and sum(v for _, v in m["inline_sessions_total"]) >= sessions:
            return m
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.05)


def stream_bytes(scan, chain: str) -> int:
    buf = io.BytesIO()
    w = MessageWriter(buf, flush=False)
    w.send(ConfigText(chain))
    w.send_header(scan.header_xml)
    for item in scan.items:
        w.send(item)
    w.send_close()
    return w.bytes_sent


@pytest.fixture
def metered_server(tmp_path):
    srv = InlineServer("127.0.0.1", 0, SessionSettings(alert_log_dir=tmp_path, idle_timeout_s=5.0), metrics_port=0)
    srv.start_background()
    yield srv
    srv.stop()


def test_counters_and_histograms_count_a_real_session(metered_server, small_scan):
    srv = metered_server
    assert srv.metrics_port
    before = scrape(srv.metrics_port)
    assert value(before, "inline_acquisitions_received_total") == 0 and value(before, "inline_sessions_active") == 0

    scan = read_scan(small_scan)
    res = send_scan(scan, "127.0.0.1", srv.port, config_name=None, config_text=CHAIN)
    assert res.closed and not res.errors and len(res.images) == 2
    m = scrape_when_idle(srv.metrics_port, 1)

    acqs = scan.acquisitions
    noise = sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs)
    assert noise > 0
    assert value(m, "inline_acquisitions_received_total") == len(acqs)
    assert value(m, "inline_messages_received_total") == len(scan.items) + 3  # config, header, CLOSE
    assert value(m, "inline_bytes_received_total") == stream_bytes(scan, CHAIN)
    assert value(m, "inline_sessions_total", outcome="ok") == 1 and value(m, "inline_sessions_total", outcome="error") == 0
    assert value(m, "inline_sessions_active") == 0

    # image latency: one observation per image sent
    assert value(m, "inline_image_latency_seconds_count", config="metered") == len(res.images)
    assert value(m, "inline_images_sent_total", config="metered") == len(res.images)
    buckets = [(float(lab["le"]), v) for lab, v in m["inline_image_latency_seconds_bucket"]]
    assert [v for _, v in sorted(buckets)] == sorted(v for _, v in buckets)  # cumulative
    assert max(buckets)[1] == len(res.images)  # +Inf holds everything

    # per-gadget time: one observation per process call (accepted messages) plus close
    calls = {lab["stage"]: v for lab, v in m["inline_gadget_seconds_count"]}
    assert calls["slow"] == len(acqs) + 1 and calls["noise"] == len(acqs) + 1
    assert calls["ro"] == calls["acc"] == len(acqs) - noise + 1  # noise readouts stop at NoiseAdjust
    assert calls["fft"] == calls["rss"] == calls["finish"] == len(res.images) + 1
    assert all(lab["config"] == "metered" for lab, _ in m["inline_gadget_seconds_count"])

    # budgets: both exceeded on several messages, each alerted and counted once per series
    assert value(m, "inline_budget_overruns_total", scope="chain") == 1
    assert value(m, "inline_budget_overruns_total", scope="stage", stage="slow") == 1
    budget_texts = [t for t in res.texts if "[latency_budget]" in t]
    assert len(budget_texts) == 2 and sum("after its last readout" in t for t in budget_texts) == 1

    assert value(m, "process_cpu_seconds_total") > 0
    assert value(m, "inline_process_peak_resident_bytes") > 0

    # a second session adds to the counters
    send_scan(scan, "127.0.0.1", srv.port, config_name=None, config_text=CHAIN)
    m2 = scrape_when_idle(srv.metrics_port, 2)
    assert value(m2, "inline_acquisitions_received_total") == 2 * len(acqs)
    assert value(m2, "inline_image_latency_seconds_count", config="metered") == 2 * len(res.images)
    assert value(m2, "inline_budget_overruns_total", scope="chain") == 2  # once per series


def test_a_failing_session_counts_as_error(metered_server, small_scan):
    chain = "name: toy\ngadgets:\n  - {name: fail, class: 'toy_gadgets:FailOnLine'}\n"
    res = send_scan(read_scan(small_scan), "127.0.0.1", metered_server.port, config_name=None, config_text=chain)
    m = scrape_when_idle(metered_server.metrics_port, 1)
    assert value(m, "inline_sessions_total", outcome="error") == 1, (res.texts, res.closed, res.send_error)
    assert value(m, "inline_sessions_total", outcome="ok") == 0


def test_queue_depth_gauge_names_the_stages_of_an_active_session(metered_server):
    from inline.metrics import ServerMetrics

    metrics: ServerMetrics = metered_server.settings.metrics

    class FakeRunner:
        context = type("C", (), {"config_name": "x"})()
        times = []

        def queue_depths(self):
            return {"noise": 3, "fft": 0}

    class FakeSession:
        id = "s1"
        config_label = "x"
        runner = FakeRunner()
        latencies_ns: list = []
        acquisitions_received = 0
        reader = type("R", (), {"bytes_received": 0, "messages_received": 0})()

    metrics.session_started(FakeSession())
    m = scrape(metered_server.metrics_port)
    assert {(lab["session"], lab["stage"]): v for lab, v in m["inline_queue_depth"]} == {("s1", "noise"): 3, ("s1", "fft"): 0}
    assert value(m, "inline_sessions_active") == 1


def test_a_busy_metrics_port_does_not_stop_the_server(tmp_path, small_scan):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        srv = InlineServer("127.0.0.1", 0, SessionSettings(alert_log_dir=tmp_path), metrics_port=busy.getsockname()[1])
        srv.start_background()
        try:
            assert srv.metrics_port is None
            res = send_scan(read_scan(small_scan), "127.0.0.1", srv.port, config_name="default")
            assert res.closed and len(res.images) == 2
        finally:
            srv.stop()
