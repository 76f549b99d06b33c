"""What a transform reports: whether it changed the model, what it did or why it could not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TransformResult:
    """One transform's record in a run (``summary.json``, ``manifest.json``, the report).

    Attributes:
        name: the transform (``equalize``, ``smoothquant``, ``adaround``, ``bias-correction``).
        applied: whether it changed the model.
        detail: one line: what it did, or why it did nothing.
        layers: one record per layer (or layer pair) it looked at: what it chose and measured.
        keep_float: nodes it added that must stay in float (an explicit scaling ``Mul``: its
            per-channel constant would not survive INT8).
        seconds: wall time (kept out of :meth:`to_dict`, which must not change run to run).
        cached: whether the transformed model came from quantlab's cache (also kept out).
    """

    name: str
    applied: bool
    detail: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    keep_float: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "applied": self.applied, "detail": self.detail, "layers": self.layers,
                "keep_float": self.keep_float}

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def rounded(value: float, digits: int = 6) -> float:
    """A float for JSON records: rounded, so that the record does not show float noise."""
    return float(round(float(value), digits))
