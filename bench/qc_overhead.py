"""Does live QC delay the images? The default chain with and without its QC taps.

    python bench/qc_overhead.py [--repeats N] [--pace realtime|fast]

Streams the simulated 32-coil, 256x256, 10-slice scan (as in ``bench/latency.py``) through
servers in this process, rotating three variants: the default chain with its QC taps in a
worker process (as ``inline serve`` runs them), with its QC taps on threads of the server,
and without ``readout_qc``, ``shot_motion`` and ``image_qc`` (same data, interleaved so
machine load hits all alike; first run of each excluded). Reports image latency after the
last readout (server-side measurement) and the QC stages' own time per call. Then the CPU each QC tap costs per slice
(:func:`tap_cpu_per_slice`: the taps of ``configs/default.yaml`` run alone, single-threaded,
on the same scan, ``time.thread_time`` around every call, slice-end work included).
Writes bench/results/qc_overhead_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inline.client import send_scan  # noqa: E402
from inline.config import load_chain  # noqa: E402
from inline.demo import image_latency_ms, simulated_demo_scan  # noqa: E402
from inline.config import validate_chain  # noqa: E402
from inline.gadget import SessionContext  # noqa: E402
from inline.protocol import parse_header  # noqa: E402
from inline.server import InlineServer  # noqa: E402
from inline.trace import Trace  # noqa: E402
from inline.session import SessionSettings  # noqa: E402

QC_STAGES = ("readout_qc", "shot_motion", "image_qc")


def tap_cpu_per_slice(scan, config: str = "default") -> dict:
    """CPU time [ms] per slice of each QC tap of ``config`` on ``scan``, run single-threaded.

    The chain's stages run in order without the engine (each message through every stage that
    accepts it); only the QC taps are timed, with ``time.thread_time_ns`` around each call of
    ``process`` / ``close`` (consuming its outputs). Returns per tap: total ms, ms per slice
    (images), calls, and the largest single call [ms] (the slice-end checks).
    """
    header = parse_header(scan.header_xml)
    ctx = SessionContext(header=header, config_name=config)
    stages = validate_chain(load_chain(config))
    gadgets = [(st.name, st.cls(ctx, st.params)) for st in stages]
    cpu = {n: [] for n, _ in gadgets if n in QC_STAGES}
    images = 0

    def push(i: int, item, trace) -> None:
        nonlocal images
        if i == len(gadgets):
            images += type(item).__name__ == "Image"
            return
        name, g = gadgets[i]
        if not isinstance(item, g.accepts):
            push(i + 1, item, trace)
            return
        t0 = time.thread_time_ns()
        out = list(g.process(item, trace))
        if name in cpu:
            cpu[name].append(time.thread_time_ns() - t0)
        for o, t in out:
            push(i + 1, o, t)

    for acq in scan.acquisitions:
        push(0, acq, Trace.arrived())
    for i, (name, g) in enumerate(gadgets):
        t0 = time.thread_time_ns()
        out = list(g.close())
        if name in cpu:
            cpu[name].append(time.thread_time_ns() - t0)
        for o, t in out:
            push(i + 1, o, t)
    slices = max(images, 1)
    return {n: {"total_ms": sum(v) / 1e6, "ms_per_slice": sum(v) / 1e6 / slices, "calls": len(v),
                "max_call_ms": max(v) / 1e6 if v else 0.0, "slices": slices} for n, v in cpu.items()}


def chain_text(with_qc: bool) -> str:
    spec = load_chain("default")
    if not with_qc:
        spec = spec.model_copy(update={"name": "default_without_qc", "gadgets": [g for g in spec.gadgets if g.name not in QC_STAGES]})
    return json.dumps(spec.model_dump(by_alias=True))  # JSON is YAML


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pace", default="realtime", choices=["realtime", "fast"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qc_overhead_cpu.json")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU per slice of the taps (no server runs)")
    args = ap.parse_args()
    scan = simulated_demo_scan(10, 32, 256)
    # first pass warms caches / imports; then the least disturbed of 3 passes per tap (the machine is shared)
    passes = [tap_cpu_per_slice(scan) for _ in range(4)][1:]
    cpu = {k: min((p[k] for p in passes), key=lambda v: v["ms_per_slice"]) for k in passes[0]}
    for k, v in cpu.items():
        print(f"{k}: {v['ms_per_slice']:.1f} ms CPU per slice ({v['calls']} calls, largest {v['max_call_ms']:.1f} ms)")
    if args.cpu_only:
        return
    servers = {"worker": InlineServer("127.0.0.1", 0, SessionSettings(), tap_workers=1), "threads": InlineServer("127.0.0.1", 0, SessionSettings())}
    servers["worker"].settings.tap_host.wait_ready(60)
    for srv in servers.values():
        srv.start_background()
    variants = (("worker", True), ("threads", True), ("threads", False))  # (server, with QC)
    lat: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    stage_ms: dict[str, list[float]] = {s: [] for s in QC_STAGES}
    try:
        for r in range(args.repeats + 1):
            for where, with_qc in variants:
                server = servers[where]
                res = send_scan(scan, "127.0.0.1", server.port, config_name=None, config_text=chain_text(with_qc), pace=args.pace)
                assert res.closed and not res.errors, res.texts
                if r == 0:
                    continue
                lat[where, with_qc] += [image_latency_ms(im) for im in res.images]
                if with_qc and where == "worker":
                    time.sleep(0.2)
                    session = server.finished[-1]
                    for st in session.runner.times:
                        if st.name in stage_ms:
                            stage_ms[st.name] += [d / 1e6 for d in st.durations_ns]
    finally:
        for srv in servers.values():
            srv.stop()

    def pct(v):
        v = np.asarray(v)
        return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}

    result = {
        "benchmark": "image latency after last readout, default chain with vs without QC taps",
        "case": "simulated 32 ch, 256x256 (512 readout samples), 10 interleaved slices, TR 100 ms",
        "pace": args.pace,
        "device": "CPU",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "latency_ms_with_qc": pct(lat["worker", True]),  # as inline serve runs it
        "latency_ms_with_qc_on_threads": pct(lat["threads", True]),
        "latency_ms_without_qc": pct(lat["threads", False]),
        "qc_stage_ms_per_call": {k: pct(v) for k, v in stage_ms.items() if v},
        "qc_tap_cpu_per_slice": cpu,
        "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()],  # other work on the machine
    }
    args.out.write_text(json.dumps(result, indent=2))
    w, t, wo = result["latency_ms_with_qc"], result["latency_ms_with_qc_on_threads"], result["latency_ms_without_qc"]
    print(f"with QC in a worker  p50 {w['p50']:.1f} ms  p99 {w['p99']:.1f} ms")
    print(f"with QC on threads   p50 {t['p50']:.1f} ms  p99 {t['p99']:.1f} ms")
    print(f"without QC p50 {wo['p50']:.1f} ms  p99 {wo['p99']:.1f} ms")
    for k, v in result["qc_stage_ms_per_call"].items():
        print(f"{k}: p50 {v['p50']:.3f} ms, p99 {v['p99']:.3f} ms per call ({v['n']} calls)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
