"""Cross-layer equalization: the same outputs, balanced ranges, ReLU6 kept exact, skips explained."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.collect import ort_session
from quantlab.config import TransformConfig
from quantlab.transforms.equalize import equalize, input_ranges, output_ranges, upper_bound
from quantlab.transforms.graph import Graph

from conftest import ROOT


def _model(nodes, inits, shape_in, shape_out, opset=17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _spread_weights(g: np.random.Generator, shape, spread: float = 3.0) -> np.ndarray:
    """Weights whose output channels differ in range by up to 10**spread, as after BatchNorm folding."""
    w = g.standard_normal(shape).astype(np.float32)
    return (w * 10.0 ** g.uniform(-spread / 2, spread / 2, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)


def conv_chain(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(8) -> Relu -> Conv(8, depthwise) -> Clip(0, 6) -> Conv(4) -> Conv(6) -> y.

    Pairs: (conv1, dw) by Relu, (dw, conv3) by ReLU6 (unbounded: dw reads a Relu), (conv3, conv4)
    directly.
    """
    g = np.random.default_rng(seed)
    inits = {
        "w1": _spread_weights(g, (8, 3, 3, 3)), "b1": g.standard_normal(8).astype(np.float32),
        "wd": _spread_weights(g, (8, 1, 3, 3), 1.0) * 0.2, "bd": g.standard_normal(8).astype(np.float32) * 0.1,
        "w3": g.standard_normal((4, 8, 1, 1)).astype(np.float32), "b3": g.standard_normal(4).astype(np.float32),
        "w4": g.standard_normal((6, 4, 1, 1)).astype(np.float32),
        "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Conv", ["c3", "w4"], ["y"], name="conv4"),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 6, 8, 8])


def _outputs(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> np.ndarray:
    return ort_session(model).run(None, {name: x})[0]


def _inputs(seed: int = 1, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((4, 3, 8, 8)) * scale).astype(np.float32)


def test_outputs_unchanged_and_relu_pair_balanced():
    model = conv_chain()
    out, result = equalize(model, [], TransformConfig())
    assert result.applied and {(r["first"], r["second"]) for r in result.layers} >= {("conv1", "dw"), ("conv3", "conv4")}
    x = _inputs()
    ref = _outputs(model, x)
    np.testing.assert_allclose(_outputs(out, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    g0, g1 = Graph(model), Graph(out)
    conv1, dw = g1.layer(g1.producer["c1"]), g1.layer(g1.producer["c2"])
    before = output_ranges(g0.array("w1"), conv1)
    after_1, after_2 = output_ranges(g1.array("w1"), conv1), input_ranges(g1.array("wd"), dw)
    assert before.max() / before.min() > 30  # a real imbalance to start with
    # Nagel et al.: once equalized, r1_i = r2_i for the pair joined by the ReLU
    np.testing.assert_allclose(after_1, after_2, rtol=1e-3)


def test_relu6_pair_keeps_its_clip_exact():
    """A ReLU6 pair is rescaled only in channels whose bounded pre-activation never reaches 6."""
    w1 = np.zeros((4, 3, 1, 1), np.float32)
    w1[0] = 0.1   # at most 6 * 0.3 + 0.5 = 2.3: may be rescaled
    w1[1] = 1.0   # up to 18.5: saturates, must keep scale 1
    w1[2] = 0.01  # at most 0.68: a tiny channel, rescaled the most
    w1[3] = -0.5  # never above its bias
    inits = {"w1": w1, "b1": np.full(4, 0.5, np.float32),
             "w2": np.random.default_rng(0).standard_normal((5, 4, 1, 1)).astype(np.float32),
             "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    nodes = [helper.make_node("Clip", ["x", "zero", "six"], ["xc"], name="clip_in"),
             helper.make_node("Conv", ["xc", "w1", "b1"], ["c1"], name="a"),
             helper.make_node("Clip", ["c1", "zero", "six"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="b")]
    model = _model(nodes, inits, ["N", 3, 4, 4], ["N", 5, 4, 4])
    g0 = Graph(model)
    np.testing.assert_allclose(upper_bound(g0, g0.layer(g0.producer["c1"])), [2.3, 18.5, 0.68, 0.5], rtol=1e-6)
    out, result = equalize(model, [], TransformConfig())
    assert result.applied and result.layers[0]["channels_held_by_clip"] == 1
    g1 = Graph(out)
    w1_after = g1.array("w1")
    np.testing.assert_array_equal(w1_after[1], w1[1])  # the saturating channel is untouched
    assert not np.allclose(w1_after[2], w1[2])  # the others moved
    assert np.all(upper_bound(g1, g1.layer(g1.producer["c1"])) <= np.array([6.0, 18.5, 6.0, 6.0]) * (1 + 1e-6))
    x = np.random.default_rng(1).uniform(-2, 8, (8, 3, 4, 4)).astype(np.float32)  # saturates both clips
    ref = _outputs(model, x)
    np.testing.assert_allclose(_outputs(out, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_relu6_with_unbounded_input_is_skipped_with_its_reason():
    g = np.random.default_rng(0)
    inits = {"w1": _spread_weights(g, (4, 3, 1, 1)), "w2": g.standard_normal((5, 4, 1, 1)).astype(np.float32),
             "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="a"),
             helper.make_node("Clip", ["c1", "zero", "six"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="b")]
    model = _model(nodes, inits, ["N", 3, 4, 4], ["N", 5, 4, 4])
    out, result = equalize(model, [], TransformConfig())
    assert not result.applied and out is model
    assert "Clip(0, 6) would stop being exact in every channel" in result.detail


def test_hardswish_pair_is_skipped_with_its_reason():
    g = np.random.default_rng(0)
    inits = {"w1": g.standard_normal((4, 3, 1, 1)).astype(np.float32), "w2": g.standard_normal((5, 4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="a"),
             helper.make_node("HardSigmoid", ["c1"], ["hs"], name="hsig", alpha=1 / 6),
             helper.make_node("Mul", ["c1", "hs"], ["h"], name="hswish"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="b")]
    model = _model(nodes, inits, ["N", 3, 4, 4], ["N", 5, 4, 4])
    out, result = equalize(model, [], TransformConfig())
    assert not result.applied
    assert "joined by HardSigmoid/Mul (not positive-homogeneous)" in result.detail


def test_gemm_pair_and_grouped_conv():
    g = np.random.default_rng(3)
    inits = {"w1": _spread_weights(g, (6, 5)), "b1": g.standard_normal(6).astype(np.float32),
             "w2": g.standard_normal((6, 4)).astype(np.float32)}  # transB = 0: [K, N]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("LeakyRelu", ["h"], ["a"], name="act", alpha=0.1),
             helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2")]
    model = _model(nodes, inits, ["N", 5], ["N", 4])
    out, result = equalize(model, [], TransformConfig())
    assert result.applied
    x = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x), _outputs(model, x), rtol=1e-4, atol=1e-5)

    inits = {"w1": _spread_weights(g, (8, 2, 3, 3)), "w2": g.standard_normal((4, 4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="g4", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="g2", group=2)]
    model = _model(nodes, inits, ["N", 8, 5, 5], ["N", 4, 5, 5])
    out, result = equalize(model, [], TransformConfig())
    assert result.applied
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x), _outputs(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_efficientnet_lite0_computes_the_same_after_equalization():
    from quantlab.config import load_config
    from quantlab.data import make_reader
    from quantlab.model import prepare_model
    from quantlab.ptq import resolve_model

    config = load_config(ROOT / "quantlab.toml")
    prepared = prepare_model(resolve_model(config), config.model.input_shapes)
    model = onnx.load(str(prepared.path))
    out, result = equalize(model, [], TransformConfig())
    assert result.applied and len(result.layers) >= 10
    assert "Clip(0, 6) would stop being exact" in result.detail  # ReLU6 pairs with an unbounded input
    feed = next(iter(make_reader(config.data, config.resolve(config.data.calib), prepared.inputs)))
    ref, got = _outputs(model, feed["input"], "input"), _outputs(out, feed["input"], "input")
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() * 100  # float rounding of ~50 layers
    assert (got.argmax(1) == ref.argmax(1)).all()
