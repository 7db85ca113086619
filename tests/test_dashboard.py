"""The QC dashboard (:mod:`inline.dashboard`): its HTTP API, and the page live in headless
Chromium (Debian's ``chromium`` driven by ``playwright``) fed by a stand-in alert bus.

The page test saves a screenshot to ``tests/artifacts/dashboard_alert.png``; it refreshes
``docs/dashboard.png`` when that is absent or ``INLINE_UPDATE_DOCS_SCREENSHOT=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from inline.dashboard import DashboardServer
from bus_helpers import BusPublisher, image_event, motion_alert, session_start, wait_for, warning_alert

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bus():
    pub = BusPublisher()
    yield pub
    pub.close()


@pytest.fixture
def dashboard(bus):
    dash = DashboardServer(bus.endpoint, port=0).start()
    topic, payload = session_start()
    bus.publish_until(topic, payload, lambda: bool(dash.state.to_dict()["sessions"]))
    yield dash
    dash.stop()


def request(dash: DashboardServer, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(dash.url.rstrip("/") + path, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_state_and_acknowledgement(bus, dashboard):
    assert dashboard.host == "127.0.0.1" and dashboard.port > 0
    alert = motion_alert()
    bus.publish(*image_event(latency_ms=float("nan")))  # NaN latency travels as null
    bus.publish_alert(alert)
    wait_for(lambda: bool(dashboard.state.to_dict()["alerts"]))
    status, state = request(dashboard, "/api/state")
    assert status == 200
    assert state["alerts"][0]["message"] == alert.message and state["alerts"][0]["action"] == alert.action
    assert state["images"][0]["latency_ms"] is None
    assert state["sessions"][0]["scanner"] == "SIEMENS Prisma 1.5T AWP66012"

    assert request(dashboard, "/api/ack/nope", "POST")[0] == 404
    assert request(dashboard, f"/api/ack/{alert.id}", "POST", {"Origin": "http://evil.example"})[0] == 403
    status, body = request(dashboard, f"/api/ack/{alert.id}", "POST", {"Origin": dashboard.url.rstrip("/")})
    assert status == 200 and body["ok"]
    assert request(dashboard, "/api/state")[1]["acknowledged"][0]["id"] == alert.id
    bus.publish_alert(warning_alert())
    wait_for(lambda: bool(dashboard.state.to_dict()["alerts"]))
    assert request(dashboard, "/api/ack_all", "POST")[1]["acknowledged"] == 1
    assert request(dashboard, "/nowhere")[0] == 404


def test_event_stream_pushes_bus_messages(bus, dashboard):
    with urllib.request.urlopen(dashboard.url + "events", timeout=5) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"

        def next_event() -> tuple[str, dict]:
            name = data = None
            while True:
                line = stream.readline().decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "" and name:
                    return name, data

        name, first = next_event()
        assert name == "state" and first["sessions"]
        alert = motion_alert()
        bus.publish_alert(alert)
        name, bus_event = next_event()
        assert name == "bus" and bus_event["topic"] == alert.topic and bus_event["payload"]["id"] == alert.id
        name, state = next_event()
        assert name == "state" and state["alerts"][0]["id"] == alert.id


def test_stop_ends_open_event_streams(bus):
    dash = DashboardServer(bus.endpoint, port=0).start()
    stream = urllib.request.urlopen(dash.url + "events", timeout=5)
    stream.readline()
    dash.stop()
    assert stream.read() is not None  # returns (end of stream) instead of hanging
    stream.close()


def test_page_shows_alert_live_and_acknowledges(bus, dashboard, browser_page):
    page = browser_page
    page.goto(dashboard.url)
    page.wait_for_selector("#conn.live", timeout=5000)
    assert "SIEMENS Prisma 1.5T AWP66012" in page.inner_text("#sessions")
    page.evaluate("window.__notReloaded = true")

    bus.publish(*image_event(slice_=6, latency_ms=38.25))
    bus.publish(*image_event(slice_=7, latency_ms=412.75, alerts=["motion"]))
    bus.publish_alert(warning_alert())
    alert = motion_alert()
    bus.publish_alert(alert)

    card = page.locator(f'.card.critical[data-id="{alert.id}"]')
    card.wait_for(timeout=5000)
    assert card.get_attribute("data-state") == "active"
    assert alert.message in card.inner_text() and alert.action in card.inner_text()
    assert page.evaluate("window.__notReloaded === true")  # arrived live over server-sent events
    assert page.inner_text("#n-critical") == "1 critical"
    images = page.inner_text("#images")
    assert "412.8" in images and "38.3" in images  # JavaScript toFixed(1) rounds 38.25 half up

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard_alert.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    if not DOCS_SCREENSHOT.exists() or os.environ.get("INLINE_UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    card.locator("button.ack").click()
    page.wait_for_selector(f'.card.acked[data-id="{alert.id}"][data-state="acknowledged"]', timeout=5000)
    assert page.inner_text("#n-critical") == "0 critical"
    assert dashboard.state.to_dict()["acknowledged"][0]["id"] == alert.id
    page.click("#ackall")
    page.wait_for_selector('.card.warning[data-state="acknowledged"]', timeout=5000)
    assert page.locator('.card[data-state="active"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / "dashboard_acknowledged.png"), full_page=True)
