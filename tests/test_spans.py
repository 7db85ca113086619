"""Per-message spans: ``inline serve --trace-dir`` (one JSON and one Chrome trace per session)
and ``inline run --trace``; the structure of both formats, and one span per message each
stage processed (plus its close), one ``send`` span per image."""

from __future__ import annotations

import json
from collections import Counter

import ismrmrd
import pytest
from conftest import wait_for_files
from typer.testing import CliRunner

from inline.cli import app
from inline.client import send_scan
from inline.mrdfile import read_scan
from inline.server import InlineServer
from inline.session import SessionSettings
from inline.spans import SpanRecorder

pytestmark = pytest.mark.timeout(120)

CHAIN = (
    "name: traced\ngadgets:\n"
    "  - {name: noise, class: NoiseAdjust}\n  - {name: ro, class: RemoveReadoutOversampling}\n"
    "  - {name: acc, class: AcquisitionAccumulateTrigger}\n  - {name: fft, class: FFTRecon}\n"
    "  - {name: rss, class: CoilCombine}\n  - {name: finish, class: ImageFinish}\n"
)
STAGES = ["noise", "ro", "acc", "fft", "rss", "finish"]


def check_chrome(doc: dict, spans: int) -> list[dict]:
    """Trace Event Format: complete events with the fields a viewer needs; returns them."""
    events = doc["traceEvents"]
    x = [e for e in events if e["ph"] == "X"]
    assert len(x) == spans
    for e in x:
        assert {"name", "cat", "ts", "dur", "pid", "tid", "args"} <= set(e) and e["dur"] >= 0 and e["ts"] >= 0
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in x} <= set(names)  # every track is named
    return x


def test_server_writes_span_files_per_session(tmp_path, small_scan):
    trace_dir = tmp_path / "traces"
    srv = InlineServer("127.0.0.1", 0, SessionSettings(alert_log_dir=tmp_path, trace_dir=trace_dir, idle_timeout_s=5.0))
    srv.start_background()
    try:
        scan = read_scan(small_scan)
        res = send_scan(scan, "127.0.0.1", srv.port, config_name=None, config_text=CHAIN)
        assert res.closed and not res.errors
        (chrome_path,) = wait_for_files(trace_dir, "*.chrome.json")
        (json_path,) = wait_for_files(trace_dir, "*.trace.json")
    finally:
        srv.stop()
    doc = json.loads(json_path.read_text())
    assert doc["format"] == "inline-spans/1" and doc["config"] == "traced" and json_path.name.startswith(doc["session"])
    assert [s["stage"] for s in doc["stages"]] == [*STAGES, "send"]
    assert [s["gadget"] for s in doc["stages"]][:2] == ["NoiseAdjust", "RemoveReadoutOversampling"]
    spans = doc["spans"]
    for s in spans:
        assert set(s) == {"stage", "gadget", "kind", "start_us", "duration_us"} and s["duration_us"] >= 0 and s["start_us"] >= 0
    assert [s["start_us"] for s in spans] == sorted(s["start_us"] for s in spans)

    acqs = scan.acquisitions
    imaging = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    images = len(res.images)
    count = Counter((s["stage"], s["kind"]) for s in spans)
    assert count[("noise", "Acquisition")] == len(acqs)
    assert count[("ro", "Acquisition")] == count[("acc", "Acquisition")] == len(imaging)
    assert count[("fft", "ReconBuffer")] == images == 2
    assert count[("rss", "ImageBuffer")] == count[("finish", "ImageBuffer")] == images
    assert count[("send", "Image")] == images
    assert all(count[(stage, "close")] == 1 for stage in STAGES)
    assert sum(count.values()) == len(acqs) + 2 * len(imaging) + 4 * images + len(STAGES)

    x = check_chrome(json.loads(chrome_path.read_text()), len(spans))
    assert Counter((e["name"], e["cat"]) for e in x) == count


def test_run_writes_json_and_chrome_traces(tmp_path, small_scan):
    runner = CliRunner()
    scan = read_scan(small_scan)
    for fmt in ("json", "chrome"):
        trace = tmp_path / f"run.{fmt}.json"
        r = runner.invoke(app, ["run", "default", str(small_scan), "-o", str(tmp_path / f"{fmt}.h5"), "--trace", str(trace), "--trace-format", fmt])
        assert r.exit_code == 0, r.output
        assert "spans written" in r.output
    doc = json.loads((tmp_path / "run.json.json").read_text())
    count = Counter((s["stage"], s["kind"]) for s in doc["spans"])
    assert count[("noise", "Acquisition")] == len(scan.acquisitions)
    assert count[("fft", "ReconBuffer")] == 2
    assert ("send", "Image") not in count  # offline: nothing is sent
    x = check_chrome(json.loads((tmp_path / "run.chrome.json").read_text()), len(doc["spans"]))
    assert Counter((e["name"], e["cat"]) for e in x) == count
    bad = runner.invoke(app, ["run", "default", str(small_scan), "-o", str(tmp_path / "x.h5"), "--trace", str(tmp_path / "t"), "--trace-format", "xml"])
    assert bad.exit_code != 0


def test_recorder_formats():
    rec = SpanRecorder("s", t0_ns=1000)
    rec.bind("c", [("a", "A"), ("b", "B")])
    rec.stage_span(1, "X", 5000, 2000)
    rec.stage_span(0, "Y", 3000, 1000)
    rec.span("send", "Session", "Image", 8000, 500)
    assert [(s["stage"], s["start_us"], s["duration_us"]) for s in rec.to_json()["spans"]] == [("a", 2.0, 1.0), ("b", 4.0, 2.0), ("send", 7.0, 0.5)]
    x = [e for e in rec.to_chrome()["traceEvents"] if e["ph"] == "X"]
    assert [(e["tid"], e["ts"], e["dur"]) for e in x] == [(0, 2.0, 1.0), (1, 4.0, 2.0), (2, 7.0, 0.5)]
    with pytest.raises(ValueError):
        rec.export("xml")
