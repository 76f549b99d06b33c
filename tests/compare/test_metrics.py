"""Comparison metrics against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab.compare import metrics as M
from quantlab.errors import QuantlabError


def test_sqnr_matches_definition_and_caps() -> None:
    ref = np.array([3.0, 4.0])
    out = np.array([3.0, 3.0])  # error norm 1, signal norm 5
    assert M.sqnr_db(ref, out) == pytest.approx(20 * math.log10(5.0))
    assert M.sqnr_db(ref, ref) == M.SQNR_CAP_DB
    assert M.sqnr_db(np.zeros(2), np.ones(2)) == -M.SQNR_CAP_DB
    big = np.float32(-3.4e38)  # an attention mask's fill value, and the -inf a quantized add made of it
    assert M.sqnr_db(np.array([big, 1.0], np.float32), np.array([-np.inf, 1.0], np.float32)) == -M.SQNR_CAP_DB
    assert math.isnan(M.sqnr_db(np.ones(2), np.array([np.nan, 1.0])))


def test_output_metrics_within_tolerance_is_elementwise() -> None:
    ref = np.array([[1.0, 100.0, 0.0, -2.0]])
    out = ref + np.array([[5e-6, 5e-4, 2e-5, 0.0]])
    m = M.output_metrics(ref, out, atol=1e-5, rtol=1e-5)
    # allowed: 1e-5 + 1e-5 * |ref| -> [2e-5, 1.01e-3, 1e-5, 3e-5]; the third element is outside
    assert m["within_tol"] == pytest.approx(0.75)
    assert m["max_abs"] == pytest.approx(5e-4)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_output_metrics_refuse_shape_mismatch() -> None:
    with pytest.raises(QuantlabError, match="shapes differ"):
        M.output_metrics(np.zeros((2, 3)), np.zeros((3, 2)))


def test_classification_labels_agreement_and_kl() -> None:
    ref = np.array([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 3.0, 0.0, 0.0, 0.0]])
    out = np.array([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0, 0.0, 0.0]])
    labels = np.array([0, -1])  # only the first sample is labelled
    m = M.classification_metrics(ref, out, labels)
    assert m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["top1_agreement"] == 0.5
    assert m["top5_overlap"] == 1.0  # the same five classes, in another order
    p = np.exp(ref[1]) / np.exp(ref[1]).sum()
    q = np.exp(out[1]) / np.exp(out[1]).sum()
    assert m["kl"] == pytest.approx(float(np.sum(p * np.log(p / q))) / 2)


def test_classification_without_labels_and_out_of_range_label() -> None:
    x = np.random.default_rng(0).standard_normal((4, 10))
    m = M.classification_metrics(x, x, None)
    assert m["top1"] is None and m["top1_agreement"] == 1.0 and m["kl"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(QuantlabError, match="out of range"):
        M.classification_metrics(x, x, np.array([0, 1, 2, 10]))


def test_dense_iou_and_empty_maps() -> None:
    ref = np.zeros((2, 1, 4, 4))
    out = np.zeros((2, 1, 4, 4))
    ref[0, 0, :2, :2] = 0.9  # 4 pixels
    out[0, 0, :2, :3] = 0.9  # 6 pixels, 4 shared
    m = M.dense_metrics(ref, out, 0.5)
    assert m["iou"] == pytest.approx((4 / 6 + 1.0) / 2)  # the second sample: both empty -> 1
    assert m["mae"] == pytest.approx(0.9 * 2 / 32)


def test_embedding_retrieval_agreement() -> None:
    g = np.random.default_rng(1)
    ref = g.standard_normal((12, 8))
    assert M.embedding_metrics(ref, ref, 3)["retrieval_agreement"] == 1.0
    shuffled = M.embedding_metrics(ref, g.standard_normal((12, 8)), 3)
    assert shuffled["retrieval_agreement"] < 0.7 and shuffled["mean_cosine"] < 0.5
    scaled = M.embedding_metrics(ref, ref * 3.0, 3)  # cosine ignores scale
    assert scaled["mean_cosine"] == pytest.approx(1.0) and scaled["min_cosine"] == pytest.approx(1.0)


def test_user_metric_is_loaded_and_checked() -> None:
    fn = M.load_user_metric("math:fsum")
    assert M.user_metrics(lambda r, o, l: 0.5, "m:score", {}, {}, None) == {"score": 0.5}
    assert callable(fn)
    with pytest.raises(QuantlabError, match="cannot import"):
        M.load_user_metric("no_such_module_here:f")
    with pytest.raises(QuantlabError, match="has no function"):
        M.load_user_metric("math:no_such_function")
    with pytest.raises(QuantlabError, match="return numbers"):
        M.user_metrics(lambda r, o, l: {"a": "x"}, "m:f", {}, {}, None)


def test_default_primary() -> None:
    assert M.default_primary("classification", 20) == "top1"
    assert M.default_primary("classification", 0) == "top1_agreement"
    assert M.default_primary("dense", 0) == "iou"
    assert M.default_primary("embedding", 0) == "mean_cosine"
