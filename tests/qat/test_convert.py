"""ONNX -> PyTorch conversion: each tiny graph built here computes what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.collect import ort_session
from quantlab.errors import QuantlabError

from conftest import conv_net

torch = pytest.importorskip("torch")

from quantlab.qat.convert import convert, run_onnx_module, supported_ops, unsupported_ops  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _assert_same(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    expected = ort_session(model).run(None, feed)
    got = run_onnx_module(convert(model), feed)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_conv_net_equals_onnx_runtime_at_any_batch():
    model = helper.make_model(conv_net(), opset_imports=[helper.make_opsetid("", 17)])
    g = np.random.default_rng(0)
    for n in (1, 5):
        _assert_same(model, {"input": g.standard_normal((n, 3, 8, 8)).astype(np.float32)})


def test_detector_ops_equal_onnx_runtime():
    """The PP-OCR detector's ops: SAME_UPPER Conv and MaxPool, grouped strided Conv, HardSigmoid
    gating, ReduceMean, nearest Resize, Concat, ConvTranspose with pads, Sigmoid."""
    g = np.random.default_rng(1)
    w = lambda *s: (g.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[1, 1]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c2"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("HardSigmoid", ["m"], ["hs"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c2", "hs"], ["se"]),
        helper.make_node("Resize", ["se", "", "scales"], ["up"], mode="nearest", nearest_mode="floor",
                         coordinate_transformation_mode="asymmetric"),
        helper.make_node("Concat", ["up", "up"], ["cat"], axis=1),
        helper.make_node("ConvTranspose", ["cat", "wt"], ["ct"], strides=[2, 2], pads=[1, 0, 0, 1]),
        helper.make_node("AveragePool", ["ct"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 0, 0]),
        helper.make_node("Sigmoid", ["ap"], ["y"]),
    ]
    inits = [("w1", w(4, 3, 3, 3)), ("b1", w(4)), ("w2", w(4, 1, 3, 3)), ("b2", w(4)),
             ("scales", np.array([1, 1, 2, 2], np.float32)), ("wt", w(8, 2, 2, 2))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 11])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])
    model = _model(nodes, [x], [y], inits, opset=13)
    _assert_same(model, {"x": g.standard_normal((2, 3, 9, 11)).astype(np.float32)})


def test_transformer_ops_equal_onnx_runtime():
    """An attention block as transformer exports write it: the mask built from shapes (Shape,
    Gather, Unsqueeze, Concat, Expand, Equal, Where), Q/K/V MatMuls, Reshape/Transpose into heads,
    scaled Softmax, GELU through Erf, LayerNormalization, masked mean pooling (ReduceSum, Div)."""
    g = np.random.default_rng(2)
    d, heads = 8, 2
    w = lambda *s: (g.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h0"]),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero1"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "heads_shape"], ["qshape"], axis=0),
        helper.make_node("MatMul", ["h0", "wq"], ["q"]),
        helper.make_node("MatMul", ["h0", "wk"], ["k"]),
        helper.make_node("Reshape", ["q", "qshape"], ["qh"]),
        helper.make_node("Reshape", ["k", "qshape"], ["kh"]),
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]),
        helper.make_node("Div", ["s", "sqrt_d"], ["ss"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes12"], ["m4"]),
        helper.make_node("Equal", ["m4", "zero_f"], ["masked"]),
        helper.make_node("Expand", ["masked", "four_ones"], ["masked_e"]),
        helper.make_node("Where", ["masked_e", "neg", "ss"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 1, 3, 2]),
        helper.make_node("ReduceSum", ["pt", "axes3"], ["ps"], keepdims=0),
        helper.make_node("Transpose", ["ps"], ["pst"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["pst", "s0", "s1", "axes1"], ["sl"]),
        helper.make_node("Div", ["h0", "sqrt2"], ["hd"]),
        helper.make_node("Erf", ["hd"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h0", "e1"], ["gelu"]),
        helper.make_node("LayerNormalization", ["gelu", "ln_s", "ln_b"], ["ln"], axis=-1, epsilon=1e-12),
        helper.make_node("Unsqueeze", ["maskf", "axes2"], ["m3"]),
        helper.make_node("Mul", ["ln", "m3"], ["lm"]),
        helper.make_node("ReduceSum", ["lm", "axes1"], ["num"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axes1"], ["den"], keepdims=0),
        helper.make_node("Div", ["num", "den"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["pooled", "norm"], ["y"]),
    ]
    inits = [
        ("emb", w(20, d)), ("wq", w(d, d)), ("wk", w(d, d)), ("zero", np.array(0, np.int64)), ("zero1", i64(0)),
        ("heads_shape", i64(-1, heads, d // heads)), ("sqrt_d", np.array(2.0, np.float32)),
        ("axes12", i64(1, 2)), ("zero_f", np.array(0.0, np.float32)), ("four_ones", i64(1, 1, 1, 1)),
        ("neg", np.array(-3.4e38, np.float32)), ("axes3", i64(3)), ("s0", i64(1)), ("s1", i64(2 ** 62)),
        ("axes1", i64(1)), ("sqrt2", np.array(1.4142135, np.float32)), ("one", np.array(1.0, np.float32)),
        ("ln_s", w(d)), ("ln_b", w(d)), ("axes2", i64(2)),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 6])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d]),
            helper.make_tensor_value_info("sl", TensorProto.FLOAT, ["N", "A", "B"])]
    model = _model(nodes, [ids, mask], outs, inits)
    for n in (1, 3):
        feed = {"ids": g.integers(0, 20, (n, 6)), "mask": np.tile(np.array([1, 1, 1, 1, 0, 0], np.int64), (n, 1))}
        _assert_same(model, feed)


def test_parameters_are_the_weights_and_train():
    model = helper.make_model(conv_net(), opset_imports=[helper.make_opsetid("", 17)])
    module = convert(model)
    trainable = sorted(n for n in ("w1", "b1", "w2", "b2", "w3", "b3") if module.is_trainable(n))
    assert trainable == ["b1", "b2", "b3", "w1", "w2", "w3"]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    module(x)[0].square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_unsupported_ops_are_named_in_one_line():
    nodes = [helper.make_node("Celu", ["x"], ["c"]), helper.make_node("Einsum", ["c", "c"], ["y"], equation="ij,ij->ij")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    model = _model(nodes, [x], [y])
    assert unsupported_ops(model) == ["Celu", "Einsum"]
    with pytest.raises(QuantlabError) as info:
        convert(model)
    message = str(info.value)
    assert "op(s) Celu, Einsum not supported" in message and "\n" not in message
    assert "Conv" in supported_ops() and "Constant" in supported_ops()
