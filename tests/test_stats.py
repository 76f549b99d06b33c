"""The streaming statistics: exact whatever the batching, bounded memory, NaN/Inf refused."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.collect import update
from quantlab.errors import QuantlabError
from quantlab.stats import NBINS, StatsSet, TensorStats, range_for


def stream(name: str, chunks: list[np.ndarray]) -> TensorStats:
    s = TensorStats(name)
    for i, c in enumerate(chunks):
        update(s, c, f"in batch {i}")
    return s


def test_range_is_the_next_power_of_two():
    assert range_for(1.5) == 2.0
    assert range_for(2.0) == 4.0  # strictly above max, so max never lands past the last bin
    assert range_for(0.3) == 0.5
    assert range_for(0.0) == 0.0


@pytest.mark.parametrize("splits", [[1], [7, 100, 3], [500, 1, 1, 1]])
def test_streaming_equals_one_shot_whatever_the_batches(splits):
    g = np.random.default_rng(0)
    # growing magnitudes force several range doublings mid-stream
    x = np.concatenate([g.standard_normal(400) * 0.01, g.laplace(size=4000) * 3, [-37.5, 0.0, 0.0]]).astype(np.float32)
    chunks = np.split(x, np.cumsum(splits)) if sum(splits) < x.size else [x]
    s = stream("t", chunks)
    ref = TensorStats.from_array("t", x)
    assert s.range == ref.range == 64.0
    np.testing.assert_array_equal(s.hist_pos, ref.hist_pos)
    np.testing.assert_array_equal(s.hist_neg, ref.hist_neg)
    assert (s.min, s.max, s.count) == (ref.min, ref.max, x.size)
    assert s.hist.sum() == x.size


def test_order_does_not_matter():
    g = np.random.default_rng(3)
    parts = [g.standard_normal(1000).astype(np.float32) * k for k in (0.1, 10, 1)]
    a, b = stream("t", parts), stream("t", parts[::-1])
    np.testing.assert_array_equal(a.hist_pos, b.hist_pos)
    np.testing.assert_array_equal(a.hist_neg, b.hist_neg)


def test_memory_is_fixed_per_tensor():
    s = stream("t", [np.ones(10_000, np.float32)] * 5)
    assert s.hist_pos.shape == s.hist_neg.shape == (NBINS,)
    assert s.count == 50_000


def test_all_zero_tensor_then_values():
    s = stream("t", [np.zeros(10, np.float32)])
    assert s.range == 0.0 and s.hist_pos[0] == 10
    update(s, np.array([0.75, -0.25], np.float32), "in batch 1")
    ref = TensorStats.from_array("t", np.array([0] * 10 + [0.75, -0.25]))
    np.testing.assert_array_equal(s.hist_pos, ref.hist_pos)
    np.testing.assert_array_equal(s.hist_neg, ref.hist_neg)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_the_tensor_name(bad):
    x = np.ones(100, np.float32)
    x[17] = bad
    with pytest.raises(QuantlabError, match=r"tensor 'act7' holds (NaN|Inf) values in batch 2"):
        update(TensorStats("act7"), x, "in batch 2")


def test_save_load_round_trip_is_byte_identical(tmp_path):
    g = np.random.default_rng(0)
    s = StatsSet({n: TensorStats.from_array(n, g.standard_normal(100)) for n in ("a", "b")}, {"pre": "a"}, "abc", 100)
    s.save(tmp_path / "one.npz")
    loaded = StatsSet.load(tmp_path / "one.npz")
    loaded.save(tmp_path / "two.npz")
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    assert loaded["pre"] is loaded.tensors["a"]
    np.testing.assert_array_equal(loaded.tensors["b"].hist_neg, s.tensors["b"].hist_neg)


def test_loading_a_foreign_file_is_a_user_error(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(QuantlabError, match="not a quantlab statistics file"):
        StatsSet.load(tmp_path / "x.npz")
