"""The view model (:mod:`inline.qc.views`) and ``inline console`` (:mod:`inline.console`),
without a terminal: the rich view rendered into a recording console."""

from __future__ import annotations

import io
import os
import threading

import pytest
from rich.console import Console

from inline.console import handle_command, render_view, run_console
from inline.qc.views import BusSubscriber, ViewState
from bus_helpers import SESSION, BusPublisher, image_event, motion_alert, session_end, session_start, wait_for, warning_alert


def fed_state() -> ViewState:
    state = ViewState()
    state.feed(*session_start())
    state.feed(*image_event(slice_=6, latency_ms=38.25))
    state.feed(*image_event(slice_=7, latency_ms=412.75, alerts=["motion"]))
    alert = motion_alert()
    state.feed(alert.topic, alert.to_record())
    warn = warning_alert()
    state.feed(warn.topic, warn.to_record())
    return state


def rendered(state: ViewState, feedback: str = "") -> str:
    console = Console(record=True, width=180, height=60, color_system=None)
    console.print(render_view(state, feedback))
    return console.export_text()


def test_state_sessions_images_alerts_newest_first():
    state = fed_state()
    snap = state.to_dict()
    (s,) = snap["sessions"]
    assert s["id"] == SESSION and s["active"] and s["images"] == 2 and s["alerts"] == 2
    assert s["latency_last_ms"] == 412.75 and s["latency_max_ms"] == 412.75
    assert [im["latency_ms"] for im in snap["images"]] == [412.75, 38.25]
    assert [a["code"] for a in snap["alerts"]] == ["coil_dropout", "motion"]
    assert [a["number"] for a in snap["alerts"]] == [2, 1]
    assert snap["counts"] == {"critical": 1, "warning": 1, "info": 0}

    state.feed(*session_end(images=2))
    (s,) = state.to_dict()["sessions"]
    assert not s["active"] and s["images"] == 2 and s["error"] is None


def test_state_counts_session_alerts_and_ignores_duplicates_and_garbage():
    state = fed_state()
    assert state.to_dict()["sessions"][0]["alerts"] == 2
    alert = motion_alert()
    state.feed(alert.topic, alert.to_record())
    state.feed(alert.topic, alert.to_record())  # the same alert twice is one alert
    assert state.counts() == {"critical": 2, "warning": 1, "info": 0}
    assert not state.feed("event.image", {"no": "session"})
    assert not state.feed("alert.critical.motion", None)
    assert not state.feed("something.else", {})
    assert state.to_dict()["bus_errors"] == 3


def test_acknowledgement_keeps_alerts_dimmed_and_moved():
    state = fed_state()
    motion_id = state.to_dict()["alerts"][1]["id"]
    version = state.version
    assert state.ack(motion_id)
    assert not state.ack(motion_id)  # already acknowledged
    assert not state.ack("no-such-id")
    assert state.version == version + 1
    snap = state.to_dict()
    assert [a["code"] for a in snap["alerts"]] == ["coil_dropout"]
    assert [a["code"] for a in snap["acknowledged"]] == ["motion"] and snap["acknowledged"][0]["acknowledged_unix_s"]
    assert snap["counts"] == {"critical": 0, "warning": 1, "info": 0}
    assert snap["counts_total"] == {"critical": 1, "warning": 1, "info": 0}
    assert state.ack_all() == 1 and state.ack_all() == 0
    assert state.to_dict()["alerts"] == [] and len(state.to_dict()["acknowledged"]) == 2


def test_remote_acknowledgement_topic():
    state = fed_state()
    state.feed("event.alert.ack", {"id": state.to_dict()["alerts"][0]["id"]})
    assert state.counts()["warning"] == 0
    state.feed("event.alert.ack", {"all": True})
    assert state.counts() == {"critical": 0, "warning": 0, "info": 0}


def test_alert_limit_drops_acknowledged_first():
    state = ViewState(max_alerts=3)
    alerts = [warning_alert() for _ in range(3)]
    for a in alerts:
        state.feed(a.topic, a.to_record())
    state.ack(alerts[1].id)
    extra = motion_alert()
    state.feed(extra.topic, extra.to_record())
    ids = {a["id"] for a in state.to_dict()["alerts"] + state.to_dict()["acknowledged"]}
    assert ids == {alerts[0].id, alerts[2].id, extra.id}


def test_console_view_shows_alerts_actions_and_latencies():
    text = rendered(fed_state())
    assert "Patient motion of 4.2 mm during slices 6-8" in text
    assert "→ Ask the patient to keep still and repeat the series" in text
    assert "Coil element 12 is silent" in text and "Check the head coil connector" in text
    assert "412.8" in text and "38.2" in text  # latencies [ms], one decimal
    assert "Prisma 1.5T" in text and "default" in text  # the session
    assert "1 critical" in text and "1 warning" in text
    assert "slices 6-8" in text and "4.2 vs 1.5 mm" in text
    assert "alerts: 2 to acknowledge" in text


def test_console_view_colours_by_severity():
    console = Console(record=True, width=180, height=60, color_system="truecolor", force_terminal=True)
    console.print(render_view(fed_state()))
    html = console.export_html(inline_styles=True)
    # rich's standard palette: red for critical, yellow (olive) for warning
    assert "background-color: #800000" in html and "Patient motion" in html
    assert "background-color: #808000" in html


def test_console_commands_acknowledge():
    state = fed_state()
    assert handle_command(state, "a 1\n") == "#1 acknowledged"
    assert handle_command(state, "a 1") == "#1: no such active alert"
    assert "not an alert number" in handle_command(state, "a x")
    assert "unknown command" in handle_command(state, "hello")
    text = rendered(state, "#1 acknowledged")
    assert "critical ✓ ack" in text and "alerts: 1 to acknowledge" in text and "#1 acknowledged" in text
    assert handle_command(state, "a") == "1 alert(s) acknowledged"
    assert "alerts: none to acknowledge" in rendered(state)
    assert handle_command(state, "q") is None


@pytest.fixture
def bus():
    pub = BusPublisher()
    yield pub
    pub.close()


def test_bus_subscriber_feeds_state(bus):
    state = ViewState()
    with BusSubscriber(state, bus.endpoint) as sub:
        topic, payload = session_start()
        bus.publish_until(topic, payload, lambda: bool(state.to_dict()["sessions"]))
        bus.publish(*image_event(latency_ms=12.5))
        alert = motion_alert()
        bus.publish_alert(alert)
        bus.sock.send_multipart([b"alert.critical.motion", b"\xc1 not msgpack"])
        wait_for(lambda: state.to_dict()["bus_errors"] == 1)
        snap = state.to_dict()
        assert snap["endpoint"] == bus.endpoint
        assert snap["alerts"][0]["id"] == alert.id and snap["alerts"][0]["action"] == alert.action
        assert snap["images"][0]["latency_ms"] == 12.5
    assert not sub._thread.is_alive()


def test_run_console_without_terminal(bus):
    """``run_console`` on a piped console: one line per message, commands from a pipe."""
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    read_fd, write_fd = os.pipe()
    commands = os.fdopen(write_fd, "w", buffering=1)
    stop = threading.Event()
    thread = threading.Thread(target=run_console, args=(bus.endpoint,), kwargs={"console": console, "input_stream": os.fdopen(read_fd), "stop": stop})
    thread.start()
    try:
        topic, payload = session_start()
        bus.publish_until(topic, payload, lambda: "session start" in out.getvalue())
        bus.publish(*image_event(latency_ms=77.5))
        bus.publish_alert(motion_alert())
        wait_for(lambda: "Ask the patient to keep still" in out.getvalue())
        commands.write("a\n")
        wait_for(lambda: "1 alert(s) acknowledged" in out.getvalue())
        commands.write("q\n")
        thread.join(5.0)
        assert not thread.is_alive()
    finally:
        stop.set()
        commands.close()
        thread.join(5.0)
    text = out.getvalue()
    assert "CRITICAL [motion] Patient motion of 4.2 mm during slices 6-8 → Ask the patient" in text
    assert "latency 77.5 ms" in text
