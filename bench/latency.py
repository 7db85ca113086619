"""Per-image latency after the last readout: superseded by ``inline bench``.

    python bench/latency.py [inline bench options]

The latency benchmark this script used to run (a server in a separate process, a simulated
32-coil, 256x256, 10-slice scan replayed at scanner pace and as fast as possible, warm-up
excluded, the server's own latency measurement) is now the ``2d_32ch_256`` case of
``inline bench`` (:mod:`inline.benchmark`), which adds concurrent sessions, per-gadget times,
CPU and memory, and the peers. This runs that case (at scanner pace; ``--pace fast`` for as
fast as possible); results go to ``bench/results/2d_32ch_256.json`` (``bench/results/latency_cpu.json`` is the
last result of the old script).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inline.cli import app  # noqa: E402


def main(argv: list[str]) -> None:
    args = ["bench", "--case", "2d_32ch_256", "--out", str(REPO / "bench" / "results"), *argv]
    app(args, standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])
