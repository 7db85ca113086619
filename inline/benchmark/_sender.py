"""Sender process of the ingest benchmark (:mod:`inline.benchmark.ingest`); imports only NumPy.

    python -m inline.benchmark._sender PORT STREAM_FILE OFFSETS_NPY COUNT

Connects to ``127.0.0.1:PORT`` once the stream is in memory, sends ``COUNT`` messages of the
stream (cycling through them, ``sendall`` each), then CLOSE, and waits for the receiver to close.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np

CLOSE = (4).to_bytes(2, "little")


def main(argv: list[str]) -> None:
    port, path, offsets_path, count = int(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    data = path.read_bytes()
    offsets = np.load(offsets_path)
    n = len(offsets) - 1
    views = [memoryview(data)[offsets[i] : offsets[i + 1]] for i in range(n)]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for i in range(count):
            sock.sendall(views[i % n])
        sock.sendall(CLOSE)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the receiver closes when it has read everything


if __name__ == "__main__":
    main(sys.argv[1:])
