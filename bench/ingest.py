"""Ingest benchmark: acquisitions/s received over a loopback TCP socket.

The receivers and the sender are :mod:`inline.benchmark.ingest` (``inline bench`` runs them
on every case's own stream). A sender process streams ``N`` pre-serialized acquisitions (``channels x samples``
complex64, no trajectory) then CLOSE; three receivers are timed, each on its own run of
that stream:

* ``inline``: :class:`inline.protocol.MessageReader` on the socket;
* ``ismrmrd``: ``ismrmrd.serialization.ProtocolDeserializer(sock.makefile('rb'))``;
* ``raw``: a ``recv_into`` loop into one 1 MiB buffer that only counts bytes, the ceiling
  for any Python receiver.

Each receiver runs ``--repeats`` times (interleaved); the table and
``bench/results/ingest_cpu.json`` report, per scenario, the median acquisitions/s and MB/s
(wall clock) and the receiver's CPU time per acquisition (user + system), and ratios.
A second scenario with small readouts (4 channels x 128 samples) shows the per-message
cost, which large readouts hide behind the copy out of the kernel.

    .venv/bin/python bench/ingest.py [--n 20000] [--channels 32] [--samples 512] [--repeats 7] [--small-n 100000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ismrmrd  # noqa: E402

from inline.benchmark.ingest import DESCRIPTIONS, compare  # noqa: E402
from inline.protocol import MessageWriter  # noqa: E402

DISTINCT_MESSAGES = 16  # the sender cycles through this many pre-serialized acquisitions


def write_acquisitions(path: Path, channels: int, samples: int, count: int) -> np.ndarray:
    """``count`` ACQUISITION messages with different data and counters into ``path``; their offsets."""
    rng = np.random.default_rng(1234)
    buf = io.BytesIO()
    w = MessageWriter(buf, flush=False)
    offsets = [0]
    for i in range(count):
        data = (rng.standard_normal((channels, samples)) + 1j * rng.standard_normal((channels, samples))).astype(np.complex64)
        acq = ismrmrd.Acquisition.from_array(data, scan_counter=i)
        acq.idx.kspace_encode_step_1 = i
        w.send_acquisition(acq)
        offsets.append(w.bytes_sent)
    path.write_bytes(buf.getvalue())
    return np.asarray(offsets, np.int64)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ismrmrd": metadata.version("ismrmrd"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_scenario(channels: int, samples: int, n: int, repeats: int) -> dict:
    """All receivers, ``repeats`` interleaved runs each (:func:`inline.benchmark.ingest.compare`)."""

    def show(name: str, rep: int, r: dict) -> None:
        print(
            f"  {channels}x{samples} repeat {rep + 1}/{repeats} {name:8s} {r['acq_per_s']:10.0f} acq/s "
            f"{r['MB_per_s']:7.0f} MB/s {r['receiver_cpu_us_per_acq']:7.2f} us CPU/acq",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="inline-ingest-") as d:
        path = Path(d) / "stream.mrd"
        offsets = write_acquisitions(path, channels, samples, DISTINCT_MESSAGES)
        out = compare(path, offsets, repeats=repeats, count=n, on_run=show)
    return {
        "acquisition": {"channels": channels, "samples": samples, "trajectory_dimensions": 0,
                        "message_bytes": 2 + 340 + channels * samples * 8},
        "n_per_run": n,
        "repeats": repeats,
        "results": out["results"],
        "ratios": out["ratios"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="acquisitions per run (main scenario)")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--small-n", type=int, default=100000,
                    help="acquisitions per run of the small-message scenario (4 x 128); 0 skips it")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ingest_cpu.json")
    args = ap.parse_args(argv)

    scenarios = {f"{args.channels}ch_x_{args.samples}": run_scenario(args.channels, args.samples, args.n, args.repeats)}
    if args.small_n:
        scenarios["4ch_x_128"] = run_scenario(4, 128, args.small_n, args.repeats)
    result = {
        "benchmark": "ingest: ACQUISITION messages over loopback TCP, sender in a separate process",
        "receivers": DESCRIPTIONS,
        "metrics": {
            "acq_per_s": "wall clock from accept() to the last byte, sender and receiver on the same machine",
            "receiver_cpu_us_per_acq": "time.process_time() of the receiving process (user + system) per acquisition",
        },
        "targets": {"inline_over_ismrmrd": 2.0, "inline_over_raw": 0.8},
        "notes": (
            "Sender and receiver share this machine's cores and the loopback copy work. For large "
            "messages the wall-clock rate is then set by the loopback transfer, not the receiver, and "
            "can even rise when the receiver is slower (data arrives in bigger batches); compare "
            "receivers by CPU us/acq there. For small messages the receiver's per-message work "
            "dominates and both metrics agree."
        ),
        "scenarios": scenarios,
        "machine": machine_info(),
    }

    print()
    for label, sc in scenarios.items():
        res = sc["results"]
        print(f"{label} ({sc['acquisition']['message_bytes']} bytes/message, n={sc['n_per_run']}, median of {sc['repeats']})")
        print(f"  {'receiver':9s} {'acq/s':>10s} {'MB/s':>8s} {'CPU us/acq':>11s}")
        for name, r in res.items():
            print(f"  {name:9s} {r['median_acq_per_s']:10.0f} {r['median_MB_per_s']:8.0f} {r['median_receiver_cpu_us_per_acq']:11.2f}")
        q = sc["ratios"]
        print(f"  wall: inline/ismrmrd {q['wall_inline_over_ismrmrd']:.2f}x, inline/raw {q['wall_inline_over_raw']:.2f}")
        print(f"  CPU:  inline is {q['cpu_inline_speed_over_ismrmrd']:.2f}x cheaper than ismrmrd, "
              f"{q['cpu_inline_speed_over_raw']:.2f} of raw's efficiency")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
