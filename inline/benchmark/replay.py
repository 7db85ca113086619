"""The scanner side of a benchmark, and the server under test as a separate process.

:func:`replay` streams a :class:`~inline.benchmark.cases.PreparedScan` over a real socket:
a config message, the prepared bytes message by message (paced from the time stamps, or as
fast as possible), CLOSE; a second thread reads the replies with
:class:`~inline.protocol.MessageReader` until the server's CLOSE. It is
:func:`inline.client.send_scan` without the per-message serialisation: the messages are
byte slices of a memory map, so on this 2-core machine the sender takes almost no CPU from
the server it measures. Image latency is the server's own measurement (image meta
:data:`inline.session.LATENCY_META_KEY`: send minus arrival of the image's last readout).

:class:`ServerProcess` runs ``inline serve`` (metrics endpoint, per-session traces, no
journal, no alert bus, no dashboard) in a child process and scrapes its metrics.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import ismrmrd

from inline.benchmark.cases import PreparedScan
from inline.client import DEFAULT_TICK_S, QC_ALERT_TEXT, start_receiver
from inline.protocol import ConfigFile, ConfigText, MessageId, MessageWriter
from inline.session import LATENCY_META_KEY


@dataclass
class ReplayResult:
    """What one replayed session got back.

    Attributes:
        latencies_ms: server-measured latency of each returned image [ms] (NaN if absent).
        texts: returned TEXT messages.
        closed: the server sent CLOSE.
        acquisitions_sent: ACQUISITION messages sent.
        send_s: from the first to the last message of the stream sent [s].
        completion_ms: from the end of the stream's send to the last image received, as the
            scanner sees it [ms]; None without images. Unlike the server-measured latency it
            includes data still waiting in the socket when the server reads slower than it is fed.
        error: why the replay broke, if it did.
    """

    latencies_ms: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    closed: bool = False
    acquisitions_sent: int = 0
    bytes_sent: int = 0
    send_s: float = 0.0
    completion_ms: float | None = None
    error: str | None = None

    @property
    def images(self) -> int:
        return len(self.latencies_ms)

    @property
    def errors(self) -> list[str]:
        return [t for t in self.texts if t.startswith("ERROR") and not QC_ALERT_TEXT.match(t)] + ([self.error] if self.error else [])


_ACQUISITION_ID = int(MessageId.ACQUISITION).to_bytes(2, "little")


def _serialize(*objs: object) -> bytes:
    buf = io.BytesIO()
    w = MessageWriter(buf, flush=False)
    for o in objs:
        w.send(o)
    return buf.getvalue()


def _image_latency_ms(image: ismrmrd.Image) -> float:
    try:
        return float(ismrmrd.Meta.deserialize(image.attribute_string)[LATENCY_META_KEY])
    except (KeyError, ValueError, TypeError):
        return float("nan")


def replay(
    scan: PreparedScan,
    host: str,
    port: int,
    *,
    config_name: str | None = None,
    config_text: str | None = None,
    pace: str = "fast",
    tick_s: float = DEFAULT_TICK_S,
    timeout_s: float = 600.0,
) -> ReplayResult:
    """Stream ``scan`` to ``host:port`` and collect the replies (see the module docstring).

    Raises:
        ValueError: bad ``pace`` or no config.
        OSError: cannot connect.
    """
    if pace not in ("fast", "realtime"):
        raise ValueError(f"pace must be 'fast' or 'realtime', got {pace!r}")
    if config_name is None and config_text is None:
        raise ValueError("give a config name or config text")
    config = _serialize(ConfigText(config_text) if config_text is not None else ConfigFile(config_name))
    result = ReplayResult()
    last_image_t = [0.0]
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def image_received(image) -> None:
        result.latencies_ms.append(_image_latency_ms(image))
        last_image_t[0] = time.perf_counter()

    def broken(e: Exception) -> None:
        result.error = f"receiving broke: {e}"

    receiver = start_receiver(
        sock, timeout_s, on_image=image_received, on_text=result.texts.append,
        on_close=lambda: setattr(result, "closed", True), on_broken=broken, name="bench-receive",
    )
    data, offsets, stamps = scan.view(), scan.offsets, scan.stamps
    try:
        sock.sendall(config)
        t0 = time.perf_counter()
        stamp0 = int(stamps[0]) if len(stamps) else 0
        for i in range(len(stamps)):
            if result.closed:  # the server gave up (an error): stop streaming
                break
            if pace == "realtime":
                delay = t0 + (int(stamps[i]) - stamp0) * tick_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            chunk = data[offsets[i] : offsets[i + 1]]
            sock.sendall(chunk)
            result.bytes_sent += len(chunk)
            if chunk[:2] == _ACQUISITION_ID:
                result.acquisitions_sent += 1
        t_end = time.perf_counter()
        result.send_s = t_end - t0
        sock.sendall(MessageId.CLOSE.to_bytes(2, "little"))
    except OSError as e:
        result.error = f"sending broke: {e}"
    finally:
        del data
    receiver.join(timeout_s)
    if result.latencies_ms and result.send_s:
        result.completion_ms = (last_image_t[0] - (t0 + result.send_s)) * 1e3
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    return result


def replay_concurrently(scan: PreparedScan, host: str, port: int, sessions: int, stagger_s: float = 0.0, **kwargs) -> list[ReplayResult]:
    """``sessions`` replays of ``scan``, one thread each, session ``i`` started ``i * stagger_s``
    after the first (0: together, so their slices complete at the same moments: the worst case)."""
    results: list[ReplayResult | None] = [None] * sessions

    def one(i: int) -> None:
        time.sleep(i * stagger_s)
        try:
            results[i] = replay(scan, host, port, **kwargs)
        except OSError as e:
            results[i] = ReplayResult(error=f"cannot connect: {e}")

    threads = [threading.Thread(target=one, args=(i,), name=f"bench-session-{i}") for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


def scrape(port: int, timeout_s: float = 10.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``sample name -> [(labels, value)]`` from a Prometheus endpoint on localhost."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def sample(metrics: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


class ServerProcess:
    """``inline serve`` in a child process, for one benchmark case.

    Args:
        workdir: alert logs and per-session traces go here (``traces/``).
        preload: config whose models are warmed up at start (the case's); others load none.
        extra_args: more ``inline serve`` options.
    """

    def __init__(self, workdir: Path, preload: str | None = None, extra_args: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.trace_dir = self.workdir / "traces"
        self.port = free_port()
        self.metrics_port = free_port()
        cmd = [
            sys.executable, "-m", "inline.cli", "serve", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--trace-dir", str(self.trace_dir), "--alert-log-dir", str(self.workdir / "alerts"), "--bus", "",
            "--dashboard-port", "-1", "--log-level", "warning",
            *(["--preload", preload] if preload else ["--no-warmup"]), *extra_args,
        ]  # fmt: skip
        self.log_path = self.workdir / "server.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.proc)
            wait_for_port(self.metrics_port, self.proc)
        except Exception:
            self.stop()
            raise

    def scrape(self) -> dict:
        return scrape(self.metrics_port)

    def traces(self) -> list[Path]:
        """Span files of the finished sessions, in session start order."""
        return sorted(self.trace_dir.glob("*.trace.json"), key=_session_order)

    def wait_for_traces(self, count: int, timeout_s: float = 120.0) -> list[Path]:
        """Traces are written after a session's CLOSE: wait until ``count`` exist."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.traces()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _session_order(path: Path) -> tuple[int, str]:
    """Session ids are ``<utc time>_<counter>_<hex>``: order by the server's counter."""
    parts = path.name.split("_")
    try:
        return int(parts[1]), path.name
    except (IndexError, ValueError):
        return 1 << 62, path.name
