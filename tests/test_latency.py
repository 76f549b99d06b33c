"""The stopping rule of latency measurement (quantlab.latency)."""

from __future__ import annotations

import numpy as np

from quantlab.latency import is_stable, median_interval, time_runs


def test_median_interval_is_the_order_statistics_around_the_median() -> None:
    # n = 5: lo = floor(2.5 - 2.19) = 1, hi = ceil(2.5 + 2.19) = 5 -> min..max
    assert median_interval(np.array([5.0, 1.0, 3.0, 2.0, 4.0])) == (1.0, 5.0)
    # n = 100: lo = floor(50 - 9.8) = 40, hi = ceil(50 + 9.8) = 60 (1-based)
    assert median_interval(np.arange(1.0, 101.0)) == (40.0, 60.0)


def test_stable_when_the_interval_is_narrow() -> None:
    assert is_stable(np.array([1.00, 1.01, 0.99, 1.02, 1.00]))
    assert not is_stable(np.array([1.0, 1.0, 1.0, 1.0, 1.5]))  # one slow run in five: keep timing


def test_time_runs_stops_early_on_steady_runs_and_counts_warmup_apart() -> None:
    calls = []
    times = time_runs(lambda: calls.append(1), warmup=2, max_runs=50, rel_halfwidth=10.0)
    assert len(times) == 5 and len(calls) == 7  # the minimum of 5 timed runs, after 2 warm-up runs
    assert time_runs(lambda: None, warmup=0, max_runs=0).size == 0


def test_time_runs_keeps_going_on_noisy_runs_up_to_the_limit() -> None:
    import itertools
    import time

    sleeps = itertools.cycle([0.001, 0.005])
    times = time_runs(lambda: time.sleep(next(sleeps)), warmup=0, max_runs=12, rel_halfwidth=0.1)
    assert len(times) == 12  # every other run takes 4 ms longer: the median is never within 10%


def test_time_runs_stops_at_the_budget_after_three_runs() -> None:
    import time

    times = time_runs(lambda: time.sleep(0.01), warmup=0, max_runs=100, rel_halfwidth=0.0, budget_s=0.001)
    assert len(times) == 3
