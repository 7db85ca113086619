"""Chain engine: pass-through of unaccepted messages, order, traces, backpressure, failures."""

import threading
import time

import pytest
from pydantic import Field

from inline.config import Stage
from inline.engine import ChainRunner, GadgetError
from inline.gadget import AccumulatingGadget, GadgetParams, PureGadget, SessionContext
from inline.trace import Trace


class Double(PureGadget):
    class Params(GadgetParams):
        factor: int = Field(2, description="multiplier")

    accepts = (int,)
    emits = (int,)

    def apply(self, item):
        return item * self.params.factor


class SumEvery(AccumulatingGadget):
    class Params(GadgetParams):
        n: int = Field(3, description="messages per sum")

    accepts = (int,)
    emits = (int,)

    def __init__(self, context, params=None):
        super().__init__(context, params)
        self.held = []

    def process(self, item, trace):
        self.held.append((item, trace))
        if len(self.held) == self.params.n:
            yield from self.close()

    def close(self):
        if self.held:
            out = sum(i for i, _ in self.held), Trace.merge_all(t for _, t in self.held)
            self.held = []
            yield out


class Boom(PureGadget):
    accepts = (int,)

    def apply(self, item):
        if item == 5:
            raise ValueError("bad line 5")
        return item


class Slow(PureGadget):
    accepts = (int,)

    def apply(self, item):
        time.sleep(0.01)
        return item


def run(stages, items, queue_size=4):
    out = []
    runner = ChainRunner(stages, SessionContext(header=None), lambda i, t: out.append((i, t)), queue_size=queue_size).start()
    for k, it in enumerate(items):
        runner.put(it, Trace(k, k))
    runner.close(timeout_s=10)
    return out, runner


def test_pure_and_accumulating_with_passthrough_and_traces():
    stages = [Stage("double", Double, Double.Params(factor=3)), Stage("sum", SumEvery, SumEvery.Params(n=2))]
    out, runner = run(stages, [1, "text", 2, 3])
    assert out[0] == ("text", Trace(1, 1))  # not accepted: passes untouched, first
    assert out[1] == (9, Trace(0, 2))  # (1 + 2) * 3, trace merged from messages 0 and 2
    assert out[2] == (9, Trace(3, 3))  # flushed at close
    assert [len(t.durations_ns) for t in runner.times] == [4, 4]  # 3 process calls + close, each stage


def test_gadget_failure_is_reported_with_stage_name_and_stops_workers():
    errors = []
    runner = ChainRunner([Stage("check", Boom, Boom.Params())], SessionContext(header=None), lambda i, t: None, on_error=errors.append).start()
    with pytest.raises(GadgetError, match="'check' \\(Boom\\) failed: ValueError: bad line 5"):
        for k in range(100):
            runner.put(k, Trace(k, k))
            time.sleep(0.001)
        runner.close(timeout_s=5)
    # the caller sees the error as soon as the worker records it; on_error runs just after, on the worker
    for t in runner._threads:
        t.join(2)
        assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0].__cause__, ValueError)


def test_backpressure_bounds_queues():
    stages = [Stage("slow", Slow, Slow.Params())]
    runner = ChainRunner(stages, SessionContext(header=None), lambda i, t: None, queue_size=2).start()
    t0 = time.perf_counter()
    for k in range(20):
        runner.put(k, Trace(k, k))
        assert runner._queues[0].qsize() <= 2
    # putting 20 messages into a 2-deep queue in front of a 10 ms stage must have waited
    assert time.perf_counter() - t0 > 0.1
    runner.close(timeout_s=5)


def test_abort_unblocks_a_full_chain():
    stages = [Stage("slow", Slow, Slow.Params())]
    runner = ChainRunner(stages, SessionContext(header=None), lambda i, t: None, queue_size=1).start()
    done = threading.Event()

    def producer():
        for k in range(1000):
            runner.put(k, Trace(k, k))
        done.set()

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    time.sleep(0.05)
    runner.abort()
    th.join(3)
    assert not th.is_alive()


class Tap(PureGadget):
    """Forwards its input first, then takes long: the next stage must not wait for it."""

    accepts = (int,)

    def process(self, item, trace):
        yield item, trace
        time.sleep(0.2)
        yield f"checked {item}", trace


def test_outputs_leave_as_soon_as_they_are_yielded():
    seen = []
    runner = ChainRunner([Stage("tap", Tap, Tap.Params())], SessionContext(header=None), lambda i, t: seen.append((i, time.perf_counter())), queue_size=4).start()
    t0 = time.perf_counter()
    runner.put(1, Trace(0, 0))
    runner.close(timeout_s=5)
    assert [i for i, _ in seen] == [1, "checked 1"]
    assert seen[0][1] - t0 < 0.1 and seen[1][1] - t0 >= 0.2
    assert runner.times[0].durations_ns[0] >= 0.2e9  # the gadget's own time still counts


class SlowInspector(AccumulatingGadget):
    """A tap: takes 50 ms per message and reports every odd one; echoes its input like QC taps."""

    accepts = (int,)
    tap = True

    def process(self, item, trace):
        yield item, trace  # dropped by the engine: the data path already has it
        time.sleep(0.05)
        if item % 2:
            yield f"odd {item}", trace

    def close(self):
        yield "inspected", Trace(0, 0)


def test_a_tap_never_delays_the_data_path():
    seen = []
    stages = [Stage("qc", SlowInspector, SlowInspector.Params()), Stage("double", Double, Double.Params())]
    runner = ChainRunner(stages, SessionContext(header=None), lambda i, t: seen.append((i, time.perf_counter())), queue_size=4).start()
    t0 = time.perf_counter()
    for k in range(6):
        runner.put(k, Trace(k, k))
    runner.close(timeout_s=10)
    data = [(i, t) for i, t in seen if isinstance(i, int)]
    assert [i for i, _ in data] == [0, 2, 4, 6, 8, 10]  # every message, once, in order
    assert max(t for _, t in data) - t0 < 0.1  # not behind 6 x 50 ms of inspection
    findings = [i for i, _ in seen if isinstance(i, str)]
    assert findings == ["odd 1", "odd 3", "odd 5", "inspected"]  # all findings, after close
    assert len(runner.times[0].durations_ns) == 7 and min(runner.times[0].durations_ns[:6]) >= 0.05e9


def test_hybrid_data_never_reach_a_kspace_gadget():
    """Even past the config check (a hand-built chain), the engine refuses a hybrid-space message
    for a gadget that does not declare accepts_hybrid, and passes it to one that does."""
    from dataclasses import dataclass

    from inline.engine import DomainError

    @dataclass
    class Buf:
        value: int
        domain: str = "hybrid"

    class NeedsKspace(PureGadget):
        accepts = (Buf,)

        def apply(self, item):
            return item

    class TakesHybrid(NeedsKspace):
        accepts_hybrid = True

    out, _ = run([Stage("h", TakesHybrid, GadgetParams())], [Buf(1)])
    assert [o.value for o, _ in out] == [1]
    with pytest.raises(GadgetError, match="needs k-space but got a Buf in hybrid space") as e:
        run([Stage("k", NeedsKspace, GadgetParams())], [Buf(1)])
    assert isinstance(e.value.__cause__, DomainError)
    out, _ = run([Stage("k", NeedsKspace, GadgetParams())], [Buf(2, "kspace")])
    assert [o.value for o, _ in out] == [2]
