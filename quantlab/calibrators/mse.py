"""MSE calibration: the threshold with the least expected squared quantization error.

Each bin of the ``|x|`` histogram stands for its centre ``c_k = (k + 1/2) * w``, weighted by its
count ``h_k``.  For a candidate threshold ``a`` and step ``s = a / qmax`` (``qmax = 127`` for signed
INT8, ``255`` for U8 over ``[0, a]``), a centre is rounded to the grid or clipped:

    err(c) = (c - round(c / s) * s)^2    if c <= a
    err(c) = (c - a)^2                   if c > a          MSE(a) = sum_k h_k err(c_k) / N

Candidates are the bin edges ``a = i * w`` for ``i = 128 ... last + 1``, ``last`` the last non-empty
bin; the start is 128 for signed and unsigned alike (modelopt's ``start_bin``: never clip below one
sixteenth of the histogram range).  The minimum wins, ties (within ``TIE_RTOL``) going to the
largest ``i``, and ``amax = min(i_best * w, max|x|)``.

Worked example (``w = 1``, signed): one bin of 10 elements at ``c = 200.5`` and candidate
``a = 150``: the bin is clipped, error ``10 * 50.5^2``.  For ``a = 201``, ``s = 201/127`` and
``c / s = 126.68``, rounded to 127, error ``10 * (200.5 - 201)^2 = 2.5``, an MSE of 0.25.

Vectorised search
-----------------
The arithmetic runs in units of half a bin, where the centres ``u_k = 2k + 1`` and the candidate
``a = 2i`` are integers and the step is ``d = 2i / qmax``.  Centres rise with ``k``, so the centres
rounded to grid point ``j`` form one run of bins ``[B_{j-1}, B_j)`` (maybe empty), with

    B_j = #{k : u_k < (j + 1/2) d} = ceil(((2j + 1) i - qmax) / (2 qmax))     (B_qmax = i)

an exact integer (a centre exactly half-way goes up; either way its error is ``(d / 2)^2``).
With running sums ``s0, s1, s2`` of ``h``, ``h u`` and ``h u^2`` (``s[k]`` over bins ``0 .. k-1``;
exact in float64 up to about 5e8 elements), summation by parts gives the rounding error of the
kept bins as

    sum_j sum_{k in run j} h_k (u_k - j d)^2
        = s2[i] - 2 d (qmax s1[i] - sum_{j<qmax} s1[B_j])
                + d^2 (qmax^2 s0[i] - sum_{j<qmax} (2j + 1) s0[B_j])

and the clipped tail is ``S2 - 2 a S1 + a^2 S0`` over ``k >= i``.  Every candidate is one row of an
``(n_candidates, qmax)`` array of run ends, about 250 thousand elements for a 2048-bin histogram,
taken in blocks of ``BLOCK`` candidates so that the arrays stay in cache.  There is no
coarse-to-fine shortcut: every candidate is evaluated.  Expanding the squares cancels large terms,
so the errors agree with a literal per-bin evaluation to about 1e-10 relative, not to the last
bit; ``TIE_RTOL`` absorbs that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quantlab.stats import TensorStats

START_BIN = 128
BLOCK = 256  # candidates per block of the search
# Errors within this relative distance of the minimum count as ties: far above the rounding of the
# expanded squares (about 1e-10), and a difference of one part in a million in the expected error
# is no reason to clip more.
TIE_RTOL = 1e-6


def run_ends(cand: np.ndarray, qmax: int) -> np.ndarray:
    """``B_j = ceil(((2j + 1) i - qmax) / (2 qmax))`` for ``j < qmax``: intp[len(cand), qmax].

    ``y = ((2j + 1) i - qmax) / (2 qmax)`` is either an integer or at least ``1 / (2 qmax)`` away
    from one, so ``ceil(y) = floor(y + 1 - 1 / (4 qmax))`` holds with a margin that float rounding
    cannot cross; the sum is positive, so truncation is the floor.

    With ``i = 254`` the step is 2 bins: centre 0.5 rounds to 0, centres 1.5 and 2.5 to 2,
    centres 3.5 and 4.5 to 4:

    >>> run_ends(np.array([254]), 127)[0, :3].tolist()
    [1, 3, 5]
    """
    half_steps = (2.0 * np.arange(qmax) + 1.0) / (2 * qmax)
    scaled = np.multiply.outer(np.asarray(cand, dtype=np.float64), half_steps)
    return (scaled + (0.5 - 1 / (4 * qmax))).astype(np.intp)


def quantization_mse(
    hist: np.ndarray, bin_width: float, qmax: int, start: int = START_BIN
) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error of every candidate ``a = i * bin_width``, ``i = start ... last + 1``.

    Returns ``(candidates, mse)``, int64 and float64 arrays; empty when the last non-empty bin is
    below ``start - 1`` (nothing to search).

    >>> c, e = quantization_mse(np.array([0] * 200 + [10]), 1.0, 127, start=150)
    >>> round(float(e[0]), 9), round(float(e[c == 201][0]), 9)  # a = 150 clips, a = 201 rounds
    (2550.25, 0.25)
    """
    h = np.asarray(hist, dtype=np.float64)
    nonempty = np.flatnonzero(h)
    if nonempty.size == 0 or nonempty[-1] + 1 < start:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    cand = np.arange(start, nonempty[-1] + 2)
    centre = 2.0 * np.arange(len(h)) + 1.0  # in half bins
    s0 = np.concatenate([[0.0], np.cumsum(h)])
    s1 = np.concatenate([[0.0], np.cumsum(h * centre)])
    s2 = np.concatenate([[0.0], np.cumsum(h * centre * centre)])

    a = 2.0 * cand
    clipped = (s2[-1] - s2[cand]) - 2 * a * (s1[-1] - s1[cand]) + a * a * (s0[-1] - s0[cand])

    # Grid point j takes the centres in [B_{j-1}, B_j); B_{qmax} = i.  Summation by parts turns the
    # per-run sums into sums of running sums at the run ends:
    #   sum_j j S1_j = qmax s1[i] - sum_{j<qmax} s1[B_j]
    #   sum_j j^2 S0_j = qmax^2 s0[i] - sum_{j<qmax} (2j + 1) s0[B_j]
    odd = 2.0 * np.arange(qmax) + 1.0
    run_s1 = np.empty(len(cand))
    run_s0 = np.empty(len(cand))
    for lo in range(0, len(cand), BLOCK):  # blocks of candidates keep the arrays in cache
        block = slice(lo, lo + BLOCK)
        ends = run_ends(cand[block], qmax)
        run_s1[block] = s1[ends].sum(axis=1)
        run_s0[block] = s0[ends] @ odd
    step = a / qmax
    rounded = (
        s2[cand]
        - 2 * step * (qmax * s1[cand] - run_s1)
        + step**2 * (qmax**2 * s0[cand] - run_s0)
    )
    return cand, (rounded + clipped) * (bin_width / 2) ** 2 / s0[-1]


@dataclass(frozen=True)
class MseCalibrator:
    """Threshold minimising the expected squared error (see the module docstring).

    ``max|x|`` when there is nothing to search (the last non-empty bin is below 127) and 0.0 for an
    all-zero tensor.
    """

    name: str = field(default="mse", init=False, repr=False)

    def compute_amax(self, stats: TensorStats, *, unsigned: bool = False) -> float:
        amax = float(stats.amax)
        if stats.range == 0.0:
            return 0.0
        cand, mse = quantization_mse(stats.hist, stats.bin_width, 255 if unsigned else 127)
        if cand.size == 0:
            return amax
        best = int(np.flatnonzero(mse <= mse.min() * (1 + TIE_RTOL))[-1])
        return min(int(cand[best]) * stats.bin_width, amax)
