"""Does live QC delay the images? The default chain with and without its QC taps.

    python bench/qc_overhead.py [--repeats N] [--pace realtime|fast]

Streams the simulated 32-coil, 256x256, 10-slice scan (as in ``bench/latency.py``) through a
server in this process, alternating the default chain with and without ``readout_qc`` and
``image_qc`` (same data, same process, interleaved so machine load hits both alike; first
run of each excluded), and reports image latency after the last readout (server-side
measurement) and the QC stages' own time per call. Writes bench/results/qc_overhead_cpu.json.
"""

from __future__ import annotations

import argparse
import json
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
from inline.server import InlineServer  # noqa: E402
from inline.session import SessionSettings  # noqa: E402

QC_STAGES = ("readout_qc", "image_qc")


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
    args = ap.parse_args()
    scan = simulated_demo_scan(10, 32, 256)
    server = InlineServer("127.0.0.1", 0, SessionSettings())
    server.start_background()
    lat = {True: [], False: []}
    stage_ms: dict[str, list[float]] = {s: [] for s in QC_STAGES}
    try:
        for r in range(args.repeats + 1):
            for with_qc in (True, False):
                res = send_scan(scan, "127.0.0.1", server.port, config_name=None, config_text=chain_text(with_qc), pace=args.pace)
                assert res.closed and not res.errors, res.texts
                if r == 0:
                    continue
                lat[with_qc] += [image_latency_ms(im) for im in res.images]
                if with_qc:
                    time.sleep(0.2)
                    session = server.finished[-1]
                    for st in session.runner.times:
                        if st.name in stage_ms:
                            stage_ms[st.name] += [d / 1e6 for d in st.durations_ns]
    finally:
        server.stop()

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
        "latency_ms_with_qc": pct(lat[True]),
        "latency_ms_without_qc": pct(lat[False]),
        "qc_stage_ms_per_call": {k: pct(v) for k, v in stage_ms.items() if v},
    }
    args.out.write_text(json.dumps(result, indent=2))
    w, wo = result["latency_ms_with_qc"], result["latency_ms_without_qc"]
    print(f"with QC    p50 {w['p50']:.1f} ms  p99 {w['p99']:.1f} ms")
    print(f"without QC p50 {wo['p50']:.1f} ms  p99 {wo['p99']:.1f} ms")
    for k, v in result["qc_stage_ms_per_call"].items():
        print(f"{k}: p50 {v['p50']:.3f} ms, p99 {v['p99']:.3f} ms per call ({v['n']} calls)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
