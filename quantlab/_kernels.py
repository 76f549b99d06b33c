"""Compiled inner loops (numba): the histogram update of the statistics pass.

Kept apart so that importing quantlab does not import numba; the first call compiles and caches.
The loop is serial on purpose: the statistics pass runs it on one core while ONNX Runtime computes
the next batch on the others (see :mod:`quantlab.collect`).
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def histogram_update(x, hist_pos, hist_neg, scale):  # pragma: no cover - compiled
    """Add ``x`` (1-D float32) to the magnitude histograms: bin = floor(|x| * scale).

    ``scale = NBINS / R`` with ``max|x| < R``, so every bin index is below ``NBINS``.
    """
    nb = hist_pos.shape[0]
    for i in range(x.shape[0]):
        v = x[i]
        k = min(int(abs(v) * scale), nb - 1)
        if v < 0:
            hist_neg[k] += 1
        else:
            hist_pos[k] += 1
