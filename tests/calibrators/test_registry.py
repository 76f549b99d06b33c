"""The calibrator registry: names, construction, errors, and the shared contract."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.calibrators import (
    CALIBRATORS,
    DEFAULT_CALIBRATORS,
    Calibrator,
    EntropyCalibrator,
    MinMaxCalibrator,
    ModelOptEntropyCalibrator,
    MseCalibrator,
    PercentileCalibrator,
    TensorRTEntropyCalibrator,
    asymmetric_range,
    get_calibrator,
)
from quantlab.calibrators import base
from quantlab.errors import QuantlabError
from quantlab.stats import TensorStats

CLASSES = {
    "minmax": MinMaxCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "mse": MseCalibrator,
    "entropy-trt": TensorRTEntropyCalibrator,
    "entropy-modelopt": ModelOptEntropyCalibrator,
}


def test_names() -> None:
    assert CALIBRATORS == ("minmax", "percentile", "entropy", "mse", "entropy-trt", "entropy-modelopt")
    assert DEFAULT_CALIBRATORS == ("minmax", "percentile", "entropy", "mse")


@pytest.mark.parametrize("name", CALIBRATORS)
def test_get_calibrator(name: str) -> None:
    calibrator = get_calibrator(name)
    assert type(calibrator) is CLASSES[name]
    assert calibrator.name == name
    assert isinstance(calibrator, Calibrator)


def test_percentile_is_passed_on() -> None:
    assert get_calibrator("percentile") == PercentileCalibrator(99.99)
    assert get_calibrator("percentile", percentile=99.9) == PercentileCalibrator(99.9)
    with pytest.raises(QuantlabError, match="percentile 150"):
        get_calibrator("percentile", percentile=150.0)


def test_unknown_name() -> None:
    with pytest.raises(QuantlabError) as info:
        get_calibrator("xyz")
    expected = "unknown calibrator 'xyz': choose one of minmax, percentile, entropy, mse, entropy-trt, entropy-modelopt"
    assert str(info.value) == expected


def test_reexports_asymmetric_range() -> None:
    assert asymmetric_range is base.asymmetric_range


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("name", CALIBRATORS)
def test_contract_amax_within_observed_range(name: str, unsigned: bool) -> None:
    rng = np.random.default_rng(11)
    cases = [
        rng.normal(size=20_000),
        np.maximum(rng.laplace(size=20_000), 0.0),
        np.concatenate([rng.uniform(-1.0, 1.0, size=20_000), [40.0]]),
        np.full(100, -2.5),
    ]
    for x in cases:
        stats = TensorStats.from_array("t", x)
        amax = get_calibrator(name).compute_amax(stats, unsigned=unsigned)
        assert isinstance(amax, float)
        assert 0.0 < amax <= stats.amax
