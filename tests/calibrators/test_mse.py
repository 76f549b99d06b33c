"""MseCalibrator against a literal per-bin reference, plus sanity checks."""

from __future__ import annotations


import numpy as np
import pytest

from quantlab.calibrators.mse import START_BIN, TIE_RTOL, MseCalibrator, quantization_mse
from quantlab.stats import TensorStats

from distributions import DISTRIBUTIONS, stats_of


def reference_mse(hist: np.ndarray, bin_width: float, qmax: int) -> list[tuple[int, float]]:
    """(i, MSE) for every candidate a = i * w: each bin centre rounded to the grid or clipped."""
    hist = np.asarray(hist, dtype=np.float64)
    centres = (np.arange(len(hist)) + 0.5) * bin_width
    last = int(np.flatnonzero(hist)[-1])
    result = []
    for i in range(START_BIN, last + 2):
        a = i * bin_width
        s = a / qmax
        err = np.where(centres <= a, (centres - np.round(centres / s) * s) ** 2, (centres - a) ** 2)
        result.append((i, float((hist * err).sum() / hist.sum())))
    return result


def reference_amax(stats: TensorStats, qmax: int) -> float:
    if stats.range == 0.0:
        return 0.0
    if np.flatnonzero(stats.hist)[-1] + 1 < START_BIN:
        return stats.amax
    errors = reference_mse(stats.hist, stats.bin_width, qmax)
    best = min(e for _, e in errors)
    i_best = max(i for i, e in errors if e <= best * (1 + TIE_RTOL))
    return min(i_best * stats.bin_width, stats.amax)


def test_worked_example() -> None:
    # One bin of 10 elements at centre 200.5 (w = 1): a = 150 clips it, a = 201 rounds it to 201.
    cand, mse = quantization_mse(np.array([0] * 200 + [10]), 1.0, 127, start=150)
    assert cand.tolist() == list(range(150, 202))
    assert mse[0] == pytest.approx(50.5**2)
    assert mse[cand == 201][0] == pytest.approx(0.25)


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("kind", list(DISTRIBUTIONS))
def test_matches_reference(kind: str, unsigned: bool) -> None:
    stats = stats_of(kind)
    amax = MseCalibrator().compute_amax(stats, unsigned=unsigned)
    assert amax == reference_amax(stats, 255 if unsigned else 127)
    assert 0.0 <= amax <= stats.amax


@pytest.mark.parametrize("kind", ["laplace", "discrete"])
def test_error_curve_matches_reference(kind: str) -> None:
    stats = stats_of(kind)
    cand, mse = quantization_mse(stats.hist, stats.bin_width, 127)
    ref = reference_mse(stats.hist, stats.bin_width, 127)
    assert cand.tolist() == [i for i, _ in ref]
    np.testing.assert_allclose(mse, [e for _, e in ref], rtol=1e-9)


def test_unsigned_uses_255_steps() -> None:
    stats = stats_of("normal")
    signed, unsigned = reference_amax(stats, 127), reference_amax(stats, 255)
    assert signed != unsigned  # so the comparison below can tell the two apart
    assert MseCalibrator().compute_amax(stats, unsigned=True) == unsigned


def test_fewer_occupied_bins_than_start_returns_max() -> None:
    stats = stats_of("normal", nbins=64)
    assert MseCalibrator().compute_amax(stats) == stats.amax == reference_amax(stats, 127)


def test_all_zero_tensor() -> None:
    assert MseCalibrator().compute_amax(stats_of("zeros")) == 0.0
    assert MseCalibrator().compute_amax(TensorStats("empty")) == 0.0


def test_constant_tensor_keeps_its_value() -> None:
    assert MseCalibrator().compute_amax(stats_of("constant")) == 0.7


def test_clips_far_outliers() -> None:
    stats = stats_of("far_outliers")
    assert MseCalibrator().compute_amax(stats) < 0.5 * stats.amax
    laplace = stats_of("laplace")
    assert MseCalibrator().compute_amax(laplace) < 0.9 * laplace.amax
