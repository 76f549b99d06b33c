"""Compiled inner loops (numba): the histogram update of the statistics pass.

Kept apart so that importing quantlab does not import numba; the first call compiles and caches.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange


@numba.njit(cache=True, nogil=True, parallel=True)
def histogram_update(x, hist_pos, hist_neg, scale, nchunks):  # pragma: no cover - compiled
    """Add ``x`` (1-D float32) to the magnitude histograms: bin = floor(|x| * scale).

    ``scale = NBINS / R`` with ``max|x| < R``, so every bin index is below ``NBINS``.  The array is
    split into ``nchunks`` chunks (one per thread), each filling a private histogram, summed at the end.
    """
    nb = hist_pos.shape[0]
    n = x.shape[0]
    step = (n + nchunks - 1) // nchunks
    local = np.zeros((nchunks, 2 * nb), np.int64)
    for c in prange(nchunks):
        h = local[c]
        lo = c * step
        hi = min(n, lo + step)
        for i in range(lo, hi):
            v = x[i]
            k = min(int(abs(v) * scale), nb - 1)
            if v < 0:
                k += nb
            h[k] += 1
    total = local.sum(axis=0)
    hist_pos += total[:nb]
    hist_neg += total[nb:]
