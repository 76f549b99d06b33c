"""MinMaxCalibrator: the threshold is max |x|."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.calibrators.minmax import MinMaxCalibrator
from quantlab.stats import TensorStats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("unsigned", [False, True])
def test_equals_max_abs(seed: int, unsigned: bool) -> None:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.laplace(size=10_000), [-37.5]])
    stats = TensorStats.from_array("t", x)
    assert MinMaxCalibrator().compute_amax(stats, unsigned=unsigned) == np.abs(x).max() == 37.5


def test_positive_max_wins_over_smaller_negative_min() -> None:
    stats = TensorStats.from_array("t", np.array([-2.0, 0.5, 3.25]))
    assert MinMaxCalibrator().compute_amax(stats) == 3.25


def test_all_zero_and_empty() -> None:
    assert MinMaxCalibrator().compute_amax(TensorStats.from_array("t", np.zeros(5))) == 0.0
    assert MinMaxCalibrator().compute_amax(TensorStats("empty")) == 0.0


def test_name() -> None:
    assert MinMaxCalibrator().name == "minmax"
