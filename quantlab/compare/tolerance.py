"""Tolerances: how far an INT8 engine may fall from FP32 on a metric (``[tolerance]``).

In ``quantlab.toml``::

    [tolerance]
    top1 = 0.01                         # shorthand: at most 0.01 below FP32 (max_drop)
    kl = 0.05                           # for a lower-is-better metric: at most 0.05 above FP32
    mean_cosine = { min = 0.99 }        # an absolute floor
    mae = { max = 0.02 }                # an absolute ceiling
    iou = { max_drop = 0.02 }           # explicit form of the shorthand

FP32 is the reference for drops: its own agreement metrics are 1 (cosine, top1_agreement, ...), so
``top1_agreement = 0.02`` asks for 98 % agreement.  Rules: ``max_drop``, ``max_increase``, ``min``,
``max``; a metric may carry several.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantlab.compare.metrics import higher_is_better
from quantlab.errors import QuantlabError, check

RULES = ("max_drop", "max_increase", "min", "max")


@dataclass(frozen=True)
class Failure:
    """One rule an engine broke."""

    metric: str
    rule: str
    value: float | None
    reference: float | None
    limit: float

    def explain(self) -> str:
        if self.value is None:
            return f"{self.metric} was not computed for this engine"
        if self.rule == "max_drop":
            return (f"{self.metric} {self.value:.4f} is {self.reference - self.value:.4f} below FP32 "
                    f"({self.reference:.4f}); allowed drop {self.limit:g}")
        if self.rule == "max_increase":
            return (f"{self.metric} {self.value:.4g} is {self.value - self.reference:.4g} above FP32 "
                    f"({self.reference:.4g}); allowed increase {self.limit:g}")
        if self.rule == "min":
            return f"{self.metric} {self.value:.4f} is below the floor {self.limit:g}"
        return f"{self.metric} {self.value:.4g} is above the ceiling {self.limit:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_tolerance(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {rule: limit}}`` from the ``[tolerance]`` table; one-line errors for bad entries."""
    parsed: dict[str, dict[str, float]] = {}
    for metric, value in sorted(raw.items()):
        if isinstance(value, bool):
            raise QuantlabError(f"tolerance.{metric} = {value}: give a number or a table of {', '.join(RULES)}")
        if isinstance(value, (int, float)):
            value = {"max_drop" if higher_is_better(metric) else "max_increase": value}
        check(isinstance(value, dict), f"tolerance.{metric} must be a number or a table of {', '.join(RULES)}")
        rules: dict[str, float] = {}
        for rule, limit in value.items():
            check(rule in RULES, f"unknown tolerance rule '{rule}' for {metric}: choose one of {', '.join(RULES)}")
            check(
                isinstance(limit, (int, float)) and not isinstance(limit, bool),
                f"tolerance.{metric}.{rule} must be a number, got {limit!r}",
            )
            check(rule in ("min", "max") or limit >= 0, f"tolerance.{metric}.{rule} must be >= 0, got {limit}")
            rules[rule] = float(limit)
        parsed[metric] = rules
    return parsed


def check_known(tolerance: dict[str, dict[str, float]], computed: set[str], where: str) -> None:
    """A tolerance on a metric that is never computed is a user error, not a silent pass."""
    unknown = sorted(set(tolerance) - computed)
    check(
        not unknown,
        f"tolerance on {', '.join(unknown)}, which {where} does not compute: use one of {', '.join(sorted(computed))}",
    )


def evaluate(
    tolerance: dict[str, dict[str, float]], metrics: dict[str, float | None], reference: dict[str, float | None]
) -> list[Failure]:
    """The rules ``metrics`` breaks, given FP32's ``reference`` metrics."""
    failures: list[Failure] = []
    for metric, rules in tolerance.items():
        value, ref = metrics.get(metric), reference.get(metric)
        for rule, limit in rules.items():
            if value is None or (rule in ("max_drop", "max_increase") and ref is None):
                failures.append(Failure(metric, rule, value, ref, limit))
                continue
            broken = {
                "max_drop": lambda: ref - value > limit + 1e-12,
                "max_increase": lambda: value - ref > limit + 1e-12,
                "min": lambda: value < limit,
                "max": lambda: value > limit,
            }[rule]()
            if broken:
                failures.append(Failure(metric, rule, value, ref, limit))
    return failures
