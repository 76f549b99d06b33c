"""PercentileCalibrator against a bin-by-bin reference and np.percentile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quantlab.calibrators.percentile import PercentileCalibrator
from quantlab.errors import QuantlabError
from quantlab.stats import TensorStats


def reference_amax(stats: TensorStats, percentile: float) -> float:
    """Walk the bins, accumulating counts, until the CDF reaches percentile / 100."""
    if stats.range == 0.0:
        return stats.amax
    total = int(stats.hist.sum())
    seen = 0
    for k, count in enumerate(stats.hist):
        seen += int(count)
        if seen / total >= percentile / 100:
            return min((k + 1) * stats.bin_width, stats.amax)
    raise AssertionError("the CDF always reaches 1")


def samples(kind: str, seed: int = 0, n: int = 50_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return {
        "normal": lambda: rng.normal(size=n),
        "laplace": lambda: rng.laplace(size=n),
        "relu": lambda: np.maximum(rng.normal(size=n), 0.0),
        "outliers": lambda: np.concatenate([rng.normal(size=n), [9.0, -11.0, 12.5]]),
        "discrete": lambda: rng.choice([-1.5, 0.25, 0.5, 3.0], size=n),
    }[kind]()


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 100.0])
@pytest.mark.parametrize("kind", ["normal", "laplace", "relu", "outliers", "discrete"])
def test_matches_reference(kind: str, percentile: float) -> None:
    stats = TensorStats.from_array(kind, samples(kind))
    amax = PercentileCalibrator(percentile).compute_amax(stats)
    assert amax == reference_amax(stats, percentile)
    assert 0.0 <= amax <= stats.amax


def test_within_one_bin_of_numpy_percentile() -> None:
    x = np.random.default_rng(7).normal(size=1_000_000)
    stats = TensorStats.from_array("t", x)
    amax = PercentileCalibrator(99.99).compute_amax(stats)
    assert abs(amax - np.percentile(np.abs(x), 99.99)) <= stats.bin_width


def test_worked_example() -> None:
    stats = TensorStats.from_array("t", np.array([0.1] * 5 + [0.6] * 3 + [1.1, 1.7]), nbins=4)
    assert stats.hist.tolist() == [5, 3, 1, 1]
    assert PercentileCalibrator(90.0).compute_amax(stats) == 1.5
    assert PercentileCalibrator(90.01).compute_amax(stats) == 1.7  # upper edge 2.0, clamped


def test_hundred_is_the_max() -> None:
    x = np.random.default_rng(3).laplace(size=1000)
    assert PercentileCalibrator(100).compute_amax(TensorStats.from_array("t", x)) == np.abs(x).max()


def test_all_zero_and_empty() -> None:
    assert PercentileCalibrator().compute_amax(TensorStats.from_array("t", np.zeros(5))) == 0.0
    assert PercentileCalibrator().compute_amax(TensorStats("empty")) == 0.0


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.5, float("nan"), "99.9", True, None])
def test_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(QuantlabError, match="0 < p <= 100"):
        PercentileCalibrator(bad)  # type: ignore[arg-type]


def test_default_and_frozen() -> None:
    calibrator = PercentileCalibrator()
    assert calibrator.percentile == 99.99 and calibrator.name == "percentile"
    with pytest.raises(dataclasses.FrozenInstanceError):
        calibrator.percentile = 50.0  # type: ignore[misc]
