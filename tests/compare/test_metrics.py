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


def _text_map(lines, size=(96, 160)) -> np.ndarray:
    """A DB-style probability map: 0.9 inside each (top, left, height, width) text line, 0.02 elsewhere."""
    m = np.full(size, 0.02, np.float32)
    for top, left, h, w in lines:
        m[top:top + h, left:left + w] = 0.9
    return m


def test_text_boxes_follow_rapidocrs_db_post_processing():
    from quantlab.compare.metrics import BoxParams, text_boxes

    boxes = text_boxes(_text_map([(10, 20, 8, 60), (40, 10, 10, 120)]), BoxParams())
    assert len(boxes) == 2
    for box, (top, left, h, w) in zip(sorted(boxes, key=lambda b: b[:, 1].min()), [(10, 20, 8, 60), (40, 10, 10, 120)]):
        x0, y0 = box.min(0)
        x1, y1 = box.max(0)
        assert x0 <= left and y0 <= top and x1 >= left + w - 1 and y1 >= top + h - 1  # unclipped: a bit larger
        assert x1 - x0 < w + 2 * h and y1 - y0 < 3 * h
    faint = _text_map([(10, 20, 8, 60)]) * 0.5  # mean probability 0.45 < box_threshold 0.5: no box
    assert text_boxes(faint, BoxParams()) == []


def test_box_precision_recall_f1_against_a_hand_built_map():
    from quantlab.compare.metrics import detection_metrics

    ref = _text_map([(10, 20, 8, 60), (40, 10, 10, 120), (70, 30, 9, 50)])
    # the engine: line 1 shifted by 2 pixels (still IoU > 0.5), line 2 lost, a spurious blob added
    out = _text_map([(12, 22, 8, 60), (70, 30, 9, 50), (40, 130, 12, 20)])
    m = detection_metrics(ref[None, None], out[None, None])
    assert m["boxes"] == 3
    assert m["box_precision"] == pytest.approx(2 / 3) and m["box_recall"] == pytest.approx(2 / 3)
    assert m["box_f1"] == pytest.approx(2 / 3)
    assert 0.0 < m["iou"] < 1.0 and m["mae"] > 0
    same = detection_metrics(np.stack([ref, out])[:, None], np.stack([ref, out])[:, None])
    assert same["box_f1"] == 1.0 and same["iou"] == 1.0 and same["boxes"] == 6
    empty = np.full((1, 1, 32, 32), 0.01, np.float32)
    assert detection_metrics(empty, empty)["box_f1"] == 1.0
    nothing = np.full((1, 1, *ref.shape), 0.01, np.float32)
    lost = detection_metrics(ref[None, None], nothing)
    assert lost["box_recall"] == 0.0 and lost["box_precision"] == 1.0 and lost["box_f1"] == 0.0


def test_detection_task_ranks_by_box_f1_and_refuses_non_maps():
    from quantlab.compare.metrics import default_primary, task_metrics

    assert default_primary("detection", 0) == "box_f1"
    with pytest.raises(QuantlabError, match=r"needs probability maps shaped \[N, 1, H, W\]"):
        task_metrics("detection", np.zeros((2, 10)), np.zeros((2, 10)), None)
