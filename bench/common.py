"""Helpers shared by the accuracy/latency scripts in bench/ (run as ``python bench/X.py``)."""

from __future__ import annotations

import statistics
import time

import numpy as np


def fitted_nrmse(image: np.ndarray, reference: np.ndarray, support: np.ndarray) -> float:
    """NRMSE of ``|image|`` against ``reference`` over ``support`` after the least-squares
    magnitude scale (reconstructions differ in global scale by construction)."""
    a, r = np.abs(image)[support], reference[support]
    s = float(a @ r) / float(a @ a)
    return float(np.linalg.norm(s * a - r) / np.linalg.norm(r))


def median_time(fn, repeats: int, warm: bool = False) -> tuple[float, object]:
    """``(median wall time [s] of repeats calls, last result)``; ``warm``: one untimed call first."""
    if warm:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out
