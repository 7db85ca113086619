"""A faulty scan over a real socket: the right alert on the bus, in the JSONL log, as TEXT to
the scanner, in image meta, in the console's data model and on the dashboard (Chromium)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import ismrmrd
import pytest

from conftest import wait_for_files
from inline.client import send_scan
from inline.console import render_view
from inline.dashboard import DashboardServer
from inline.mrdfile import RawScan
from inline.qc.bus import read_log
from inline.qc.faults import dead_coil
from inline.qc.views import BusSubscriber, ViewState
from inline.server import InlineServer
from inline.session import ALERTS_META_KEY, SessionSettings
from inline.simulate import simulate_scan
from test_alert_bus import Collector

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
DEAD = 5  # the coil element that fails half way through the scan

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def faulty_scan() -> RawScan:
    sim = simulate_scan(matrix=64, slices=4, coils=8, snr=40, seed=11, tr_ms=20.0)  # 1.3 s at scanner pace
    return dead_coil(RawScan(sim.header_xml, list(sim.acquisitions)), channel=DEAD, from_fraction=0.5).scan


def _live(tmp_path, tap_workers: int):
    srv = InlineServer(
        "127.0.0.1", 0, SessionSettings(journal_dir=tmp_path / "journal", idle_timeout_s=10.0), bus_endpoint="tcp://127.0.0.1:*",
        tap_workers=tap_workers,
    )
    if tap_workers:
        assert srv.settings.tap_host.wait_ready(60)
    srv.start_background()
    state = ViewState()
    subscriber = BusSubscriber(state, srv.settings.bus.endpoint).start()
    dashboard = DashboardServer(srv.settings.bus.endpoint, port=0).start()
    collector = Collector(srv.settings.bus.endpoint, b"alert.")
    yield srv, state, dashboard, collector
    collector.close()
    dashboard.stop()
    subscriber.stop()
    srv.stop()


@pytest.fixture(params=[0, 1], ids=["taps-on-threads", "taps-in-a-worker-process"])
def live(request, tmp_path):
    """A live server, its QC taps on threads (embedded default) or in a worker (``inline serve``'s)."""
    yield from _live(tmp_path, request.param)


@pytest.fixture
def live_served(tmp_path):
    """A live server set up as ``inline serve`` sets it up: QC taps in a worker process."""
    yield from _live(tmp_path, 1)


def dropout_alerts(records):
    return [r for r in records if r["code"] == "coil_dropout"]


def check_everywhere(srv, state, collector, result) -> dict:
    assert result.closed and not result.errors, result.texts
    # TEXT to the scanner, with the level prefix and the code
    texts = [t for t in result.alerts if "[coil_dropout]" in t]
    assert texts and texts[0].split()[0] in ("WARNING", "ERROR") and f"{DEAD}" in texts[0]
    # on the bus
    on_bus = collector.wait_for("alert.", 10)
    bus_records = dropout_alerts([p for _, p in on_bus])
    assert bus_records and bus_records[0]["evidence"]
    record = bus_records[0]
    assert record["latency_ms"] is not None and record["latency_ms"] < 100
    # in the JSONL log
    (log,) = wait_for_files(srv.settings.journal_dir, "*.alerts.jsonl")
    assert record["id"] in [r["id"] for r in dropout_alerts(read_log(log))]
    # in the meta of the images of the affected slices
    flagged = [im for im in result.images if "coil_dropout" in (ismrmrd.Meta.deserialize(im.attribute_string).get(ALERTS_META_KEY) or [])]
    assert flagged
    # in the console's data model and its rendering
    deadline = time.monotonic() + 5
    while not dropout_alerts(state.to_dict()["alerts"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    view = state.to_dict()
    assert dropout_alerts(view["alerts"])[0]["id"] == record["id"]
    assert view["sessions"][0]["images"] == len(result.images)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(render_view(state))
    assert record["action"][:40] in console.export_text().replace("\n", " ") or "coil_dropout" in console.export_text()
    return record


def test_faulty_scan_alert_reaches_every_view(live, faulty_scan):
    srv, state, _dashboard, collector = live
    result = send_scan(faulty_scan, "127.0.0.1", srv.port, config_name="default", pace="realtime")
    check_everywhere(srv, state, collector, result)


def test_dashboard_shows_the_alert_of_a_streamed_faulty_scan(live_served, faulty_scan, browser_page):
    srv, state, dashboard, collector = live_served
    page = browser_page
    page.goto(dashboard.url)
    page.wait_for_selector("#conn.live", timeout=5000)
    result = send_scan(faulty_scan, "127.0.0.1", srv.port, config_name="default", pace="realtime")
    record = check_everywhere(srv, state, collector, result)
    card = page.locator(f'.card[data-id="{record["id"]}"]')
    card.wait_for(timeout=5000)
    assert record["message"] in card.inner_text()
    assert "coil_dropout" in page.inner_text("#images") or page.inner_text("#sessions")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard_streamed_fault.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    if os.environ.get("INLINE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")


# -- alert latency at scanner pace, per fault kind ---------------------------------------------
from inline.qc import faults  # noqa: E402


def _paced_base(**kw) -> RawScan:
    sim = simulate_scan(matrix=64, coils=8, snr=40, seed=21, tr_ms=20.0, **kw)  # 64 lines in 1.3 s per repetition
    return RawScan(sim.header_xml, list(sim.acquisitions))


PACED_FAULTS = {
    "rf_spike": lambda: faults.rf_spike(_paced_base(slices=2), amplitude_rel=0.5, n_spikes=1, seed=3).scan,
    "coil_dropout": lambda: faults.dead_coil(_paced_base(slices=2), channel=2, from_fraction=0.4).scan,
    "incomplete_coverage": lambda: faults.missing_lines(_paced_base(slices=2), fraction=0.1, region="centre", seed=2).scan,
    "motion": lambda: faults.repetition_motion(_paced_base(slices=1, repetitions=2), repetition=1, translation_mm=(3.0, 0.0)).scan,
    "low_snr": lambda: faults.raised_noise(_paced_base(slices=2), factor=10.0, seed=4).scan,
}


@pytest.mark.parametrize("code", sorted(PACED_FAULTS))
def test_alert_latency_at_scanner_pace(live, code):
    """From the arrival of the readout that reveals the fault to the alert on the bus: < 100 ms."""
    srv, _state, _dashboard, collector = live
    result = send_scan(PACED_FAULTS[code](), "127.0.0.1", srv.port, config_name="default", pace="realtime")
    assert result.closed and not result.errors, result.texts
    found = [p for _, p in collector.wait_for("alert.", 10) if p["code"] == code]
    deadline = time.monotonic() + 5
    while not found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = [p for _, p in collector.messages if p.get("code") == code]
    assert found, f"no {code} alert; got {[p.get('code') for _, p in collector.messages]}"
    latencies = [p["latency_ms"] for p in found]
    print(f"{code}: alert latency {', '.join(f'{v:.1f}' for v in latencies)} ms")
    assert max(latencies) < 100
