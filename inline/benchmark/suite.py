"""One benchmark case end to end: our server under load, then the peers on the same data.

1. The case's scan is prepared (simulated once, cached as an MRD stream file).
2. ``inline serve`` starts in a child process (metrics endpoint, per-session traces).
3. Warm-up rounds of one session run and are excluded; then for each concurrency level N,
   ``repeats`` rounds of N sessions replay the scan together through real sockets, at
   scanner pace or as fast as possible. Image latency is the server's measurement; where
   the time goes comes from the sessions' spans (one session rounds only, so CPU sharing
   does not blur it); CPU time, peak memory and GPU memory from the metrics endpoint.
4. Peers on the same data (:mod:`inline.benchmark.peers`, :mod:`inline.benchmark.ingest`).

The result is the document :func:`inline.benchmark.report.write` stores as ``DIR/NAME.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from inline.benchmark import ingest, peers
from inline.benchmark.cases import BenchCase, PreparedScan, prepare
from inline.benchmark.replay import ReplayResult, ServerProcess, replay, replay_concurrently, sample
from inline.client import DEFAULT_TICK_S, QC_ALERT_TEXT

#: Peers ``--peers`` may name.
PEERS = ("scipy", "bart", "gadgetron", "ingest")

Progress = Callable[[str, float], None]  # (description, steps done since the last call)


class BenchError(RuntimeError):
    """A replay failed (error text from the server, no CLOSE, broken socket)."""


@dataclass
class BenchOptions:
    """What ``inline bench`` was asked for; None: the case's own setting."""

    pace: str | None = None
    sessions: tuple[int, ...] | None = None
    repeats: int | None = None
    warmup: int | None = None
    config: str | None = None
    config_file: Path | None = None
    stagger_s: float = 0.0
    tick_ms: float = DEFAULT_TICK_S * 1e3
    peers: tuple[str, ...] = PEERS
    ingest_repeats: int = 3
    peer_repeats: int = 1
    cache: Path | None = None
    extra: dict = field(default_factory=dict)

    def resolve(self, case: BenchCase) -> dict:
        return {
            "pace": self.pace or case.pace,
            "sessions": tuple(self.sessions or case.sessions),
            "repeats": self.repeats if self.repeats is not None else case.repeats,
            "warmup": self.warmup if self.warmup is not None else case.warmup,
            "config": self.config or case.config,
            "config_text": self.config_file.read_text() if self.config_file else None,
            "tick_s": self.tick_ms / 1e3,
        }


def planned_steps(case: BenchCase, opts: BenchOptions) -> int:
    """Steps :func:`run_case` reports through ``progress`` (for a progress bar's total)."""
    r = opts.resolve(case)
    return 1 + r["warmup"] + r["repeats"] * len(r["sessions"]) + len(opts.peers)


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, StopIteration, ValueError):
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("inline", "numpy", "scipy", "ismrmrd", "prometheus-client", "gadgetron", "torch", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check(results: list[ReplayResult], what: str) -> None:
    for r in results:
        if r.errors or not r.closed:
            raise BenchError(f"{what}: {'; '.join(r.errors) or 'the server sent no CLOSE'}")


def _level(sessions: int, results: list[ReplayResult]) -> dict:
    lat = [x for r in results for x in r.latencies_ms]
    rates = [r.acquisitions_sent / r.send_s for r in results if r.send_s > 0]
    mbs = [r.bytes_sent / r.send_s / 1e6 for r in results if r.send_s > 0]
    done = [r.completion_ms for r in results if r.completion_ms is not None]
    return {
        "sessions": sessions,
        "images": len(lat),
        "latency_ms": peers.percentiles_ms(lat),
        "latencies_ms": [round(x, 3) for x in lat],
        "session_ingest_acq_per_s": statistics.median(rates) if rates else None,
        "session_ingest_MB_per_s": statistics.median(mbs) if mbs else None,
        "completion_ms": statistics.median(done) if done else None,
    }


def stage_breakdown(trace_files: list[Path]) -> dict:
    """Per (stage, message kind): calls, per-call percentiles [ms] and time per image [ms],
    from span files of :mod:`inline.spans`, in chain order."""
    durations: dict[tuple[str, str, str], list[float]] = {}
    order: dict[str, int] = {}
    images = 0
    for path in trace_files:
        doc = json.loads(path.read_text())
        for i, st in enumerate(doc["stages"]):
            order.setdefault(st["stage"], i)
        for s in doc["spans"]:
            durations.setdefault((s["stage"], s["gadget"], s["kind"]), []).append(s["duration_us"] / 1e3)
            if s["stage"] == "send" and s["kind"] == "Image":
                images += 1
    rows = []
    for (stage, gadget, kind), d in sorted(durations.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][2])):
        p = peers.percentiles_ms(d)
        rows.append(
            {
                "stage": stage,
                "gadget": gadget,
                "kind": kind,
                "calls": len(d),
                "calls_per_image": len(d) / images if images else None,
                "p50_ms": p["p50"],
                "mean_ms": sum(d) / len(d),
                "p99_ms": p["p99"],
                "max_ms": p["max"],
                "ms_per_image": sum(d) / images if images else None,
            }
        )
    return {"sessions": len(trace_files), "images": images, "stages": rows}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return a / b


def run_case(case: BenchCase, opts: BenchOptions, progress: Progress | None = None) -> dict:
    """Run ``case``; returns the result document (``{"case", "skipped"}`` when it cannot run here).

    Raises:
        BenchError: a replay against our server failed.
    """
    step = progress or (lambda _d, _n: None)
    r = opts.resolve(case)
    doc: dict = {"benchmark": "inline bench", "case": case.name, "description": case.description, "config": r["config"], "case_config": case.config}
    if r["config_text"] is not None:
        doc["config"] = f"{opts.config_file} (sent as CONFIG_TEXT)"
        reason = _config_unavailable(r["config_text"], text=True)
    elif r["config"] != case.config:
        reason = _config_unavailable(r["config"])
    else:
        reason = case.unavailable()
    if reason is not None:
        return {**doc, "skipped": reason}
    doc.update(machine=machine_info(), versions=versions())
    r["stagger_s"] = opts.stagger_s
    step(f"{case.name}: preparing the scan", 0)
    scan = prepare(case, opts.cache)
    step(f"{case.name}: scan ready", 1)
    doc["scan"] = {**case.scan, "messages": scan.messages, "acquisitions": scan.acquisitions, "stream_bytes": scan.nbytes}
    doc["run"] = {
        "pace": r["pace"], "tick_ms": r["tick_s"] * 1e3, "sessions": list(r["sessions"]), "repeats": r["repeats"], "warmup": r["warmup"],
        "stagger_s": opts.stagger_s,
    }  # fmt: skip
    try:
        doc.update(_ours(case, scan, r, step))
        doc["peers"] = _peers(case, scan, r, opts, step)
    finally:
        scan.close()
    doc["ratios"] = ratios(doc)
    doc["targets"] = targets(doc)
    return doc


def _config_unavailable(config: str, text: bool = False) -> str | None:
    from inline.config import ConfigError, load_chain, parse_chain, validate_chain

    try:
        validate_chain(parse_chain(config, origin="--config-file") if text else load_chain(config))
    except (ConfigError, ImportError) as e:
        return f"config {config!r} does not validate: {e}"
    return None


def _ours(case: BenchCase, scan: PreparedScan, r: dict, step: Progress) -> dict:
    kw = dict(config_name=r["config"], config_text=r["config_text"], pace=r["pace"], tick_s=r["tick_s"])
    preload = None if r["config_text"] is not None else r["config"]
    with tempfile.TemporaryDirectory(prefix="inline-bench-") as work, ServerProcess(Path(work), preload=preload) as server:
        done = 0
        for w in range(r["warmup"]):
            step(f"{case.name}: warm-up {w + 1}/{r['warmup']}", 0)
            _check([replay(scan, "127.0.0.1", server.port, **kw)], "warm-up")
            done += 1
            server.wait_for_traces(done)
            step(f"{case.name}: warm-up {w + 1}/{r['warmup']}", 1)
        m0 = server.scrape()
        levels, one_session_traces, notes = [], [], []
        for n in r["sessions"]:
            results: list[ReplayResult] = []
            for rep in range(r["repeats"]):
                step(f"{case.name}: {n} session{'s' if n > 1 else ''}, round {rep + 1}/{r['repeats']}", 0)
                got = replay_concurrently(scan, "127.0.0.1", server.port, n, stagger_s=r["stagger_s"], **kw)
                _check(got, f"{n} sessions")
                results += got
                if not notes:  # what the server said to the first measured session, QC alerts aside
                    notes = [t.strip()[:400] for t in got[0].texts if not QC_ALERT_TEXT.match(t)]
                done += n
                found = server.wait_for_traces(done)
                if n == 1 and len(found) >= done:
                    one_session_traces.append(found[done - 1])
                step(f"{case.name}: {n} sessions, round {rep + 1}/{r['repeats']}", 1)
            levels.append(_level(n, results))
        m1 = server.scrape()
        if not one_session_traces:  # no one-session level: the first level's sessions
            one_session_traces = server.traces()[r["warmup"] :]
        breakdown = stage_breakdown(one_session_traces)
    measured_sessions = sum(lv["sessions"] for lv in levels) * r["repeats"]
    images = sum(lv["images"] for lv in levels)
    # the QC tap workers are part of the server: their CPU counts (0 where taps run on threads)
    worker_cpu_s = sample(m1, "inline_qc_worker_cpu_seconds_total") - sample(m0, "inline_qc_worker_cpu_seconds_total")
    cpu_s = sample(m1, "process_cpu_seconds_total") - sample(m0, "process_cpu_seconds_total") + worker_cpu_s
    gpu = {f"{lab['library']}_{lab['kind']}": v for lab, v in m1.get("inline_gpu_memory_bytes", [])}
    acq_received = sample(m1, "inline_acquisitions_received_total") - sample(m0, "inline_acquisitions_received_total")
    head = next((lv for lv in levels if lv["sessions"] == 1), levels[0])
    return {
        "backend": "cuda" if any(v > 0 for v in gpu.values()) else "cpu",
        "latency_ms": head["latency_ms"],
        "concurrency": levels,
        "per_gadget": breakdown,
        "server": {
            "cpu_s": cpu_s,
            "cpu_ms_per_image": cpu_s * 1e3 / images if images else None,
            "cpu_s_per_session": cpu_s / measured_sessions if measured_sessions else None,
            "qc_worker_cpu_s": worker_cpu_s,
            "peak_rss_mib": sample(m1, "inline_process_peak_resident_bytes") / 2**20,
            "qc_worker_peak_rss_mib": sample(m1, "inline_qc_worker_peak_resident_bytes") / 2**20,
            "gpu_memory_bytes": gpu,
            "acquisitions_received": acq_received,
            "acquisitions_sent": measured_sessions * scan.acquisitions,
            "budget_overruns": sample(m1, "inline_budget_overruns_total"),
        },
        "session_ingest_acq_per_s": head["session_ingest_acq_per_s"],
        "completion_ms": head["completion_ms"],
        "server_notes": notes,
    }


def _peers(case: BenchCase, scan: PreparedScan, r: dict, opts: BenchOptions, step: Progress) -> dict:
    out: dict = {}
    if "scipy" in opts.peers or "bart" in opts.peers:
        step(f"{case.name}: assembling k-space for the peers", 0)
        kspaces = scan.kspace()
        if "scipy" in opts.peers:
            out["scipy_fft_rss"] = peers.scipy_floor(kspaces, scan.header_xml, repeats=1 + max(2, opts.peer_repeats), progress=lambda d: step(f"{case.name}: {d}", 0))
            step(f"{case.name}: scipy floor done", 1)
        if "bart" in opts.peers:
            out["bart"] = peers.bart_peer(case, kspaces, scan.header_xml, progress=lambda d: step(f"{case.name}: {d}", 0))
            step(f"{case.name}: bart done", 1)
        del kspaces
    if "gadgetron" in opts.peers:
        out["gadgetron_python"] = peers.gadgetron_peer(
            case, scan, r["pace"], r["tick_s"], opts.peer_repeats, progress=lambda d: step(f"{case.name}: {d}", 0)
        )
        step(f"{case.name}: gadgetron done", 1)
    if "ingest" in opts.peers:
        step(f"{case.name}: ingest (ours, ismrmrd, raw socket)", 0)
        ing = ingest.compare(scan.path, scan.offsets, repeats=opts.ingest_repeats, on_run=lambda name, rep, res: step(f"{case.name}: ingest {name} {rep + 1}/{opts.ingest_repeats}", 0))
        res = ing["results"]
        for key, name in (("inline_reader", "inline"), ("ismrmrd_deserializer", "ismrmrd"), ("raw_socket", "raw")):
            out[key] = {
                "what": ingest.DESCRIPTIONS[name],
                "ingest_acq_per_s": res[name]["median_acq_per_s"],
                "ingest_MB_per_s": res[name]["median_MB_per_s"],
                "receiver_cpu_us_per_acq": res[name]["median_receiver_cpu_us_per_acq"],
                "runs_acq_per_s": res[name]["runs_acq_per_s"],
            }
        out["inline_reader"]["note"] = "ours: the receive path every session runs, on the same stream"
        step(f"{case.name}: ingest done", 1)
    return out


def ratios(doc: dict) -> dict:
    """Ours over each peer: latency (lower is better, < 1: we are faster) and ingest
    (higher is better, > 1: we are faster; ``ingest_cpu_speed``: peer CPU / our CPU per acquisition)."""
    out: dict = {}
    ours = doc.get("latency_ms", {})
    for name, p in doc.get("peers", {}).items():
        if "latency_ms" in p:
            out[name] = {"latency_p50": _ratio(ours.get("p50"), p["latency_ms"]["p50"]), "latency_p99": _ratio(ours.get("p99"), p["latency_ms"]["p99"])}
            if p.get("completion_ms") is not None:
                out[name]["completion"] = _ratio(doc.get("completion_ms"), p["completion_ms"])
    mine = doc.get("peers", {}).get("inline_reader")
    if mine:
        doc["ingest_acq_per_s"] = mine["ingest_acq_per_s"]
        doc["ingest_MB_per_s"] = mine["ingest_MB_per_s"]
        for name in ("ismrmrd_deserializer", "raw_socket"):
            p = doc["peers"][name]
            out[name] = {
                "ingest": _ratio(mine["ingest_acq_per_s"], p["ingest_acq_per_s"]),
                "ingest_cpu_speed": _ratio(p["receiver_cpu_us_per_acq"], mine["receiver_cpu_us_per_acq"]),
            }
    return out


def targets(doc: dict) -> dict:
    """The issue's targets, evaluated where they apply (reported, never asserted)."""
    q = doc.get("ratios", {})
    out: dict = {}
    raw, ism = q.get("raw_socket", {}), q.get("ismrmrd_deserializer", {})
    if raw:
        out["ingest >= 0.8 x raw socket (wall)"] = _target(raw.get("ingest"), lambda v: v >= 0.8)
        out["ingest >= 0.8 x raw socket (receiver CPU)"] = _target(raw.get("ingest_cpu_speed"), lambda v: v >= 0.8)
    if ism:
        out["ingest >= 2 x ismrmrd deserializer (wall)"] = _target(ism.get("ingest"), lambda v: v >= 2.0)
        out["ingest >= 2 x ismrmrd deserializer (receiver CPU)"] = _target(ism.get("ingest_cpu_speed"), lambda v: v >= 2.0)
    scan = doc.get("scan", {})
    cartesian_2d = doc.get("case_config") == "default" and scan.get("kz", 1) == 1 and scan.get("acceleration", 1) == 1
    if cartesian_2d:
        floor = q.get("scipy_fft_rss", {})
        out["p50 <= 1.5 x scipy FFT+RSS floor"] = _target(floor.get("latency_p50"), lambda v: v <= 1.5)
        p99 = doc.get("latency_ms", {}).get("p99")
        if doc.get("backend") == "cuda":
            out["GPU p99 <= 0.5 ms"] = _target(p99, lambda v: v <= 0.5)
        else:
            out["p99 <= 10 ms (CPU)"] = _target(p99, lambda v: v <= 10.0)
        levels = {lv["sessions"]: lv["latency_ms"]["p50"] for lv in doc.get("concurrency", [])}
        if 1 in levels and len(levels) > 1:
            cores = doc.get("machine", {}).get("cpu_count") or 1
            worst = max(levels)
            # flat apart from CPU sharing: N sessions on C cores may take up to N/C longer (25 % slack)
            allowed = max(1.0, worst / cores) * 1.25
            stagger = doc.get("run", {}).get("stagger_s") or 0
            how = "started together" if not stagger else f"started {stagger:g} s apart"
            out[f"p50 flat up to {worst} sessions, {how} (<= {allowed:.2f} x one session)"] = _target(_ratio(levels[worst], levels[1]), lambda v: v <= allowed)
    return out


def _target(value: float | None, ok: Callable[[float], bool]) -> dict:
    return {"value": value, "met": None if value is None else bool(ok(value))}
