"""Tensors holding fill values (an attention mask's -3.4e38) stay in float; ``[ptq] exclude``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrators import get_calibrator
from quantlab.cli import main
from quantlab.collect import ort_session
from quantlab.qdq.targets import TARGETS, compute_ranges, fill_value_tensors, float_nodes, write_qdq_model
from quantlab.stats import StatsSet

from conftest import prepared_with_stats, save_model, tiny_config_text

FLT_MIN = float(np.finfo(np.float32).min)


def attention_net() -> onnx.GraphProto:
    """x[N,6,8] -> scores = x Wq (x Wk)^T; masked where x[..., 0] < 0 with -3.4e38 (as BERT exports do); softmax; @ x."""
    g = np.random.default_rng(3)
    wq = g.standard_normal((8, 8)).astype(np.float32)
    wk = g.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
        helper.make_node("Transpose", ["k"], ["kt"], name="key_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Slice", ["x", "s0", "s1", "s2"], ["first"], name="first"),  # [N,6,1]
        helper.make_node("Transpose", ["first"], ["first_t"], name="first_t", perm=[0, 2, 1]),  # [N,1,6]
        helper.make_node("Less", ["first_t", "zero"], ["pad"], name="is_pad"),
        helper.make_node("Where", ["pad", "fill", "zero"], ["mask"], name="mask"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "x"], ["y"], name="context"),
    ]
    inits = [
        numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
        numpy_helper.from_array(np.array([2], np.int64), "s2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(FLT_MIN, np.float32), "fill"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])
    return helper.make_graph(nodes, "attention", [x], [y], inits)


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fill")
    pm, stats, g = prepared_with_stats(folder, attention_net(), "attention.onnx", "x", (4, 6, 8), 4, 4)
    return folder, pm, stats, {"x": g.standard_normal((8, 6, 8)).astype(np.float32)}


def test_fill_value_tensors_and_their_nodes_are_found(attention):
    _, pm, stats, _ = attention
    fills = fill_value_tensors(stats)
    assert "masked" in fills and "mask" in fills
    assert "scores" not in fills and "probs" not in fills
    assert float_nodes(onnx.load(str(pm.path)), fills) == ["mask", "mask_add", "softmax"]


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_keeping_them_float_saves_the_attention(attention, target):
    folder, pm, stats, feed = attention
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS[target])
    reference = ort_session(str(pm.path)).run(None, feed)[0]

    def cosine(exclude):
        out = folder / f"{target}-{len(exclude)}.onnx"
        write_qdq_model(pm.path, ranges, TARGETS[target], out, exclude=exclude)
        y = ort_session(str(out)).run(None, feed)[0].astype(np.float64).ravel()
        r = reference.astype(np.float64).ravel()
        return float(r @ y / np.linalg.norm(r) / np.linalg.norm(y)), onnx.load(str(out))

    kept = float_nodes(onnx.load(str(pm.path)), fill_value_tensors(stats))
    good, model = cosine(kept)
    assert good > 0.99
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {"mask", "masked"}
    # the placement alone leaves the masked Add and the Softmax in float (they are not weighted layers and
    # the mask is not INT8), so the scores survive even without the exclusion
    alone, model = cosine([])
    assert alone > 0.99
    assert not {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"} & {"mask", "masked"}


def test_ptq_reports_kept_nodes_and_checks_exclude(tmp_path, capsys):
    model = save_model(attention_net(), tmp_path / "attention.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    g = np.random.default_rng(5)
    for i in range(3):
        np.save(calib / f"s{i}.npy", g.standard_normal((6, 8)).astype(np.float32))
    config = tmp_path / "quantlab.toml"
    config.write_text(tiny_config_text(model, calib, tmp_path / "reports").replace("[ptq]", '[ptq]\nexclude = ["context"]', 1))
    assert main(["ptq", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "kept in float: 4 node(s)" in out and "attention mask" in out and "1 named in [ptq] exclude" in out
    run = next((tmp_path / "reports").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kept_float"]["nodes"] == ["context", "mask", "mask_add", "softmax"]
    # the rewritten models are still those quantize_static writes, exclusions included
    stats = StatsSet.load(run / "stats.npz")
    for calibrator in ("percentile", "entropy", "mse"):
        for name, target in TARGETS.items():
            ranges = compute_ranges(stats, get_calibrator(calibrator), target)
            write_qdq_model(run / "model_fp32.onnx", ranges, target, tmp_path / "direct.onnx", summary["kept_float"]["nodes"])
            assert (tmp_path / "direct.onnx").read_bytes() == (run / "int8" / f"{calibrator}.{name}.onnx").read_bytes()
    assert "`mask_add`" in (run / "summary.md").read_text() and "mask_add" in (run / "index.html").read_text()
    cache = (run / "trt" / "minmax.calib.cache").read_text()
    assert "masked:" not in cache and "scores:" in cache
    config.write_text(config.read_text().replace('exclude = ["context"]', 'exclude = ["no_such_node"]'))
    assert main(["ptq", "--config", str(config), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "ptq.exclude names ['no_such_node']" in err and err.count("\n") == 1
    assert not (tmp_path / "other").exists()
