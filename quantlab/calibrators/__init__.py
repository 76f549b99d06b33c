"""Calibrators by name: each turns a tensor's statistics into a clipping threshold ``amax``.

=============  ==========================================================================
``minmax``     ``max |x|``: clips nothing
``percentile`` the ``p``-th percentile of ``|x|`` (default 99.99)
``entropy``    minimum ``KL(P || Q)`` between the histogram and its 128-level quantization
``mse``        minimum expected squared quantization error
=============  ==========================================================================

>>> get_calibrator("percentile", percentile=99.9)
PercentileCalibrator(percentile=99.9)
"""

from __future__ import annotations

from collections.abc import Callable

from quantlab.calibrators.base import Calibrator, asymmetric_range
from quantlab.calibrators.entropy import EntropyCalibrator
from quantlab.calibrators.minmax import MinMaxCalibrator
from quantlab.calibrators.mse import MseCalibrator
from quantlab.calibrators.percentile import PercentileCalibrator
from quantlab.errors import QuantlabError

# name -> factory taking the percentile (used by "percentile" only)
_FACTORIES: dict[str, Callable[[float], Calibrator]] = {
    "minmax": lambda percentile: MinMaxCalibrator(),
    "percentile": lambda percentile: PercentileCalibrator(percentile),
    "entropy": lambda percentile: EntropyCalibrator(),
    "mse": lambda percentile: MseCalibrator(),
}

CALIBRATORS: tuple[str, ...] = tuple(_FACTORIES)


def get_calibrator(name: str, *, percentile: float = 99.99) -> Calibrator:
    """The calibrator called ``name`` (one of :data:`CALIBRATORS`)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise QuantlabError(f"unknown calibrator {name!r}: choose one of {', '.join(CALIBRATORS)}")
    return factory(percentile)


__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "EntropyCalibrator",
    "MinMaxCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "asymmetric_range",
    "get_calibrator",
]
