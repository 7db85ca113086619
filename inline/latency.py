"""Latency statistics of a session: per gadget and end to end (last readout -> image sent)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inline.engine import StageTimes


@dataclass(frozen=True)
class Percentiles:
    """p50/p95/p99/max of a sample [ms]; n is the sample size."""

    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_ns(cls, values_ns: list[int] | np.ndarray) -> "Percentiles":
        v = np.asarray(values_ns, dtype=np.float64) / 1e6
        if v.size == 0:
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return cls(int(v.size), float(p50), float(p95), float(p99), float(v.max()))

    def as_dict(self) -> dict:
        return {"n": self.n, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms}


@dataclass(frozen=True)
class LatencySummary:
    """What a session reports at its end (log line and TEXT message to the scanner)."""

    end_to_end: Percentiles
    stages: dict[str, Percentiles]

    @classmethod
    def build(cls, image_latencies_ns: list[int], stage_times: list[StageTimes]) -> "LatencySummary":
        return cls(
            Percentiles.of_ns(image_latencies_ns),
            {f"{s.name} ({s.gadget})": Percentiles.of_ns(s.durations_ns) for s in stage_times},
        )

    def as_dict(self) -> dict:
        return {"end_to_end": self.end_to_end.as_dict(), "stages": {k: v.as_dict() for k, v in self.stages.items()}}

    def format(self) -> str:
        e = self.end_to_end
        lines = [
            f"latency after last readout: {e.n} images, p50 {e.p50_ms:.1f} ms, p95 {e.p95_ms:.1f} ms, max {e.max_ms:.1f} ms"
        ]
        for name, p in self.stages.items():
            lines.append(f"  {name}: {p.n} calls, p50 {p.p50_ms:.2f} ms, p95 {p.p95_ms:.2f} ms, max {p.max_ms:.2f} ms")
        return "\n".join(lines)
