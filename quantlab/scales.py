"""The scale table of a run: every calibrated range and the scale and zero-point each model deploys.

``scales.json`` holds one row per tensor, calibrator and target; ``scales.csv`` the same with one line
per channel of a per-channel weight.  An activation row holds the calibrated ``amax`` and the signed
range ``[min, max]`` and, when the model quantizes that tensor, the deployed ``scale`` and
``zero_point`` with ``r = scale * (q - zero_point)``: for ``tensorrt`` ``scale = amax / 127`` and
``zero_point = 0``; for ``ort-cpu`` (U8) ``scale = (max - min) / 255`` and
``zero_point = round(-min / scale)``.  A weight row lists the per-channel scales of the model, with
``amax = max(scale) * 127``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantlab.textio import csv_text, dumps_json, write_text

CSV_HEADER = ["tensor", "kind", "calibrator", "target", "dtype", "amax", "min", "max", "channel", "scale", "zero_point"]


def scale_rows(
    ranges: Mapping[str, Any], qmodel: Any, folded: Mapping[str, str], calibrator: str, target: str
) -> list[dict[str, Any]]:
    """The rows of one model: its activation ranges (``TensorRange`` by tensor) with the scales
    ``qmodel`` deploys for them, then its quantized weights; ``folded`` maps a tensor folded into an
    activation's output to that output."""
    from quantlab.qdq.targets import read_quant_params

    deployed = {(p.kind, p.tensor): p for p in read_quant_params(qmodel)}
    rows: list[dict[str, Any]] = []
    for tensor, r in sorted(ranges.items()):
        p = deployed.get(("activation", tensor))
        rows.append({
            "tensor": tensor, "kind": "activation", "calibrator": calibrator, "target": target,
            "amax": r.amax, "min": r.lo, "max": r.hi,
            "scale": None if p is None else p.scale[0],
            "zero_point": None if p is None else p.zero_point[0],
            "dtype": None if p is None else p.dtype, "channels": 1,
            "folded_into": folded.get(tensor),
        })
    for (kind, tensor), p in sorted(deployed.items()):
        if kind == "weight":
            rows.append({
                "tensor": tensor, "kind": "weight", "calibrator": calibrator, "target": target,
                "amax": max(p.scale) * 127.0, "min": None, "max": None,
                "scale": list(p.scale), "zero_point": list(p.zero_point), "dtype": p.dtype,
                "channels": len(p.scale), "folded_into": None,
            })
    return rows


def scales_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: one line per channel of a weight, floats written with ``repr`` (exact)."""
    lines = []
    for r in rows:
        scales = r["scale"] if isinstance(r["scale"], list) else [r["scale"]]
        zps = r["zero_point"] if isinstance(r["zero_point"], list) else [r["zero_point"]]
        for ch, (s, z) in enumerate(zip(scales, zps)):
            lines.append([
                r["tensor"], r["kind"], r["calibrator"], r["target"], r["dtype"] or "",
                _num(r["amax"]), _num(r["min"]), _num(r["max"]), ch if r["kind"] == "weight" else "",
                _num(s), "" if z is None else z,
            ])
    return csv_text(CSV_HEADER, lines)


def write_scale_tables(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Write ``scales.json`` and ``scales.csv`` into ``folder``; their names."""
    write_text(folder / "scales.json", dumps_json(rows))
    write_text(folder / "scales.csv", scales_csv(rows))
    return ["scales.json", "scales.csv"]


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))
