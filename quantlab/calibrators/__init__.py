"""Calibrators by name: each turns a tensor's statistics into a clipping threshold ``amax``.

====================  ===================================================================
``minmax``            ``max |x|``: clips nothing
``percentile``        the ``p``-th percentile of ``|x|`` (default 99.99)
``entropy``           minimum ``KL(P || Q)`` between the histogram and its 128-level
                      quantization, over thresholds that clip at most 1e-5 of the values
``mse``               minimum expected squared quantization error
``entropy-trt``       the KL search as TensorRT published it (Migacz 2017)
``entropy-modelopt``  the KL search of NVIDIA ModelOpt's ``_compute_amax_entropy``
====================  ===================================================================

:data:`CALIBRATORS` lists every name; :data:`DEFAULT_CALIBRATORS` the four a run uses by default.
The two published entropy variants are there to compare against (see :mod:`quantlab.calibrators.entropy`).

>>> get_calibrator("percentile", percentile=99.9)
PercentileCalibrator(percentile=99.9)
"""

from __future__ import annotations

from collections.abc import Callable

from quantlab.calibrators.base import Calibrator, asymmetric_range
from quantlab.calibrators.entropy import EntropyCalibrator, ModelOptEntropyCalibrator, TensorRTEntropyCalibrator
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
    "entropy-trt": lambda percentile: TensorRTEntropyCalibrator(),
    "entropy-modelopt": lambda percentile: ModelOptEntropyCalibrator(),
}

CALIBRATORS: tuple[str, ...] = tuple(_FACTORIES)
DEFAULT_CALIBRATORS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")


def get_calibrator(name: str, *, percentile: float = 99.99) -> Calibrator:
    """The calibrator called ``name`` (one of :data:`CALIBRATORS`)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise QuantlabError(f"unknown calibrator {name!r}: choose one of {', '.join(CALIBRATORS)}")
    return factory(percentile)


__all__ = [
    "CALIBRATORS",
    "DEFAULT_CALIBRATORS",
    "Calibrator",
    "EntropyCalibrator",
    "MinMaxCalibrator",
    "ModelOptEntropyCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "TensorRTEntropyCalibrator",
    "asymmetric_range",
    "get_calibrator",
]
