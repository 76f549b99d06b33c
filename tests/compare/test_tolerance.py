"""Tolerance rules: parsing, defaults by metric direction, and evaluation against FP32."""

from __future__ import annotations

import pytest

from quantlab.compare.tolerance import check_known, evaluate, parse_tolerance
from quantlab.errors import QuantlabError


def test_shorthand_follows_metric_direction() -> None:
    t = parse_tolerance({"top1": 0.01, "kl": 0.05, "mean_cosine": {"min": 0.99}})
    assert t == {"kl": {"max_increase": 0.05}, "mean_cosine": {"min": 0.99}, "top1": {"max_drop": 0.01}}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"top1": "a lot"}, "must be a number or a table"),
        ({"top1": {"at_most": 0.1}}, "unknown tolerance rule 'at_most'"),
        ({"top1": {"max_drop": -0.1}}, "must be >= 0"),
        ({"top1": True}, "give a number"),
    ],
)
def test_bad_tolerances_are_one_line_errors(raw: dict, message: str) -> None:
    with pytest.raises(QuantlabError, match=message):
        parse_tolerance(raw)


def test_evaluate_each_rule() -> None:
    t = parse_tolerance({"top1": 0.01, "kl": {"max": 0.1}, "cosine": {"min": 0.99}})
    ref = {"top1": 0.80, "kl": 0.0, "cosine": 1.0}
    assert evaluate(t, {"top1": 0.795, "kl": 0.05, "cosine": 0.995}, ref) == []
    failures = evaluate(t, {"top1": 0.75, "kl": 0.2, "cosine": 0.98}, ref)
    assert sorted(f.metric for f in failures) == ["cosine", "kl", "top1"]
    drop = next(f for f in failures if f.metric == "top1")
    assert "0.0500 below FP32" in drop.explain()


def test_missing_metric_fails_and_unknown_metric_is_user_error() -> None:
    t = parse_tolerance({"iou": 0.02})
    assert evaluate(t, {"iou": None}, {"iou": 1.0})[0].explain() == "iou was not computed for this engine"
    with pytest.raises(QuantlabError, match="tolerance on iou, which compare"):
        check_known(t, {"top1", "cosine"}, "compare")
