"""The divergence an entropy calibrator minimises: ``KL(P || Q)`` of every candidate threshold at once.

One candidate
-------------
``b`` is a histogram of ``|x|`` with bins of width ``w``; a candidate keeps the first ``i`` bins
(threshold ``i * w``) and quantizes them to ``L`` levels:

* ``P = b[0:i]`` with the outlier mass ``b[i] + b[i+1] + ...`` added to ``P[i-1]`` (clipped values
  land in the last kept bin), normalised by ``T = sum(b)``;
* ``Q``: the kept bins ``b[0:i]`` are merged into ``L`` levels and each level's mass is spread evenly
  over the *non-empty* bins of that level (empty bins stay 0), normalised by the kept mass
  ``S_i = b[0] + ... + b[i-1]``;
* ``KL(P || Q) = sum_{P_k > 0} p_k log(p_k / q_k)``: ``+inf`` when ``P`` has mass where ``Q`` has
  none, including when nothing is kept (``S_i = 0``).

The published variants differ in two choices, both parameters here:

``cut`` (which bins form level ``j``)
    ``"floor"``: ``m = i // L`` bins per level, level ``j = [j*m, (j+1)*m)``, the last level running
    on to ``i`` (it takes the remainder; the reference implementations that follow Migacz 2017);
    ``"linspace"``: bin ``k`` belongs to level ``floor(k L / i)``, so level ``j`` is
    ``[ceil(j i / L), ceil((j+1) i / L))`` (modelopt's ``np.linspace(0, i, L + 1)`` with
    ``np.digitize``; widths differ by at most one bin, and for ``i < L`` some levels are empty).
``support`` (where ``Q`` spreads a level's mass)
    ``"kept"``: over the bins non-empty in ``b[0:i]`` (TensorRT's "quantize [bin[0], ..., bin[i-1]]",
    modelopt); an empty ``b[i-1]`` with outliers then makes ``P[i-1] > 0 = Q[i-1]``, i.e. ``+inf``;
    ``"reference"``: over the bins non-empty in ``P`` (MXNet's ``is_nonzeros = p != 0``), so the bin
    that collects the outliers always gets its share.

Slide example (Migacz 2017; 8 bins into 2 levels, ``m = 4``, no outliers): ``b = [1, 0, 2, 3, 5, 3, 1, 7]``;
level 0 holds 6 over 3 non-empty bins, level 1 holds 16 over 4, so ``Q = [2, 0, 2, 2, 4, 4, 4, 4]``
before normalisation (:func:`expand_levels`).

All candidates at once
----------------------
``Q`` is constant on the non-empty bins of a level, so with ``M_j`` the mass of level ``j`` in ``Q``,
``Pm_j`` its mass in ``P`` (``M_j`` plus the outliers for the level holding bin ``i - 1``) and ``n_j``
its count of bins in the support,

    KL_i = sum_k p_k log p_k  -  sum_j (Pm_j / T) log(M_j / (n_j S_i))
         = sum_k p_k log p_k  -  (1 / T) sum_j Pm_j log(M_j / n_j)  +  log S_i

(the ``Pm_j / T`` add up to 1).  The first sum is a running sum of ``p log p`` over bins ``0 .. i-2``
plus the term of ``P[i-1]``.  ``M_j`` and ``n_j`` are differences of cumulative sums of ``b`` and of
``b > 0`` at the level edges.  The level holding bin ``i - 1`` is corrected once per candidate (its
``P`` mass includes the outliers, and with ``support="reference"`` an empty ``b[i-1]`` joins the
support); every other level contributes ``g(M, n) = M log(M / n)``, a function of the level's first
bin and width only:

* ``"floor"``: levels ``0 .. L-2`` depend on ``i`` only through ``m = i // L``; their sum is computed
  once per distinct ``m`` (at most ``n / L + 1`` of them);
* ``"linspace"``: widths are ``floor(i / L)`` or one more, so ``g`` is tabulated for every first bin
  and every width (about 17 x 2049 values) and each candidate's ``L`` levels are gathered from the
  table, in blocks of candidates that stay in cache.

Histogram counts are integers, so every cumulative sum is exact in float64; only the logarithms
round.  The divergences agree with a literal evaluation of ``KL(P || Q)`` to about ``1e-14``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Cut = Literal["floor", "linspace"]
Support = Literal["kept", "reference"]

BLOCK = 128  # candidates per block of the linspace gather: (BLOCK, L) arrays stay in cache


def level_of_bins(num_bins: int, num_levels: int, cut: Cut) -> np.ndarray:
    """intp[num_bins]: the level of every kept bin of a candidate ``i = num_bins``.

    >>> level_of_bins(7, 2, "floor").tolist()       # m = 3: the last level takes the remainder
    [0, 0, 0, 1, 1, 1, 1]
    >>> level_of_bins(7, 2, "linspace").tolist()    # floor(k * 2 / 7)
    [0, 0, 0, 0, 1, 1, 1]
    """
    k = np.arange(num_bins)
    if cut == "floor":
        width = num_bins // num_levels
        if width == 0:
            raise ValueError(f"{num_bins} bins cannot be cut into {num_levels} levels of at least one bin")
        return np.minimum(k // width, num_levels - 1)
    return (k * num_levels) // num_bins


def expand_levels(bins: np.ndarray, num_levels: int, cut: Cut = "floor", support: np.ndarray | None = None) -> np.ndarray:
    """``Q`` of one candidate before normalisation: ``bins`` merged into levels, spread over the support.

    ``support`` (bool, same length) says which bins receive a share; by default the non-empty ones.

    >>> expand_levels(np.array([1, 0, 2, 3, 5, 3, 1, 7]), 2).tolist()
    [2.0, 0.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    """
    bins = np.asarray(bins, dtype=np.float64)
    level = level_of_bins(len(bins), num_levels, cut)
    into = bins > 0 if support is None else np.asarray(support, dtype=bool)
    mass = np.bincount(level, weights=bins, minlength=num_levels)
    count = np.bincount(level, weights=into, minlength=num_levels)
    spread = np.divide(mass, count, out=np.zeros(num_levels), where=count > 0)
    return np.where(into, spread[level], 0.0)


def kl_divergences(
    bins: np.ndarray, num_levels: int, candidates: np.ndarray, *, cut: Cut, support: Support
) -> np.ndarray:
    """float64[len(candidates)]: ``KL(P || Q)`` of every candidate ``i`` (see the module docstring).

    ``bins`` is used as given (no zero-spike damping); ``candidates`` are numbers of kept bins, each
    in ``1 .. len(bins)`` (and ``>= num_levels`` for ``cut="floor"``).  ``+inf`` where ``P`` has mass
    that ``Q`` cannot hold, including candidates that keep no mass.
    """
    b = np.asarray(bins, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    n, levels = len(b), num_levels
    if cand.size == 0:
        return np.zeros(0)
    if cand.min() < 1 or cand.max() > n or (cut == "floor" and cand.min() < levels):
        raise ValueError(f"candidates must lie in [{levels if cut == 'floor' else 1}, {n}]")
    total = b.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(b)])  # mass_before[k] = b[0] + ... + b[k-1]
    filled_before = np.concatenate([[0.0], np.cumsum(b > 0)])
    kept = mass_before[cand]
    outliers = total - kept

    # sum_k p_k log p_k: bins 0 .. i-2 as they are, bin i-1 holding everything from i-1 on
    p = b / total
    plogp = p * np.log(p, where=p > 0, out=np.zeros_like(p))
    plogp_before = np.concatenate([[0.0], np.cumsum(plogp)])
    p_last = (total - mass_before[cand - 1]) / total
    neg_entropy = plogp_before[cand - 1] + p_last * np.log(p_last, where=p_last > 0, out=np.zeros_like(p_last))

    # sum_j M_j log(M_j / n_j) over every level, and the first bin of the level holding bin i-1
    if cut == "floor":
        width = cand // levels
        widths, which = np.unique(width, return_inverse=True)
        edges = np.arange(levels)[None, :] * widths[:, None]  # levels 0 .. L-2 and the start of L-1
        inner = _g(np.diff(mass_before[edges], axis=1), np.diff(filled_before[edges], axis=1)).sum(axis=1)
        last_start = (levels - 1) * width
        cross = inner[which] + _g(kept - mass_before[last_start], filled_before[cand] - filled_before[last_start])
    else:
        cross, last_start = _linspace_cross(mass_before, filled_before, cand, levels)

    # the level holding bin i-1 also holds the outliers in P (and, for support="reference", an
    # empty bin i-1 that receives them joins the support)
    level_mass = kept - mass_before[last_start]
    level_filled = filled_before[cand] - filled_before[last_start]
    empty_last = (b[cand - 1] == 0) & (outliers > 0)
    starved = (level_mass == 0) & (outliers > 0)  # P has outliers where Q has nothing (or S_i = 0)
    if support == "kept":
        starved |= empty_last
        filled = level_filled
    else:
        filled = level_filled + empty_last
    safe_mass = np.where(level_mass > 0, level_mass, 1.0)
    cross += (level_mass + outliers) * np.log(safe_mass / np.maximum(filled, 1.0)) - _g(level_mass, level_filled)
    kl = neg_entropy - cross / total + np.log(np.where(kept > 0, kept, 1.0))
    return np.where(starved, np.inf, kl)


def _g(mass: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """``M log(M / n)`` elementwise, 0 where ``M = 0``."""
    ratio = np.divide(mass, filled, out=np.ones_like(mass), where=mass > 0)
    return mass * np.log(ratio)


def _linspace_cross(
    mass_before: np.ndarray, filled_before: np.ndarray, cand: np.ndarray, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_j g(M_j, n_j)`` over the linspace levels of every candidate, and the first bin of the
    level holding bin ``i - 1`` (``ceil(j i / L)`` for ``j = floor((i-1) L / i)``)."""
    n = len(mass_before) - 1
    # g of every level [a, a + w): a row per width w = 0 .. ceil(max i / L), a column per first bin a
    first = np.arange(n + 1)
    top = np.minimum(first[None, :] + np.arange(-(-int(cand.max()) // levels) + 1)[:, None], n)
    table = _g(mass_before[top] - mass_before[first], filled_before[top] - filled_before[first]).ravel()
    # int32 indices where they fit (half the memory traffic); ceil(j i / L) by a shift when L is a power of two
    itype = np.int32 if (n + 1) * max(n, levels) < 2**31 else np.int64
    j = np.arange(levels + 1, dtype=itype)
    c_all = cand.astype(itype)
    shift = levels.bit_length() - 1 if levels & (levels - 1) == 0 else None
    cross = np.empty(len(cand))
    for lo in range(0, len(cand), BLOCK):
        c = c_all[lo:lo + BLOCK]
        scaled = j[None, :] * c[:, None]
        edges = (scaled + (levels - 1)) >> shift if shift is not None else -(-scaled // levels)  # ceil(j i / L)
        # flat index width * (n + 1) + start, with width = end - start
        cross[lo:lo + BLOCK] = table.take((n + 1) * edges[:, 1:] - n * edges[:, :-1]).sum(axis=1)
    last_level = ((cand - 1) * levels) // cand
    return cross, -((-last_level * cand) // levels)
