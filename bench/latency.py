"""Per-image latency after the last readout, over a real socket to a separate server process.

    python bench/latency.py [--repeats N] [--out bench/results/latency_cpu.json]

Cases: the 14-channel Siemens R=3 scan from ../shared/data (one image per run, so the run
is repeated), and a simulated 32-coil, 256x256 (512 readout samples), 10-slice scan.
Each case is streamed at scanner pace (time stamps) and as fast as possible; the first run
of each case is warm-up and excluded. The latency is the server's own measurement (image
meta ``InlineLatencyAfterLastReadout_ms``: send time minus arrival of the image's last readout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inline.client import send_scan  # noqa: E402
from inline.demo import image_latency_ms  # noqa: E402
from inline.mrdfile import RawScan, read_scan  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(journal: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inline.cli", "serve", "--port", str(port), "--journal-dir", str(journal), "--log-level", "warning"],
        cwd=REPO,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def run_case(name: str, scan: RawScan, port: int, pace: str, repeats: int) -> dict:
    lat: list[float] = []
    wall = []
    for r in range(repeats + 1):
        res = send_scan(scan, "127.0.0.1", port, config_name="default", pace=pace)
        if res.errors or not res.closed:
            raise RuntimeError(f"{name}: {res.texts}")
        if r == 0:
            continue  # warm-up
        lat += [image_latency_ms(im) for im in res.images]
        wall.append(res.send_duration_s)
    v = np.asarray(lat)
    row = {
        "case": name,
        "pace": pace,
        "images": int(v.size),
        "runs": repeats,
        "latency_ms": {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99)), "max": float(v.max())},
        "stream_duration_s_median": float(np.median(wall)),
    }
    print(f"{name:40s} {pace:8s} n={v.size:4d}  p50 {row['latency_ms']['p50']:7.1f} ms  p99 {row['latency_ms']['p99']:7.1f} ms  max {row['latency_ms']['max']:7.1f} ms")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latency_cpu.json")
    args = ap.parse_args()

    from inline.demo import simulated_demo_scan

    cases = []
    siemens = REPO.parent / "shared" / "data" / "siemens_skyra_ssfp_14ch_R3_phantom.h5"
    if siemens.exists():
        cases.append(("siemens_skyra_ssfp_14ch_R3", read_scan(siemens), max(args.repeats * 4, 20)))
    # 2D multi-slice spoiled GRE, TR 100 ms, interleaved slices: 2560 readouts of 32 x 512
    cases.append(("simulated_32ch_256x256_10slices", simulated_demo_scan(10, 32, 256), args.repeats))

    rows = []
    with tempfile.TemporaryDirectory() as journal:
        proc, port = start_server(Path(journal))
        try:
            for name, scan, repeats in cases:
                for pace in ("realtime", "fast"):
                    rows.append(run_case(name, scan, port, pace, repeats if pace == "fast" else max(1, repeats // 2) if "simulated" in name else repeats))
        finally:
            proc.terminate()
            proc.wait(10)
    import ismrmrd
    import scipy

    result = {
        "benchmark": "image latency after last readout, default chain, server in a separate process",
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "device": "CPU"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__, "ismrmrd": ismrmrd.__version__ if hasattr(ismrmrd, "__version__") else "?"},
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
