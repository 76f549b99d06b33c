"""What every calibrator is: a rule that turns a tensor's statistics into a clipping threshold.

A calibrator returns ``amax``, the magnitude beyond which values are clipped.  Targets turn it into
a quantization range:

* symmetric signed INT8 (TensorRT): ``[-amax, amax]``, scale ``amax / 127``, zero-point 0;
* asymmetric (ONNX Runtime U8 activations): :func:`asymmetric_range` intersects ``[-amax, amax]``
  with the observed ``[min, max]`` and widens it to contain 0, so a post-ReLU tensor keeps all 256
  levels for ``[0, amax]``.

``unsigned=True`` tells a calibrator that the tensor will be quantized with 256 levels over
``[0, amax]`` instead of 128 levels of magnitude; search-based calibrators (entropy, mse) use it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from quantlab.stats import TensorStats


@runtime_checkable
class Calibrator(Protocol):
    name: str

    def compute_amax(self, stats: TensorStats, *, unsigned: bool = False) -> float:
        """Clipping threshold for ``stats``; always ``0 <= amax <= stats.amax``."""
        ...


def asymmetric_range(stats: TensorStats, amax: float) -> tuple[float, float]:
    """``[lo, hi]`` for an asymmetric quantizer: the observed range clipped to ``amax``, holding 0.

    >>> from quantlab.stats import TensorStats
    >>> import numpy as np
    >>> asymmetric_range(TensorStats.from_array("t", np.array([-0.5, 3.0])), 2.0)
    (-0.5, 2.0)
    """
    lo = max(stats.min, -amax) if stats.count else 0.0
    hi = min(stats.max, amax) if stats.count else 0.0
    return (min(lo, 0.0), max(hi, 0.0))
