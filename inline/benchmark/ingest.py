"""Ingest: how fast a receiver takes an MRD stream off a loopback TCP socket.

A sender process (:mod:`inline.benchmark._sender`, so it shares no interpreter lock with
the receiver) sends a stream file message by message (``sendall`` each, as a scanner does),
then CLOSE. Three
receivers are timed, each on its own run of the same stream:

* ``inline``: :class:`inline.protocol.MessageReader` on the socket (what a session runs);
* ``ismrmrd``: ``ismrmrd.serialization.ProtocolDeserializer(sock.makefile('rb'))``;
* ``raw``: a ``recv_into`` loop into one 1 MiB buffer that only counts bytes: the ceiling
  for any Python receiver.

Wall clock runs from ``accept()`` to the last byte; CPU time is the receiving process's
(user + system). On a 2-core machine sender, receiver and the kernel's loopback copy share
the cores, so for large messages the wall-clock rate is set by the loopback transfer and
receivers are better compared by CPU time per acquisition; for small messages both agree.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import ismrmrd
import numpy as np

from inline.protocol import MessageId, MessageReader

RAW_BUFFER_BYTES = 1 << 20
RECEIVERS = ("inline", "ismrmrd", "raw")
DESCRIPTIONS = {
    "inline": "inline.protocol.MessageReader(socket)",
    "ismrmrd": "ismrmrd.serialization.ProtocolDeserializer(socket.makefile('rb'))",
    "raw": f"socket.recv_into loop, {RAW_BUFFER_BYTES}-byte buffer, counts bytes only",
}
_CLOSE = int(MessageId.CLOSE).to_bytes(2, "little")
_ACQUISITION = int(MessageId.ACQUISITION)


def _recv_inline(conn: socket.socket) -> int:
    count = 0
    for msg_id, _obj in MessageReader(conn):
        if msg_id is MessageId.ACQUISITION:
            count += 1
    return count


def _recv_ismrmrd(conn: socket.socket) -> int:
    from ismrmrd.serialization import ProtocolDeserializer

    count = 0
    with conn.makefile("rb") as f:
        for obj in ProtocolDeserializer(f).deserialize():  # returns at CLOSE
            if isinstance(obj, ismrmrd.Acquisition):
                count += 1
    return count


def _recv_raw(conn: socket.socket) -> int:
    buf = bytearray(RAW_BUFFER_BYTES)
    mv = memoryview(buf)
    total = 0
    while n := conn.recv_into(mv):
        total += n
    return total


_RECEIVE: dict[str, Callable[[socket.socket], int]] = {"inline": _recv_inline, "ismrmrd": _recv_ismrmrd, "raw": _recv_raw}


def stream_census(path: Path, offsets: np.ndarray, count: int | None = None) -> tuple[int, int, int]:
    """``(messages, acquisitions, bytes)`` that sending ``count`` messages (cycling; None: each
    once) of the stream puts on the wire, CLOSE included."""
    n = len(offsets) - 1
    count = n if count is None else count
    ids = np.empty(n, np.int64)
    with open(path, "rb") as f:
        for i in range(n):
            f.seek(int(offsets[i]))
            ids[i] = int.from_bytes(f.read(2), "little")
    sizes = np.diff(offsets)
    full, rest = divmod(count, n)
    acq = full * int((ids == _ACQUISITION).sum()) + int((ids[:rest] == _ACQUISITION).sum())
    nbytes = full * int(sizes.sum()) + int(sizes[:rest].sum()) + len(_CLOSE)
    return count + 1, acq, nbytes


def run_once(name: str, path: Path, offsets: np.ndarray, count: int | None = None, timeout_s: float = 300.0) -> dict:
    """One timed run of receiver ``name`` on the stream; checks it got everything.

    Raises:
        RuntimeError: the sender did not start, or the receiver got less than was sent.
    """
    _, acquisitions, total_bytes = stream_census(path, offsets, count)
    with socket.create_server(("127.0.0.1", 0)) as server, tempfile.TemporaryDirectory(prefix="inline-ingest-") as d:
        port = server.getsockname()[1]
        np.save(Path(d) / "offsets.npy", np.asarray(offsets, np.int64))
        cmd = [sys.executable, "-m", "inline.benchmark._sender", str(port), str(path), str(Path(d) / "offsets.npy"), str(count or len(offsets) - 1)]
        proc = subprocess.Popen(cmd)
        try:
            server.settimeout(timeout_s)  # the sender connects once its stream is in memory
            conn, _ = server.accept()
        except OSError as e:
            proc.kill()
            raise RuntimeError(f"sender did not connect: {e}") from e
        conn.settimeout(None)
        t0 = time.perf_counter()
        c0 = time.process_time()
        got = _RECEIVE[name](conn)
        cpu = time.process_time() - c0
        elapsed = time.perf_counter() - t0
        conn.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    expected = total_bytes if name == "raw" else acquisitions
    if got != expected:
        raise RuntimeError(f"{name} receiver got {got} {'bytes' if name == 'raw' else 'acquisitions'}, expected {expected}")
    return {
        "seconds": elapsed,
        "acquisitions": acquisitions,
        "bytes": total_bytes,
        "acq_per_s": acquisitions / elapsed,
        "MB_per_s": total_bytes / elapsed / 1e6,
        "receiver_cpu_us_per_acq": cpu / max(acquisitions, 1) * 1e6,
    }


def compare(
    path: Path,
    offsets: np.ndarray,
    repeats: int = 3,
    count: int | None = None,
    on_run: Callable[[str, int, dict], None] | None = None,
) -> dict:
    """Every receiver ``repeats`` times, interleaved; medians per receiver and ratios of ours.

    ``on_run(receiver, repeat, result)`` is called after each run (progress, printing).
    """
    runs: dict[str, list[dict]] = {name: [] for name in RECEIVERS}
    for rep in range(repeats):
        for name in RECEIVERS:
            r = run_once(name, path, offsets, count)
            runs[name].append(r)
            if on_run is not None:
                on_run(name, rep, r)
    results = {
        name: {
            "median_acq_per_s": statistics.median(r["acq_per_s"] for r in rs),
            "median_MB_per_s": statistics.median(r["MB_per_s"] for r in rs),
            "median_receiver_cpu_us_per_acq": statistics.median(r["receiver_cpu_us_per_acq"] for r in rs),
            "runs_acq_per_s": [round(r["acq_per_s"], 1) for r in rs],
            "runs_receiver_cpu_us_per_acq": [round(r["receiver_cpu_us_per_acq"], 3) for r in rs],
        }
        for name, rs in runs.items()
    }
    wall = {name: s["median_acq_per_s"] for name, s in results.items()}
    cpu = {name: s["median_receiver_cpu_us_per_acq"] for name, s in results.items()}
    first = runs["inline"][0]
    return {
        "acquisitions_per_run": first["acquisitions"],
        "bytes_per_run": first["bytes"],
        "repeats": repeats,
        "results": results,
        "ratios": {
            # wall clock: acquisitions/s, higher is better
            "wall_inline_over_ismrmrd": wall["inline"] / wall["ismrmrd"],
            "wall_inline_over_raw": wall["inline"] / wall["raw"],
            # receiver CPU per acquisition, as speed: cost_other / cost_inline (higher is better)
            "cpu_inline_speed_over_ismrmrd": cpu["ismrmrd"] / cpu["inline"],
            "cpu_inline_speed_over_raw": cpu["raw"] / cpu["inline"],
        },
    }
