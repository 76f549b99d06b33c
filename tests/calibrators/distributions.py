"""Seeded sample distributions shared by the calibrator oracle tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantlab.stats import TensorStats

N = 50_000
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "normal": lambda rng: rng.normal(size=N),
    "laplace": lambda rng: rng.laplace(size=N),
    "uniform": lambda rng: rng.uniform(-3.0, 3.0, size=N),
    "relu": lambda rng: np.maximum(rng.normal(size=N), 0.0),  # half the elements are exactly 0
    "outliers": lambda rng: np.concatenate([rng.normal(size=N), [9.0, -11.0, 12.5]]),
    # MSE clips outliers only when the bulk outweighs them: many more samples, farther out
    "far_outliers": lambda rng: np.concatenate([rng.normal(size=10 * N), [25.0, -25.0]]),
    "discrete": lambda rng: rng.choice([-1.5, 0.25, 0.5, 3.0], size=N),
    "constant": lambda rng: np.full(1000, 0.7),
    "zeros": lambda rng: np.zeros(1000),
}


def stats_of(kind: str, seed: int = 0, nbins: int = 2048) -> TensorStats:
    x = DISTRIBUTIONS[kind](np.random.default_rng(seed))
    return TensorStats.from_array(kind, x, nbins=nbins)
