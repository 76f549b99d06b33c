"""Entropy calibrators against literal, one-candidate-at-a-time oracles, and against modelopt itself.

Each oracle builds ``P`` and ``Q`` of every candidate explicitly, as the published description
does, and computes ``KL(P || Q)`` term by term; the calibrators must return the very same threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab.calibrators import get_calibrator
from quantlab.calibrators.entropy import (
    MAX_CLIPPED,
    START_BIN,
    TIE_ATOL,
    EntropyCalibrator,
    ModelOptEntropyCalibrator,
    TensorRTEntropyCalibrator,
    clip_floor,
    damp_zero_spike,
)
from quantlab.calibrators.kl import expand_levels, kl_divergences, level_of_bins
from quantlab.errors import QuantlabError
from quantlab.stats import TensorStats

from distributions import DISTRIBUTIONS, stats_of

N = 50_000
# tensors with no mass near zero, on which a plain KL search clips nearly every value
COLLAPSING = {
    "bimodal": lambda rng: rng.choice([-3.0, 3.0], N) + rng.normal(0.0, 0.3, N),
    "far_uniform": lambda rng: rng.uniform(0.6, 0.9, N),
}
# values on a grid of 0.1: the divergence reaches 0 where the levels line up with the grid
ROUNDED = lambda rng: np.round(np.random.default_rng(36).standard_normal(200_000), 1)  # noqa: E731
CASES = {**DISTRIBUTIONS, **COLLAPSING, "rounded": ROUNDED}


def case_stats(kind: str, nbins: int = 2048, seed: int = 0) -> TensorStats:
    return TensorStats.from_array(kind, CASES[kind](np.random.default_rng(seed)), nbins=nbins)


# --- literal oracles -----------------------------------------------------------------------------


def literal_q(kept: np.ndarray, num_levels: int, cut: str, support: np.ndarray) -> np.ndarray:
    """``kept`` merged into levels, each level's mass spread evenly over its ``support`` bins."""
    i = len(kept)
    if cut == "floor":  # i // L bins per level, the last level takes the remainder
        level = np.minimum(np.arange(i) // (i // num_levels), num_levels - 1)
    else:  # np.linspace(0, i, L + 1) edges, np.digitize
        level = np.digitize(np.arange(i), np.linspace(0, i, num_levels + 1)) - 1
    level_mass = np.bincount(level, weights=kept, minlength=num_levels)
    receivers = np.bincount(level, weights=support, minlength=num_levels)
    q = np.zeros(i)
    q[support] = level_mass[level[support]] / receivers[level[support]]
    return q


def literal_kl(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(P || Q)`` of two unnormalised histograms: NaN when ``Q`` is empty, inf where ``Q`` misses ``P``."""
    if q.sum() == 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    mass = p > 0
    if np.any(q[mass] == 0):
        return math.inf
    return float(np.sum(p[mass] * np.log(p[mass] / q[mass])))


def divergences(bins: np.ndarray, num_levels: int, candidates: range, cut: str, support: str) -> list[float]:
    bins = np.asarray(bins, dtype=np.float64)
    out = []
    for i in candidates:
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()  # the outliers land in the last kept bin
        kept = bins[:i]
        out.append(literal_kl(p, literal_q(kept, num_levels, cut, (kept if support == "kept" else p) > 0)))
    return out


def oracle_trt(stats: TensorStats, unsigned: bool) -> float:
    """Migacz 2017: for i in range(128, 2048), first minimum, threshold (m + 0.5) * width."""
    if stats.range == 0.0:
        return 0.0
    levels = 256 if unsigned else 128
    cands = range(levels, stats.nbins)
    kl = np.array(divergences(stats.hist, levels, cands, "floor", "kept"))
    kl[np.isnan(kl)] = math.inf  # nothing kept: Q has no mass at all
    if not np.isfinite(kl).any():
        return stats.amax
    m = cands[int(np.flatnonzero(kl <= kl.min() + TIE_ATOL)[0])]
    return min((m + 0.5) * stats.bin_width, stats.amax)


def oracle_modelopt(stats: TensorStats, unsigned: bool) -> float:
    """_compute_amax_entropy: bins[0] = bins[1], i = 128 .. n, linspace levels, the last minimum
    of np.argmin over the reversed divergences (a NaN counts as the minimum)."""
    if stats.range == 0.0:
        return 0.0
    bins = stats.hist.astype(np.float64)
    bins[0] = bins[1]
    cands = range(128, stats.nbins + 1)
    kl = np.array(divergences(bins, 256 if unsigned else 128, cands, "linspace", "kept"))
    if np.isnan(kl).any():
        chosen = int(np.flatnonzero(np.isnan(kl))[-1])
    else:
        chosen = int(np.flatnonzero(kl <= kl.min() + TIE_ATOL)[-1])
    return min(cands[chosen] * stats.bin_width, stats.amax)


def oracle_default(stats: TensorStats, unsigned: bool, max_clipped: float = MAX_CLIPPED) -> float:
    """ModelOpt's divergences and choices, over the thresholds that clip at most max_clipped of the values."""
    if stats.range == 0.0:
        return 0.0
    hist = stats.hist.astype(np.float64)
    bins = hist.copy()
    bins[0] = bins[1]
    cands = range(128, stats.nbins + 1)
    kl = np.array(divergences(bins, 256 if unsigned else 128, cands, "linspace", "kept"))
    kl[np.isnan(kl)] = math.inf
    allowed = [k for k, i in enumerate(cands) if hist[i:].sum() <= max_clipped * hist.sum()]
    kl = kl[allowed]
    if not np.isfinite(kl).any():
        return stats.amax
    return min(cands[allowed[int(np.flatnonzero(kl <= kl.min() + TIE_ATOL)[-1])]] * stats.bin_width, stats.amax)


VARIANTS = [
    (TensorRTEntropyCalibrator(), oracle_trt),
    (ModelOptEntropyCalibrator(), oracle_modelopt),
    (EntropyCalibrator(), oracle_default),
]


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize(("calibrator", "oracle"), VARIANTS, ids=lambda v: getattr(v, "name", ""))
def test_matches_the_literal_oracle(calibrator, oracle, kind: str, unsigned: bool) -> None:
    stats = case_stats(kind, nbins=512)  # the algorithm is the same at 2048 bins (below), 16x cheaper here
    amax = calibrator.compute_amax(stats, unsigned=unsigned)
    assert amax == oracle(stats, unsigned)
    assert isinstance(amax, float) and 0.0 <= amax <= stats.amax


@pytest.mark.parametrize("kind", ["relu", "outliers", "far_uniform", "rounded"])
@pytest.mark.parametrize(("calibrator", "oracle"), VARIANTS, ids=lambda v: getattr(v, "name", ""))
def test_matches_the_literal_oracle_on_2048_bins(calibrator, oracle, kind: str) -> None:
    stats = case_stats(kind)
    assert calibrator.compute_amax(stats) == oracle(stats, False)


# --- the divergence curve ------------------------------------------------------------------------


def test_slide_example() -> None:
    assert expand_levels(np.array([1, 0, 2, 3, 5, 3, 1, 7]), 2).tolist() == [2, 0, 2, 2, 4, 4, 4, 4]


def test_level_cuts() -> None:
    # 7 bins into 2 levels: floor gives level 0 three bins and the last level the remainder (4);
    # linspace puts the edge at 3.5, so level 0 takes bins 0..3
    assert level_of_bins(7, 2, "floor").tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert level_of_bins(7, 2, "linspace").tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert level_of_bins(7, 2, "linspace").tolist() == list(np.digitize(np.arange(7), np.linspace(0, 7, 3)) - 1)
    q = expand_levels(np.array([3, 0, 3, 1, 1, 0, 6]), 2)
    assert q.tolist() == [3, 0, 3, 8 / 3, 8 / 3, 0, 8 / 3]


@pytest.mark.parametrize("support", ["kept", "reference"])
@pytest.mark.parametrize("cut", ["floor", "linspace"])
@pytest.mark.parametrize("kind", ["relu", "outliers", "far_uniform", "discrete"])
def test_divergence_curve_matches_the_literal_one(kind: str, cut: str, support: str) -> None:
    bins = damp_zero_spike(case_stats(kind, nbins=512).hist)
    for levels in (128, 256):
        cands = range(levels if cut == "floor" else 128, 513)
        ref = np.array(divergences(bins, levels, cands, cut, support))
        ref[np.isnan(ref)] = math.inf
        kl = kl_divergences(bins, levels, np.array(cands), cut=cut, support=support)
        assert np.array_equal(np.isinf(kl), np.isinf(ref))
        finite = np.isfinite(ref)
        np.testing.assert_allclose(kl[finite], ref[finite], rtol=0, atol=1e-12)


def test_reference_support_gives_the_outlier_bin_a_share() -> None:
    # bin 2 is empty but collects the outlier: "kept" leaves Q[2] = 0 (infinite divergence),
    # "reference" spreads level 1 over it
    bins = np.array([4.0, 2.0, 0.0, 1.0])
    kept, reference = (kl_divergences(bins, 2, np.array([3]), cut="floor", support=s)[0] for s in ("kept", "reference"))
    assert kept == math.inf and math.isfinite(reference)
    p = np.array([4.0, 2.0, 1.0])
    assert reference == pytest.approx(literal_kl(p, expand_levels(bins[:3], 2, support=p > 0)), abs=1e-15)


def test_bad_candidates_are_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        kl_divergences(np.ones(16), 4, np.array([17]), cut="linspace", support="kept")
    with pytest.raises(ValueError, match="candidates"):
        kl_divergences(np.ones(16), 4, np.array([3]), cut="floor", support="kept")


# --- ModelOpt's own function ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def modelopt_entropy():
    histogram = pytest.importorskip("modelopt.torch.quantization.calib.histogram", reason="nvidia-modelopt is not installed")
    return histogram._compute_amax_entropy


@pytest.mark.parametrize(("kind", "nbins", "unsigned"), [
    ("normal", 512, False), ("laplace", 512, False), ("relu", 512, True), ("outliers", 512, False),
    ("discrete", 512, False), ("far_uniform", 512, False), ("bimodal", 512, True), ("rounded", 2048, False),
])  # benchmarks/bench_entropy.py --check-modelopt compares every histogram of the three bundled models
def test_matches_modelopt(modelopt_entropy, kind: str, nbins: int, unsigned: bool) -> None:
    stats = case_stats(kind, nbins=nbins)
    hist = stats.hist.copy()
    with np.errstate(divide="ignore", invalid="ignore"):  # modelopt's NaN divergences for empty Q
        expected = float(modelopt_entropy(hist, stats.bin_edges, 8, unsigned))
    assert hist[0] == hist[1]  # it damps the histogram it is given, in place: hence the copy
    assert ModelOptEntropyCalibrator().compute_amax(stats, unsigned=unsigned) == min(expected, stats.amax)


# --- behaviour -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COLLAPSING))
def test_a_tensor_with_no_mass_near_zero_is_not_clipped_below_its_bulk(kind: str) -> None:
    stats = case_stats(kind)
    x = np.abs(CASES[kind](np.random.default_rng(0)))
    # the published searches collapse: every value clipped into one bin is a perfect match of P and Q
    assert ModelOptEntropyCalibrator().compute_amax(stats) < np.quantile(x, 0.01)
    assert TensorRTEntropyCalibrator().compute_amax(stats) < np.quantile(x, 0.01)
    found = EntropyCalibrator().search(stats)
    assert found.limited and found.unlimited < np.quantile(x, 0.01) and found.unlimited_clipped > 0.99
    assert found.amax >= np.quantile(x, 1 - MAX_CLIPPED) and found.clipped <= MAX_CLIPPED


@pytest.mark.parametrize(("kind", "max_clipped"), [
    ("normal", MAX_CLIPPED), ("uniform", MAX_CLIPPED), ("far_outliers", MAX_CLIPPED),
    ("laplace", 1e-3), ("outliers", 1e-3),  # 50,000 values: the search clips 7 and 8 of them
])
def test_the_clip_limit_leaves_ordinary_tensors_to_the_search(kind: str, max_clipped: float) -> None:
    stats = stats_of(kind, nbins=2048)
    found = EntropyCalibrator(max_clipped=max_clipped).search(stats)
    assert not found.limited and found.amax == ModelOptEntropyCalibrator().compute_amax(stats)
    assert found.clipped == found.unlimited_clipped <= max_clipped


def test_clip_limit_bounds_the_clipped_fraction() -> None:
    stats = case_stats("outliers")
    loose = EntropyCalibrator(max_clipped=0.5).search(stats)
    assert not loose.limited and loose.amax < 0.5 * stats.amax  # the search alone clips the far outliers
    strict = EntropyCalibrator(max_clipped=0.0)
    assert strict.compute_amax(stats) == stats.amax
    assert clip_floor(stats.hist, 0.0) == np.flatnonzero(stats.hist)[-1] + 1
    with pytest.raises(QuantlabError, match="max_clipped"):
        EntropyCalibrator(max_clipped=1.5)


def test_damping_works_on_a_copy() -> None:
    hist = np.array([900, 40, 30, 5])
    assert damp_zero_spike(hist).tolist() == [40, 40, 30, 5]
    assert hist.tolist() == [900, 40, 30, 5]


def test_zero_spike_damping() -> None:
    # undamped, the post-ReLU zeros drive TensorRT's published search to a third of the range
    stats = case_stats("relu")
    assert TensorRTEntropyCalibrator().compute_amax(stats) < 0.4 * stats.amax
    assert ModelOptEntropyCalibrator().compute_amax(stats) > 0.8 * stats.amax


def test_searching_on_past_the_last_value_regroups_the_levels() -> None:
    # rounded values: past max|x| the levels still move, and they line up with the 0.1 grid at 4.8
    stats = case_stats("rounded")
    assert stats.amax == pytest.approx(4.8) and EntropyCalibrator().compute_amax(stats) == stats.amax


@pytest.mark.parametrize("name", ["entropy", "entropy-trt", "entropy-modelopt"])
def test_edge_cases(name: str) -> None:
    calibrator = get_calibrator(name)
    assert calibrator.name == name
    assert calibrator.compute_amax(stats_of("zeros")) == 0.0
    assert calibrator.compute_amax(TensorStats("empty")) == 0.0
    # a constant 0.7 lies in bin floor(0.7 * 2048) = 1433: modelopt clips it to that bin's lower edge
    assert calibrator.compute_amax(stats_of("constant")) == (1433 / 2048 if name == "entropy-modelopt" else 0.7)
    few = stats_of("normal", nbins=64)  # fewer bins than levels: nothing to search
    assert calibrator.compute_amax(few) == few.amax


def test_start_bin_and_levels() -> None:
    assert START_BIN == 128
    stats = case_stats("outliers")
    signed, unsigned = (ModelOptEntropyCalibrator().compute_amax(stats, unsigned=u) for u in (False, True))
    assert signed != unsigned  # 128 and 256 levels give different thresholds
