"""AdaRound: lower layer output error than nearest rounding, weights the Q/DQ export keeps exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.config import TransformConfig, load_config, override
from quantlab.transforms.adaround import _Op, adaround, round_layer
from quantlab.transforms.graph import Graph, quantize_weight


def _positive_inputs(shape, seed: int) -> np.ndarray:
    """Post-ReLU-like inputs: the rounding errors of one output add up instead of cancelling."""
    return (np.abs(np.random.default_rng(seed).standard_normal(shape)) + 1.0).astype(np.float32)


def test_adaround_lowers_the_layer_output_error_against_nearest_rounding():
    g = np.random.default_rng(0)
    x = _positive_inputs((2048, 48), 1)
    w = (g.standard_normal((48, 16)) * 0.1).astype(np.float32)
    q, err = round_layer(x, w, None, _Op("matmul"), 1, 300, 0, "cpu")
    assert err["adaround"] < 0.5 * err["nearest"], err
    q_near, s = quantize_weight(w, 1)
    assert np.abs(q - q_near).max() == 1  # each weight rounds down or up, never further
    assert 0.0 < np.mean(q != q_near) < 0.5
    # measured independently on other samples of the same distribution
    x_new = _positive_inputs((1024, 48), 2)
    ref = x_new @ w
    e_near = np.sum((x_new @ (q_near * s) - ref) ** 2)
    e_ada = np.sum((x_new @ (q * s) - ref) ** 2)
    assert e_ada < 0.5 * e_near

    xc = _positive_inputs((8, 6, 10, 10), 3)
    wc = (g.standard_normal((12, 6, 3, 3)) * 0.1).astype(np.float32)
    op = _Op("conv", (1, 1, 1, 1), (1, 1), (1, 1), 1, act=(0.0, 6.0))
    _, err = round_layer(xc, wc, np.zeros(12, np.float32), op, 0, 200, 0, "cpu")
    assert err["adaround"] < 0.7 * err["nearest"], err


def test_rounded_weights_survive_the_qdq_export_exactly(tiny_config):
    """The INT8 weights ONNX Runtime writes for either target are the levels AdaRound chose."""
    from quantlab.ptq import run_ptq

    config = override(load_config(tiny_config), "ptq", transforms=("adaround",), calibrators=("minmax",))
    config = override(config, "transforms", adaround_iterations=40)
    result = run_ptq(config)
    run = result.run_dir
    record = json.loads((run / "summary.json").read_text())["transforms"][0]
    assert record["applied"] and len(record["layers"]) == 3
    transformed = Graph(onnx.load(str(run / "model_fp32_transformed.onnx")))
    original = Graph(onnx.load(str(run / "model_fp32.onnx")))
    changed = 0
    for target in ("tensorrt", "ort-cpu"):
        int8 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(run / "int8" / f"minmax.{target}.onnx")).graph.initializer}
        for layer in transformed.layers():
            w = transformed.array(layer.weight)
            q, s = quantize_weight(w, layer.out_axis)
            np.testing.assert_array_equal(q.astype(np.float32) * s, w)  # the FP32 weight is s * q ...
            np.testing.assert_array_equal(int8[f"{layer.weight}_quantized"].astype(np.int32), q)  # ... and exported as q
            near, _ = quantize_weight(original.array(layer.weight), layer.out_axis)
            np.testing.assert_array_equal(s, quantize_weight(original.array(layer.weight), layer.out_axis)[1])
            assert np.abs(q - near).max() <= 1
            changed += int(np.sum(q != near))
    assert changed > 0


def test_same_seed_same_weights(tiny_model):
    model = onnx.load(str(tiny_model))
    data = [{"input": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    config = TransformConfig(adaround_iterations=20)
    a, _ = adaround(model, data, config)
    b, _ = adaround(model, data, config)
    assert a.SerializeToString() == b.SerializeToString()
    kept, result = adaround(model, data, config, frozenset({"conv2", "fc"}))
    assert [r["layer"] for r in result.layers] == ["conv1"]  # layers kept in float are not rounded


def test_same_padding_matches_onnx_runtime():
    """A Conv with auto_pad SAME_UPPER (as in PP-OCR) is applied in PyTorch as ONNX Runtime runs it."""
    import torch
    from onnx import TensorProto, helper

    from quantlab.collect import ort_session
    from quantlab.transforms.adaround import _forward, _op

    w = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_UPPER", kernel_shape=[2, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 7, 6])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = Graph(model)
    op = _op(g, g.layer(node))
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 6)).astype(np.float32)
    got = _forward(torch, op, torch.from_numpy(x), torch.from_numpy(w), None).numpy()
    np.testing.assert_allclose(got, ort_session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
