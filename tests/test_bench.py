"""``inline bench`` end to end on the smoke case (2D, 2 slices, 8 coils, 64x64; 1 and 2
concurrent sessions): the result document's schema, its counts, the peers (run or skipped
with a reason) and the plots. Nothing here asserts a timing."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from inline.benchmark import peers
from inline.benchmark.cases import CASES, prepare
from inline.cli import app

pytestmark = pytest.mark.timeout(240)

CASE = "tiny_2d_8ch_64"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    r = CliRunner().invoke(
        app,
        ["bench", "--case", CASE, "--out", str(out), "--ingest-repeats", "1"],
        env={"INLINE_BENCH_CACHE": str(tmp / "cache"), "COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads((out / f"{CASE}.json").read_text()), out, r.output, tmp / "cache"


def test_document_schema_and_counts(bench_run):
    doc, _out, _output, cache = bench_run
    case = CASES[CASE]
    assert doc["case"] == CASE and doc["config"] == "default" and doc["backend"] == "cpu"
    assert {"platform", "processor", "cpu_count"} <= set(doc["machine"])
    assert {"python", "numpy", "ismrmrd"} <= set(doc["versions"])
    assert set(doc["latency_ms"]) == {"n", "p50", "p95", "p99", "max"}
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p99"] <= doc["latency_ms"]["max"]
    assert doc["ingest_acq_per_s"] > 0 and doc["ingest_MB_per_s"] > 0

    scan = prepare(case, cache)  # the cached stream the run used
    assert doc["scan"]["acquisitions"] == scan.acquisitions
    slices = case.scan["slices"]
    assert [lv["sessions"] for lv in doc["concurrency"]] == [1, 2]
    for lv in doc["concurrency"]:  # warm-up excluded: one image per slice per measured session
        assert lv["images"] == lv["latency_ms"]["n"] == len(lv["latencies_ms"]) == slices * lv["sessions"] * case.repeats
    assert doc["latency_ms"]["n"] == slices * case.repeats

    server = doc["server"]
    assert server["acquisitions_received"] == server["acquisitions_sent"] == 3 * case.repeats * scan.acquisitions
    assert server["cpu_s"] > 0 and server["peak_rss_mib"] > 0

    gadgets = doc["per_gadget"]
    assert gadgets["sessions"] == case.repeats and gadgets["images"] == slices * case.repeats
    rows = {(r["stage"], r["kind"]): r for r in gadgets["stages"]}
    assert rows[("noise", "Acquisition")]["calls"] == scan.acquisitions * case.repeats
    assert rows[("fft", "ReconBuffer")]["calls"] == rows[("send", "Image")]["calls"] == slices * case.repeats


def test_peers_and_ratios(bench_run):
    doc = bench_run[0]
    p, q = doc["peers"], doc["ratios"]
    assert set(p) == {"scipy_fft_rss", "bart", "gadgetron_python", "inline_reader", "ismrmrd_deserializer", "raw_socket"}
    assert p["scipy_fft_rss"]["latency_ms"]["n"] == 2 * CASES[CASE].scan["slices"]  # 3 passes, the first excluded
    for name in ("scipy_fft_rss", "bart", "gadgetron_python"):
        if "skipped" in p[name]:  # e.g. bart not on PATH, gadgetron not installed: said, never faked
            assert p[name]["skipped"] and name not in q
            continue
        assert set(p[name]["latency_ms"]) == {"n", "p50", "p95", "p99", "max"}
        assert q[name]["latency_p50"] == pytest.approx(doc["latency_ms"]["p50"] / p[name]["latency_ms"]["p50"])
        assert q[name]["latency_p99"] > 0
    if shutil.which("bart"):
        assert "skipped" not in p["bart"]
    for name in ("ismrmrd_deserializer", "raw_socket"):
        assert p[name]["ingest_acq_per_s"] > 0
        assert q[name]["ingest"] == pytest.approx(doc["ingest_acq_per_s"] / p[name]["ingest_acq_per_s"])
    assert all("met" in t and "value" in t for t in doc["targets"].values())


def test_plots_and_tables(bench_run):
    _doc, out, output, _cache = bench_run
    for kind in ("latency_cdf", "per_gadget", "concurrency"):
        png = out / f"{CASE}_{kind}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert "where the time goes" in output and "ratio p50" in output


def test_gadgetron_peer_is_skipped_with_a_reason_when_not_installed(monkeypatch):
    from inline.benchmark import gadgetron_peer

    monkeypatch.setattr(gadgetron_peer, "unavailable", lambda: "gadgetron package not installed")
    got = peers.gadgetron_peer(CASES[CASE], None, "fast", 2.5e-3, 1)
    assert got == {"skipped": "gadgetron package not installed"}


def test_list_and_unknown_case():
    r = CliRunner().invoke(app, ["bench", "--list"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "2d_32ch_256" in r.output and "grappa_r4_2d_32ch_256" in r.output
    r = CliRunner().invoke(app, ["bench", "--case", "nope"])
    assert r.exit_code != 0 and "unknown case" in r.output
