"""EntropyCalibrator against a literal, one-candidate-at-a-time reference, plus sanity checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy

from quantlab.calibrators.entropy import (
    TIE_ATOL,
    EntropyCalibrator,
    damp_zero_spike,
    expand_levels,
    kl_divergences,
)
from quantlab.stats import TensorStats

from distributions import DISTRIBUTIONS, stats_of


def reference_divergences(bins: np.ndarray, num_levels: int) -> list[tuple[int, float]]:
    """(i, KL(P || Q)) for every candidate, built literally as in the TensorRT description.

    P and Q are built one candidate at a time; scipy computes every KL in one call over the rows
    (zero-padded to the full length: bins where P and Q are both 0 add nothing).
    """
    bins = np.asarray(bins, dtype=np.float64)
    last = int(np.flatnonzero(bins)[-1])
    candidates = list(range(num_levels, last + 2))
    ps = np.zeros((len(candidates), len(bins)))
    qs = np.zeros((len(candidates), len(bins)))
    for row, i in enumerate(candidates):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        m = i // num_levels
        level = np.minimum(np.arange(i) // m, num_levels - 1)
        level_mass = np.bincount(level, weights=bins[:i], minlength=num_levels)
        level_filled = np.bincount(level, weights=p > 0, minlength=num_levels)
        filled = p > 0
        ps[row, :i] = p
        qs[row, np.flatnonzero(filled)] = level_mass[level[filled]] / level_filled[level[filled]]
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = entropy(ps, qs, axis=1)
    kl[qs.sum(axis=1) == 0] = math.inf  # nothing kept before i: scipy gives nan for 0/0
    return [(i, float(v)) for i, v in zip(candidates, kl)]


def reference_amax(stats: TensorStats, num_levels: int) -> float:
    if stats.range == 0.0:
        return 0.0
    bins = stats.hist.astype(np.float64)
    bins[0] = bins[1]
    if np.flatnonzero(bins)[-1] + 1 < num_levels:
        return stats.amax
    divergences = reference_divergences(bins, num_levels)
    best = min(kl for _, kl in divergences)
    i_best = max(i for i, kl in divergences if kl <= best + TIE_ATOL)
    return min(i_best * stats.bin_width, stats.amax)


def test_slide_example() -> None:
    q = expand_levels(np.array([1, 0, 2, 3, 5, 3, 1, 7]), 2)
    assert q.tolist() == [2, 0, 2, 2, 4, 4, 4, 4]


def test_expand_levels_last_level_takes_the_remainder() -> None:
    # 7 bins into 2 levels: m = 3, level 0 = bins 0..2, level 1 = bins 3..6.
    q = expand_levels(np.array([3, 0, 3, 1, 1, 0, 6]), 2)
    assert q.tolist() == [3, 0, 3, 8 / 3, 8 / 3, 0, 8 / 3]


def test_damping_works_on_a_copy() -> None:
    hist = np.array([900, 40, 30, 5])
    assert damp_zero_spike(hist).tolist() == [40, 40, 30, 5]
    assert hist.tolist() == [900, 40, 30, 5]


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("kind", list(DISTRIBUTIONS))
def test_matches_reference(kind: str, unsigned: bool) -> None:
    stats = stats_of(kind)
    amax = EntropyCalibrator().compute_amax(stats, unsigned=unsigned)
    assert amax == reference_amax(stats, 256 if unsigned else 128)
    assert 0.0 <= amax <= stats.amax


@pytest.mark.parametrize("kind", ["relu", "outliers"])
def test_divergence_curve_matches_reference(kind: str) -> None:
    bins = damp_zero_spike(stats_of(kind).hist)
    cand, kl = kl_divergences(bins, 128)
    ref = reference_divergences(bins, 128)
    assert cand.tolist() == [i for i, _ in ref]
    ref_kl = np.array([v for _, v in ref])
    assert np.array_equal(np.isinf(kl), np.isinf(ref_kl))
    finite = np.isfinite(ref_kl)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=0, atol=1e-11)


def test_unsigned_uses_256_levels() -> None:
    stats = stats_of("outliers")
    signed, unsigned = reference_amax(stats, 128), reference_amax(stats, 256)
    assert signed != unsigned  # so the comparison below can tell the two apart
    assert EntropyCalibrator().compute_amax(stats, unsigned=True) == unsigned


def test_fewer_occupied_bins_than_levels_returns_max() -> None:
    stats = stats_of("normal", nbins=64)
    assert EntropyCalibrator().compute_amax(stats) == stats.amax == reference_amax(stats, 128)


def test_all_zero_tensor() -> None:
    assert EntropyCalibrator().compute_amax(stats_of("zeros")) == 0.0
    assert EntropyCalibrator().compute_amax(TensorStats("empty")) == 0.0


def test_constant_tensor_keeps_its_value() -> None:
    assert EntropyCalibrator().compute_amax(stats_of("constant")) == 0.7


def test_clips_far_outliers() -> None:
    stats = stats_of("outliers")
    assert EntropyCalibrator().compute_amax(stats) < 0.5 * stats.amax
    laplace = stats_of("laplace")
    assert EntropyCalibrator().compute_amax(laplace) < 0.9 * laplace.amax


def test_zero_spike_does_not_force_hard_clipping() -> None:
    # Without bins[0] = bins[1] the post-ReLU spike drives the search to about a third of the max.
    stats = stats_of("relu")
    assert EntropyCalibrator().compute_amax(stats) > 0.8 * stats.amax
