"""Alert latency at scanner pace: faulty scans streamed over a real socket, alerts taken off the bus.

    python bench/qc_latency.py [--per-code 20] [--config qc] [--tr-ms 10]
                               [--out bench/results/qc_latency_cpu.json]

``bench/qc_eval.py`` feeds readouts as fast as the offline runner can, so its latencies
include queueing behind earlier readouts. Here each faulty case is a small simulated scan
(64 x 64, 8 coils, 1-2 slices, one or two repetitions, TR ``--tr-ms``) with one visible
fault of :data:`bench.qc_eval.FAULT_SPECS`, sent by :func:`inline.client.send_scan` at
``pace="realtime"`` (readouts leave at their acquisition time stamps) to an
:class:`inline.server.InlineServer` in this process, whose alert bus (ZeroMQ PUB) a SUB
socket reads. The latency is the bus record's ``latency_ms``: from the arrival of the
readout that revealed the fault (the server's receive time) to publication on the bus,
the definition of the issue. Cases are drawn per alert code until ``--per-code`` cases
raised it (at most 3x that many tries); p50 / p99 / max per code are written to
``bench/results/qc_latency_cpu.json``. The first case warms the server up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.qc_eval import FAULT_SPECS, FaultSpec, measure_snr  # noqa: E402
from inline.client import send_scan  # noqa: E402
from inline.mrdfile import RawScan  # noqa: E402
from inline.qc import faults  # noqa: E402
from inline.qc.bus import decode  # noqa: E402
from inline.server import InlineServer  # noqa: E402
from inline.session import SessionSettings  # noqa: E402
from inline.simulate import simulate_scan  # noqa: E402


class BusReader:
    """SUB socket on the alert bus, collecting ``alert.*`` payloads in a thread."""

    def __init__(self, endpoint: str):
        self.payloads: list[dict] = []
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
        self._sub.setsockopt(zmq.RCVTIMEO, 100)
        self._sub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # the subscription must reach the publisher first (slow joiner)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.payloads.append(decode(self._sub.recv_multipart())[1])
            except zmq.Again:
                continue

    def take(self, session_ids: set[str] | None = None, settle_s: float = 0.3) -> list[dict]:
        time.sleep(settle_s)
        out, self.payloads = self.payloads, []
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sub.close(0)


def _base(j: int, tr_ms: float, repetitions: int) -> tuple[RawScan, float]:
    snr = (20.0, 30.0, 50.0, 80.0, 40.0)[j % 5]
    sim = simulate_scan(matrix=64, coils=(4, 6, 8)[j % 3], slices=1 + j % 2, snr=snr, tr_ms=tr_ms,
                        repetitions=repetitions, orientation=("axial", "sagittal", "coronal")[j % 3], seed=90000 + j)
    return RawScan(sim.header_xml, list(sim.acquisitions)), snr


def _inject(spec: FaultSpec, scan: RawScan, snr: float, rng: np.random.Generator) -> RawScan:
    coils = scan.acquisitions[-1].active_channels
    inj = spec.inject(scan, rng, coils, snr) if spec.needs_snr else spec.inject(scan, rng, coils)
    return inj.scan


def _pct(v: list[float]) -> dict:
    a = np.asarray(v, dtype=float)
    if not a.size:
        return {"n": 0}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-code", type=int, default=20)
    ap.add_argument("--config", default="qc")
    ap.add_argument("--tr-ms", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qc_latency_cpu.json")
    ap.add_argument("--qc-workers", type=int, default=1, help="as inline serve: QC taps in worker processes (0: on threads)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    server = InlineServer("127.0.0.1", 0, SessionSettings(), bus_endpoint="tcp://127.0.0.1:*", tap_workers=args.qc_workers)
    if args.qc_workers:
        server.settings.tap_host.wait_ready(60)
    server.start_background()
    reader = BusReader(server.settings.bus.endpoint)
    per_code: dict[str, list[float]] = {}
    tries: dict[str, int] = {}
    cases: list[dict] = []
    t0 = time.perf_counter()
    try:
        warm, _ = _base(0, args.tr_ms, 1)
        send_scan(warm, "127.0.0.1", server.port, config_name=args.config, pace="realtime")
        reader.take()
        kinds = sorted({s.kind for s in FAULT_SPECS})
        j = 0
        for kind in kinds:
            code = faults.EXPECTED_CODE[kind].value
            specs = [s for s in FAULT_SPECS if s.kind == kind and s.visible]
            lat = per_code.setdefault(code, [])
            n = 0
            while len([c for c in cases if c["code"] == code and c["detected"]]) < args.per_code \
                    and n < 3 * args.per_code:
                spec = specs[n % len(specs)]
                n += 1
                j += 1
                reps = 2 if spec.needs_repetitions or (kind == "motion" and n % 2 == 0) else 1
                scan, snr = _base(j, args.tr_ms, reps)
                if spec.needs_snr:
                    snr = measure_snr(scan, args.config)
                faulty = _inject(spec, scan, snr, rng)
                res = send_scan(faulty, "127.0.0.1", server.port, config_name=args.config, pace="realtime")
                if not res.closed or res.errors:
                    raise RuntimeError(f"{spec.label}: {res.texts}")
                got = [p for p in reader.take() if p.get("code") == code]
                ms = [float(p["latency_ms"]) for p in got if p.get("latency_ms") is not None]
                lat += ms
                cases.append({"code": code, "fault": spec.label, "detected": bool(got), "latency_ms": ms})
            tries[code] = n
    finally:
        reader.close()
        server.stop()
    result = {
        "benchmark": "QC alert latency at scanner pace: arrival of the revealing readout to publication on the bus",
        "config": args.config,
        "qc_workers": args.qc_workers,
        "case": f"simulated 64x64, 4-8 coils, 1-2 slices, 1-2 repetitions, TR {args.tr_ms:g} ms, one visible "
                "fault per scan (bench.qc_eval.FAULT_SPECS), streamed with pace=realtime over TCP to an "
                f"in-process server, QC taps {'in a worker process' if args.qc_workers else 'on threads'}; "
                "latency = bus record latency_ms",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
        "per_code": {c: {**_pct(v), "cases_streamed": tries.get(c, 0),
                         "cases_detected": sum(1 for k in cases if k["code"] == c and k["detected"])}
                     for c, v in per_code.items()},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for c, m in result["per_code"].items():
        if m["n"]:
            print(f"{c}: {m['cases_detected']}/{m['cases_streamed']} cases, {m['n']} alerts, "
                  f"p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, max {m['max']:.1f} ms")
        else:
            print(f"{c}: no alert in {m['cases_streamed']} cases")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
