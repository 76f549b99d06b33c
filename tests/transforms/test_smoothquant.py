"""SmoothQuant: the same outputs, lower INT8 error, LayerNorm folding, explicit Muls kept in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.collect import ort_session
from quantlab.config import TransformConfig
from quantlab.transforms.graph import Graph
from quantlab.transforms.smoothquant import output_error, smoothing_scale, smoothquant

from conftest import ROOT

D = 16


def block(seed: int = 0) -> onnx.ModelProto:
    """x[N,T,16] -> LayerNorm (two outlier channels) -> MatMul -> Add(residual: the LN output) ->
    Tanh -> MatMul -> y, and the LN output is also read by a second MatMul (a shared input)."""
    g = np.random.default_rng(seed)
    gamma = np.ones(D, np.float32)
    gamma[[2, 9]] = [40.0, -25.0]  # the outlier channels of transformer activations
    inits = {
        "gamma": gamma, "beta": (g.standard_normal(D) * 0.1).astype(np.float32),
        "wa": (g.standard_normal((D, D)) * 0.2).astype(np.float32),
        "wk": (g.standard_normal((D, 8)) * 0.2).astype(np.float32),
        "wb": (g.standard_normal((D, 8)) * 0.2).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "wa"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="mm_k"),
        helper.make_node("Add", ["a", "ln"], ["r"], name="residual"),
        helper.make_node("Tanh", ["r"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "wb"], ["b"], name="mm_b"),
        helper.make_node("Add", ["b", "k"], ["y"], name="sum"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])
    graph = helper.make_graph(nodes, "block", [x], [y], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _data(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    g = np.random.default_rng(seed)
    return [{"x": g.standard_normal((8, 6, D)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort_session(model).run(None, feed)[0]


def test_same_outputs_and_lower_int8_error():
    model = block()
    data = _data()
    out, result = smoothquant(model, data, TransformConfig())
    assert result.applied
    onnx.checker.check_model(out)
    for feed in _data(2, seed=9):  # other data than the calibration batches
        ref = _run(model, feed)
        np.testing.assert_allclose(_run(out, feed), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    ln = next(r for r in result.layers if r["input"] == "ln")
    assert ln["fold"] == "layernorm" and sorted(ln["layers"]) == ["mm_a", "mm_k"]
    assert ln["error_after"] < ln["error_before"] / 2  # the outlier channels no longer set the INT8 step


def test_layernorm_fold_restores_the_residual_and_muls_stay_float():
    model = block()
    out, result = smoothquant(model, _data(), TransformConfig(smoothquant_alpha=0.5))
    g0, g1 = Graph(model), Graph(out)
    ln = g1.producer["ln_smoothed"]
    assert ln.op_type == "LayerNormalization"
    s = g0.array("gamma") / g1.array("gamma")  # 1/s went into gamma ...
    np.testing.assert_allclose(g0.array("beta") / g1.array("beta"), s, rtol=1e-5)  # ... and beta
    for w in ("wa", "wk"):  # ... and s into the rows of both MatMuls reading the LN
        np.testing.assert_allclose(g1.array(w), g0.array(w) * s[:, None], rtol=1e-5)
    restore = g1.producer["ln"]
    assert restore.op_type == "Mul" and list(restore.input)[0] == "ln_smoothed"
    assert [n.name for n in g1.readers["ln"]] == ["residual"]  # the residual reads the original values
    assert {n.name for n in g1.readers["ln_smoothed"]} == {"mm_a", "mm_k", restore.name}
    assert restore.name in result.keep_float
    # a fixed alpha is applied as given: s_j = max|X_j|^0.5 / max|W_j|^0.5
    x = np.concatenate([f["x"] for f in _data()])
    cmax = np.abs(_run_tensor(model, "ln", x)).reshape(-1, D).max(0)
    wmax = np.maximum(np.abs(g0.array("wa")).max(1), np.abs(g0.array("wk")).max(1))
    np.testing.assert_allclose(s, smoothing_scale(cmax, wmax, 0.5), rtol=1e-5)


def _run_tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    from quantlab.transforms.graph import run_batches

    return next(run_batches(model, [{"x": x}], [name]))[0]


def test_explicit_mul_where_no_layernorm_writes_the_input():
    model = block()
    out, result = smoothquant(model, _data(), TransformConfig(smoothquant_alpha=0.5))
    g1 = Graph(out)
    mul = g1.producer[g1.model.graph.node[[n.name for n in g1.model.graph.node].index("mm_b")].input[0]]
    assert mul.op_type == "Mul" and mul.input[0] == "t" and mul.name in result.keep_float
    assert next(r for r in result.layers if r["input"] == "t")["fold"] == "mul"


def test_scale_formula_example():
    s = smoothing_scale(np.array([64.0, 0.0, 1.0]), np.array([0.25, 1.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [16.0, 1.0, 1.0])


def test_nothing_to_smooth_is_said_once():
    w = np.ones((3, 3, 1, 1), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, result = smoothquant(model, [], TransformConfig())
    assert out is model and not result.applied and "no MatMul or Gemm" in result.detail


@pytest.mark.slow
def test_minilm_computes_the_same_after_smoothing():
    from quantlab.config import load_config
    from quantlab.data import make_reader
    from quantlab.model import prepare_model
    from quantlab.ptq import resolve_model

    config = load_config(ROOT / "quantlab" / "models" / "minilm" / "quantlab.toml")
    prepared = prepare_model(resolve_model(config), config.model.input_shapes)
    model = onnx.load(str(prepared.path))
    feeds = list(make_reader(config.data, config.resolve(config.data.calib), prepared.inputs, resolve=config.resolve))[:2]
    out, result = smoothquant(model, feeds, TransformConfig(smoothquant_grid=(0.5, 0.8), smoothquant_rows=512))
    assert result.applied
    folds = [r["fold"] for r in result.layers]
    assert folds.count("layernorm") == 12  # query/key/value and the FFN input of each of the 6 layers
    evaluation = list(make_reader(config.data, config.resolve(config.compare.eval), prepared.inputs, resolve=config.resolve))[0]
    ref, got = _run(model, evaluation), _run(out, evaluation)
    cosine = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert np.abs(got - ref).max() < 1e-5 and cosine.min() > 1 - 1e-6


def test_maxima_from_too_few_samples_are_not_trusted():
    """Per-channel maxima of a handful of samples do not hold on the others: the cross-validated
    search sees the clipping an in-sample search would miss, and leaves such a layer alone."""
    g = np.random.default_rng(0)
    k, n = 64, 8
    w = (g.standard_normal((k, n)) * 0.2).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # heavy-tailed activations: each channel's maximum over 6 samples says little about the next 6
    data = [{"x": (g.standard_cauchy((3, k)) * 0.1).astype(np.float32)} for _ in range(2)]
    rows = np.concatenate([d["x"] for d in data])
    cmax, wmax = np.abs(rows).max(0), np.abs(w).max(1)
    in_sample = output_error(rows, cmax, [w], smoothing_scale(cmax, wmax, 0.6))
    assert in_sample < output_error(rows, cmax, [w], np.ones(k, np.float32)) / 5  # in-sample, smoothing looks good
    out, result = smoothquant(model, data, TransformConfig())
    record = result.layers[0]
    assert record["alpha"] is None and record["fold"] == "none" and not result.applied and out is model
    assert "no group of the 1 MatMul/Gemm input(s) had a lower INT8 error" in result.detail
