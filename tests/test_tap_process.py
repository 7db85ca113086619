"""Taps in worker processes (inline.tap_process): same findings and images as taps on threads,
timings reported, failures and a dead worker fail only their session, device taps stay home."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from prometheus_client import generate_latest

from inline.client import send_scan
from inline.config import Stage, load_chain
from inline.engine import ChainRunner, GadgetError, remote_tap_indices
from inline.gadget import AccumulatingGadget, GadgetParams, PureGadget, SessionContext
from inline.mrdfile import RawScan
from inline.offline import run_chain
from inline.qc.faults import dead_coil, rf_spike
from inline.server import InlineServer
from inline.session import SessionSettings
from inline.simulate import simulate_scan
from inline.tap_process import RemoteTapError, TapHost
from inline.trace import Trace

pytestmark = pytest.mark.timeout(120)


class CountTap(AccumulatingGadget):
    """Says which process saw item 3, and how many items it saw at the end."""

    tap = True
    accepts = (int,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.seen = 0

    def process(self, item, trace):
        yield item, trace  # the echo: dropped by the engine
        self.seen += 1
        if item == 3:
            yield f"pid {os.getpid()} saw 3", trace

    def close(self):
        yield f"seen {self.seen}", Trace(0, 0)


class FailingTap(AccumulatingGadget):
    tap = True
    accepts = (int,)

    def process(self, item, trace):
        yield item, trace
        if item == 2:
            raise ValueError("bad item 2")


class SlowTap(AccumulatingGadget):
    tap = True
    accepts = (int,)

    def process(self, item, trace):
        yield item, trace
        time.sleep(0.05)


class Increment(PureGadget):
    accepts = (int,)

    def apply(self, item):
        return item + 100


class FakeToDevice(PureGadget):
    accepts = (int,)
    moves_arrays_to = "device"

    def apply(self, item):
        return item


class FakeToHost(FakeToDevice):
    moves_arrays_to = "host"


@pytest.fixture(scope="module")
def host():
    h = TapHost(1)
    assert h.wait_ready(60)
    yield h
    h.close()


def run(stages, items, tap_host):
    out = []
    runner = ChainRunner(stages, SessionContext(header=None, session_id="t"), lambda i, t: out.append(i), tap_host=tap_host).start()
    try:
        for k, it in enumerate(items):
            runner.put(it, Trace(k, k))
    finally:
        runner.close(timeout_s=30)
    return out, runner


def test_tap_runs_in_the_worker_and_the_data_path_is_unchanged(host):
    stages = [Stage("count", CountTap, GadgetParams()), Stage("inc", Increment, GadgetParams())]
    out, runner = run(stages, [1, 2, 3, 4, "text"], host)
    assert runner.remote_taps == [0]
    assert [o for o in out if isinstance(o, int)] == [101, 102, 103, 104]  # in order, echo dropped
    found = [o for o in out if isinstance(o, str) and o.startswith("pid")]
    assert found == [f"pid {host.pids[0]} saw 3"] and host.pids[0] != os.getpid()
    assert out.count("seen 4") == 1  # close() findings reach the sink before the run ends
    assert "text" in out
    assert len(runner.times[0].durations_ns) == 5  # four process calls and close, timed in the worker


def test_a_failing_tap_fails_its_session_and_the_worker_serves_the_next(host):
    stages = [Stage("fail", FailingTap, GadgetParams())]
    with pytest.raises(GadgetError, match="bad item 2") as e:
        run(stages, [1, 2, 3], host)
    assert isinstance(e.value.__cause__, RemoteTapError)
    assert "ValueError" in e.value.__cause__.remote_traceback
    out, _ = run([Stage("count", CountTap, GadgetParams())], [3], host)
    assert "seen 1" in out


def test_a_dead_worker_fails_its_sessions_and_is_replaced():
    host = TapHost(1)
    try:
        assert host.wait_ready(60)
        pid = host.pids[0]
        out = []
        runner = ChainRunner(
            [Stage("slow", SlowTap, GadgetParams())], SessionContext(header=None, session_id="k"), lambda i, t: out.append(i), tap_host=host
        ).start()
        for k in range(40):
            runner.put(k, Trace(k, k))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(GadgetError, match="exited"):
            runner.close(timeout_s=30)
        assert len(out) == 40  # the data path forwarded every message anyway
        deadline = time.monotonic() + 30
        while host.pids[0] == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.pids[0] != pid and host.available
        out, _ = run([Stage("count", CountTap, GadgetParams())], [3], host)
        assert "seen 1" in out
    finally:
        host.close()


def test_which_taps_leave_the_process():
    class LocalTap(CountTap):  # made inside a function: cannot be pickled by reference
        pass

    stages = [
        Stage("a", CountTap, GadgetParams()),
        Stage("dev", FakeToDevice, GadgetParams()),
        Stage("b", CountTap, GadgetParams()),  # its items live on the GPU: stays on a thread
        Stage("back", FakeToHost, GadgetParams()),
        Stage("c", CountTap, GadgetParams()),
        Stage("local", LocalTap, GadgetParams()),
        Stage("inc", Increment, GadgetParams()),
    ]
    gadgets = [s.cls(SessionContext(header=None), s.params) for s in stages]
    assert remote_tap_indices(stages, gadgets) == [0, 4]


def _faulty_scan() -> RawScan:
    sim = simulate_scan(matrix=64, slices=4, coils=8, snr=40, seed=11)
    scan = dead_coil(RawScan(sim.header_xml, list(sim.acquisitions)), channel=5, from_fraction=0.5).scan
    return rf_spike(scan, amplitude_rel=0.5, seed=0).scan


def _findings(alerts):
    return sorted((a.code.value, tuple(a.slices or ()), round(a.value, 6)) for a in alerts)


def test_default_chain_gives_the_same_alerts_and_images_with_taps_in_the_worker(host):
    scan, spec = _faulty_scan(), load_chain("default")
    on_threads = run_chain(spec, scan)
    in_worker = run_chain(spec, scan, tap_host=host)
    codes = {a.code.value for a in on_threads.alerts}
    assert {"coil_dropout", "rf_spike"} <= codes
    assert _findings(in_worker.alerts) == _findings(on_threads.alerts)
    assert len(in_worker.images) == len(on_threads.images) == 4
    for a, b in zip(on_threads.images, in_worker.images):
        np.testing.assert_array_equal(a.data, b.data)
    stage = "readout_qc (ReadoutQC)"
    assert in_worker.summary.stages[stage].n == on_threads.summary.stages[stage].n == len(scan.items) + 1  # each readout and close, timed in the worker


def test_server_with_a_tap_worker_reports_the_fault_to_the_scanner():
    srv = InlineServer("127.0.0.1", 0, SessionSettings(idle_timeout_s=10.0), tap_workers=1, metrics_port=0)
    srv.start_background()
    try:
        assert srv.settings.tap_host.wait_ready(60)
        pid = srv.settings.tap_host.pids[0]
        result = send_scan(_faulty_scan(), "127.0.0.1", srv.port, config_name="default", pace="fast")
        assert result.closed and not result.errors, result.texts
        assert len(result.images) == 4
        assert any("[coil_dropout]" in t for t in result.alerts) and any("[rf_spike]" in t for t in result.alerts)
        # the worker's CPU and memory are the server's too: exported beside the process's own
        text = generate_latest(srv.settings.metrics.registry).decode()
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("inline_qc_worker")}
        assert values["inline_qc_worker_cpu_seconds_total"] > 0
        assert values["inline_qc_worker_peak_resident_bytes"] > 20 * 2**20  # NumPy, SciPy and the QC gadgets
    finally:
        srv.stop()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)  # stopping the server stops its workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
