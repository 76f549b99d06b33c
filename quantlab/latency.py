"""Latency measurement that stops when the median is known well enough.

A fixed number of timed runs is either too few for a fast model on a noisy machine or far too many
for a slow one (20 runs of a 1 s model is 20 s that tell no more than 5).  Benchmarking tools run
until the estimate is stable instead; here the estimate is the **median** run time and "stable" means
that a distribution-free confidence interval of the median is narrow.

For ``n`` sorted run times ``t(1) <= ... <= t(n)``, the number of runs below the true median is
Binomial(n, 1/2), so the interval ``[t(lo), t(hi)]`` with

    lo = floor(n/2 - z * sqrt(n)/2),   hi = ceil(n/2 + z * sqrt(n)/2)   (1-based, clipped to 1..n)

holds the median with probability about 95% for ``z = 1.96`` (normal approximation of the binomial),
whatever the shape of the timing distribution (outliers from other processes included).  Timing
stops once ``(t(hi) - t(lo)) / 2 <= rel_halfwidth * median`` after at least ``min_runs`` runs, or at
``max_runs``, or when ``budget_s`` seconds of timed runs are spent (never before ``min(3, max_runs)``
runs).  Worked example: n = 5 gives lo = 1, hi = 5: the interval is min..max, so five runs within
+-5% of their median already stop the measurement; a run 30% slower than the others keeps it going.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Z_95 = 1.96
MIN_RUNS = 5
REL_HALFWIDTH = 0.05
BUDGET_S = 2.0  # timed seconds per measurement after which a noisy machine stops it (at least 3 runs)


def median_interval(times: np.ndarray, z: float = Z_95) -> tuple[float, float]:
    """The distribution-free interval ``(t(lo), t(hi))`` around the median of ``times`` (see module)."""
    t = np.sort(np.asarray(times, dtype=np.float64))
    n = t.shape[0]
    half = z * math.sqrt(n) / 2.0
    lo = min(max(math.floor(n / 2.0 - half), 1), n)
    hi = min(max(math.ceil(n / 2.0 + half), 1), n)
    return float(t[lo - 1]), float(t[hi - 1])


def is_stable(times: np.ndarray, rel_halfwidth: float = REL_HALFWIDTH) -> bool:
    """Whether the median's interval half-width is within ``rel_halfwidth`` of the median."""
    lo, hi = median_interval(times)
    return (hi - lo) / 2.0 <= rel_halfwidth * float(np.median(times))


def time_runs(
    run: Callable[[], Any],
    *,
    warmup: int,
    max_runs: int,
    min_runs: int = MIN_RUNS,
    rel_halfwidth: float = REL_HALFWIDTH,
    budget_s: float | None = None,
) -> np.ndarray:
    """Seconds of each timed call of ``run``, after ``warmup`` untimed calls; see the module docstring.

    Returns an empty array when ``max_runs <= 0`` (nothing is run).
    """
    if max_runs <= 0:
        return np.zeros(0)
    for _ in range(warmup):
        run()
    floor = min(3, max_runs)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
        spent += times[-1]
        n = len(times)
        if n >= min(min_runs, max_runs) and is_stable(np.asarray(times), rel_halfwidth):
            break
        if budget_s is not None and spent >= budget_s and n >= floor:
            break
    return np.asarray(times)
