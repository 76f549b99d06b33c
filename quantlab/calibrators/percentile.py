"""Percentile calibration: clip the rarest ``100 - p`` percent of magnitudes.

With ``h`` the histogram of ``|x|`` (bin width ``w``, ``N`` elements), the cumulative distribution
at the upper edge of bin ``k`` is ``CDF[k] = (h[0] + ... + h[k]) / N``.  The threshold is the upper
edge of the first bin where the CDF reaches ``p / 100``:

    k* = min{k : CDF[k] >= p / 100}        amax = min((k* + 1) * w, max|x|)

So the result is at or above the sample percentile (the smallest ``|x|`` whose CDF reaches
``p / 100``) by at most one bin width.

Worked example: ``|x|`` histogram ``[5, 3, 1, 1]`` with ``w = 0.5`` (``N = 10``) has
``CDF = [0.5, 0.8, 0.9, 1.0]``; ``p = 90`` gives ``k* = 2`` and ``amax = 1.5``.

``p = 100`` returns ``max|x|`` exactly.  The usual defaults are 99.9, 99.99 (pytorch-quantization
and modelopt) and 99.999.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from quantlab.errors import QuantlabError
from quantlab.stats import TensorStats


@dataclass(frozen=True)
class PercentileCalibrator:
    """Threshold at the ``percentile``-th percentile of ``|x|`` (``0 < percentile <= 100``).

    >>> from quantlab.stats import TensorStats
    >>> s = TensorStats.from_array("t", np.array([0.1] * 5 + [0.6] * 3 + [1.1, 1.7]), nbins=4)
    >>> s.hist.tolist(), s.bin_width
    ([5, 3, 1, 1], 0.5)
    >>> PercentileCalibrator(90.0).compute_amax(s)
    1.5
    """

    percentile: float = 99.99
    name: str = field(default="percentile", init=False, repr=False)

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 < p <= 100.0:
            raise QuantlabError(
                f"percentile {p!r} is out of range: it must be a number with 0 < p <= 100; "
                "use e.g. 99.99 (or 100 for the max)"
            )

    def compute_amax(self, stats: TensorStats, *, unsigned: bool = False) -> float:
        amax = float(stats.amax)
        if self.percentile == 100.0 or stats.range == 0.0:
            return amax
        counts = np.cumsum(stats.hist)
        total = int(counts[-1])
        if total == 0:
            return 0.0
        cdf = counts / total
        k = int(np.searchsorted(cdf, self.percentile / 100.0, side="left"))
        return min((k + 1) * stats.bin_width, amax)
