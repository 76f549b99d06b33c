"""Max calibration: keep every value, clip nothing.

``amax = max |x|`` over every element seen.  The whole observed range is representable, so no value
is clipped, at the cost of the coarsest step when a few outliers stretch the range: with signed
INT8 the step is ``amax / 127``, so one value of 100 among values of about 1 leaves those values
roughly one level each.

>>> import numpy as np
>>> from quantlab.stats import TensorStats
>>> MinMaxCalibrator().compute_amax(TensorStats.from_array("t", np.array([0.5, -3.0, 2.0])))
3.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab.stats import TensorStats


@dataclass(frozen=True)
class MinMaxCalibrator:
    """``amax = stats.amax`` (the running max of ``|x|``); ``unsigned`` changes nothing."""

    name: str = field(default="minmax", init=False, repr=False)

    def compute_amax(self, stats: TensorStats, *, unsigned: bool = False) -> float:
        return float(stats.amax)
