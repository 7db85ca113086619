"""Per-message trace: when the raw data behind a message arrived.

Every message in a chain travels with a :class:`Trace`. An image's end-to-end latency is
measured from the arrival of the last readout it was made from to its send on the socket,
the same definition as Holoscan's data-flow tracking (end of path minus ingress time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable


def now_ns() -> int:
    """Monotonic clock used for every arrival and send time stamp [ns]."""
    return time.perf_counter_ns()


@dataclass(frozen=True, slots=True)
class Trace:
    """Arrival times of the acquisitions a message was made from.

    Attributes:
        first_arrival_ns: arrival of the earliest contributing message [ns, :func:`now_ns` clock].
        last_arrival_ns: arrival of the latest contributing message [ns].
    """

    first_arrival_ns: int
    last_arrival_ns: int

    @classmethod
    def arrived(cls, t_ns: int | None = None) -> "Trace":
        """Trace of one message that arrived at ``t_ns`` (now when omitted)."""
        t = now_ns() if t_ns is None else t_ns
        return cls(t, t)

    def merge(self, other: "Trace") -> "Trace":
        """Trace of a message made from both ``self`` and ``other``."""
        return Trace(
            min(self.first_arrival_ns, other.first_arrival_ns),
            max(self.last_arrival_ns, other.last_arrival_ns),
        )

    @staticmethod
    def merge_all(traces: Iterable["Trace"]) -> "Trace":
        """Merge of a non-empty iterable of traces; raises ValueError when empty."""
        it = iter(traces)
        try:
            out = next(it)
        except StopIteration:
            raise ValueError("cannot merge an empty set of traces") from None
        for t in it:
            out = out.merge(t)
        return out
