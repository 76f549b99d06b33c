"""The scale table: rows of one Q/DQ model (activation ranges with the deployed scales, per-channel
weights) and their CSV form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantlab.calibrators import get_calibrator
from quantlab.collect import collect_stats
from quantlab.model import prepare_model
from quantlab.qdq.targets import TARGETS, compute_ranges, write_qdq_model
from quantlab.scales import CSV_HEADER, scale_rows, scales_csv

from conftest import conv_net, save_model


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_rows_hold_the_deployed_scales(tmp_path, target):
    pm = prepare_model(save_model(conv_net(), tmp_path / "tiny.onnx"))
    g = np.random.default_rng(0)
    stats = collect_stats(pm, [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)])
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS[target])
    write_qdq_model(pm.path, ranges, TARGETS[target], tmp_path / "q.onnx")
    rows = scale_rows(ranges, onnx.load(str(tmp_path / "q.onnx")), stats.folded, "minmax", target)
    acts = [r for r in rows if r["kind"] == "activation"]
    assert [r["tensor"] for r in acts] == sorted(ranges)
    deployed = [r for r in acts if r["scale"] is not None]
    assert deployed
    for r in deployed:
        if target == "tensorrt":
            assert r["scale"] == pytest.approx(r["amax"] / 127, rel=1e-6) and r["zero_point"] == 0
        else:
            assert r["scale"] == pytest.approx((r["max"] - r["min"]) / 255, rel=1e-6)
            assert r["zero_point"] == round(-r["min"] / r["scale"])
    weights = {r["tensor"]: r for r in rows if r["kind"] == "weight"}
    assert weights["w1"]["channels"] == 8 and len(weights["w1"]["scale"]) == 8
    assert weights["w1"]["amax"] == pytest.approx(max(weights["w1"]["scale"]) * 127)


def test_csv_has_one_line_per_weight_channel():
    rows = [
        {"tensor": "x", "kind": "activation", "calibrator": "mse", "target": "tensorrt", "amax": 2.0, "min": -1.5,
         "max": 2.0, "scale": None, "zero_point": None, "dtype": None, "channels": 1, "folded_into": None},
        {"tensor": "w", "kind": "weight", "calibrator": "mse", "target": "tensorrt", "amax": 0.5, "min": None,
         "max": None, "scale": [0.25, 0.5 / 127], "zero_point": [0, 0], "dtype": "int8", "channels": 2, "folded_into": None},
    ]
    lines = scales_csv(rows).splitlines()
    assert lines[0] == ",".join(CSV_HEADER)
    assert lines[1:] == [
        "x,activation,mse,tensorrt,,2.0,-1.5,2.0,,,",
        "w,weight,mse,tensorrt,int8,0.5,,,0,0.25,0",
        f"w,weight,mse,tensorrt,int8,0.5,,,1,{0.5 / 127!r},0",
    ]
