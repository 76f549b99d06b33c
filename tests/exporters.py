"""Tiny models written the ways exporters write them, built with onnx.helper (seeded weights).

Each builder returns an ``onnx.ModelProto`` that passes ``onnx.checker``; the tests save it and run it
through preparation and PTQ.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(g: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (g.standard_normal(shape) * scale).astype(np.float32)


def model(nodes, inputs, outputs, inits=(), opset: int = 17, ir: int | None = None, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir if ir is not None else helper.find_min_ir_version_for(list(m.opset_import))
    onnx.checker.check_model(m)
    return m


def vi(name: str, shape, elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def constant_weights(batch="N") -> onnx.ModelProto:
    """Weights that are not initializers: a ``Constant`` Conv weight, a ``Reshape`` of a flat initializer,
    a ``Cast`` of a float64 bias, an ``Identity`` Gemm weight, a ``ConstantOfShape`` bias, and a Linear
    written as ``Transpose`` + ``MatMul``."""
    g = _rng(10)
    w1, w2, w3, w4 = _w(g, 8, 3, 3, 3), _w(g, 8, 8, 3, 3), _w(g, 8, 8), _w(g, 6, 8)
    nodes = [
        helper.make_node("Constant", [], ["w1"], name="w1_const", value=numpy_helper.from_array(w1)),
        helper.make_node("Cast", ["b1_f64"], ["b1"], name="b1_cast", to=FLOAT),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["w2_flat", "w2_shape"], ["w2"], name="w2_reshape"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Identity", ["w3_src"], ["w3"], name="w3_identity"),
        helper.make_node("ConstantOfShape", ["b3_shape"], ["b3"], name="b3_fill",
                         value=numpy_helper.from_array(np.array([0.05], np.float32))),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["h"], name="fc1", transB=1),
        helper.make_node("Transpose", ["w4"], ["w4_t"], name="w4_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w4_t"], ["y"], name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(g.standard_normal(8) * 0.1, "b1_f64"),
        numpy_helper.from_array(w2.ravel(), "w2_flat"),
        numpy_helper.from_array(np.array(w2.shape, np.int64), "w2_shape"),
        numpy_helper.from_array(w3, "w3_src"),
        numpy_helper.from_array(np.array([8], np.int64), "b3_shape"),
        numpy_helper.from_array(w4, "w4"),
    ]
    return model(nodes, [vi("x", [batch, 3, 8, 8])], [vi("y", [batch, 6])], inits, opset=12)


def shadowed_initializers() -> onnx.ModelProto:
    """IR 3 and opset 8, the way old exporters wrote models: every initializer is a graph input too."""
    g = _rng(11)
    w1, b1, w2, b2 = _w(g, 8, 3, 3, 3), _w(g, 8, scale=0.1), _w(g, 4, 8), _w(g, 4, scale=0.1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]]
    inputs = [vi("x", [1, 3, 8, 8]), vi("w1", [8, 3, 3, 3]), vi("b1", [8]), vi("w2", [4, 8]), vi("b2", [4])]
    return model(nodes, inputs, [vi("y", [1, 4])], inits, opset=8, ir=3)


def gemm_and_matmul_layouts(batch="N") -> onnx.ModelProto:
    """``Gemm`` with ``transB = 0`` (weight ``[K, N]``) and a ``MatMul`` with the weight on the left."""
    g = _rng(12)
    w1, b1, w2 = _w(g, 16, 12), _w(g, 12, scale=0.1), _w(g, 5, 6)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc_transB0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["r3"], name="to_3d"),  # [N, 6, 2]
        helper.make_node("MatMul", ["w2", "r3"], ["y"], name="left_weight"),  # [5, 6] @ [N, 6, 2] -> [N, 5, 2]
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([-1, 6, 2], np.int64), "shape"),
    ]
    return model(nodes, [vi("x", [batch, 16])], [vi("y", [batch, 5, 2])], inits)


def convolutions(batch="N") -> onnx.ModelProto:
    """Conv1d, Conv2d (grouped and depthwise), ConvTranspose (grouped) and Conv3d in one graph."""
    g = _rng(13)
    nodes = [
        # 1-D: [N, 4, 16] -> [N, 8, 16]
        helper.make_node("Conv", ["x1", "w1d", "b1d"], ["c1"], name="conv1d", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1d"),
        helper.make_node("Reshape", ["r1", "to_2d"], ["x2"], name="to_2d"),  # [N, 8, 4, 4]
        helper.make_node("Conv", ["x2", "w_grouped"], ["c2"], name="conv_grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w_depthwise", "b_depthwise"], ["c3"], name="conv_depthwise", group=8,
                         pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c3", "w_deconv", "b_deconv"], ["c4"], name="deconv_grouped", group=2,
                         strides=[2, 2]),  # [N, 8, 8, 8]
        helper.make_node("Reshape", ["c4", "to_3d"], ["x3"], name="to_3d"),  # [N, 2, 4, 8, 8]
        helper.make_node("Conv", ["x3", "w3d"], ["y"], name="conv3d", pads=[1, 1, 1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(_w(g, 8, 4, 3), "w1d"), numpy_helper.from_array(_w(g, 8, scale=0.1), "b1d"),
        numpy_helper.from_array(np.array([-1, 8, 4, 4], np.int64), "to_2d"),
        numpy_helper.from_array(_w(g, 8, 4, 3, 3), "w_grouped"),
        numpy_helper.from_array(_w(g, 8, 1, 3, 3), "w_depthwise"), numpy_helper.from_array(_w(g, 8, scale=0.1), "b_depthwise"),
        numpy_helper.from_array(_w(g, 8, 4, 2, 2), "w_deconv"), numpy_helper.from_array(_w(g, 8, scale=0.1), "b_deconv"),
        numpy_helper.from_array(np.array([-1, 2, 4, 8, 8], np.int64), "to_3d"),
        numpy_helper.from_array(_w(g, 3, 2, 3, 3, 3), "w3d"),
    ]
    return model(nodes, [vi("x1", [batch, 4, 16])], [vi("y", [batch, 3, 4, 8, 8])], inits)


def mixed_inputs(batch="N") -> onnx.ModelProto:
    """Three inputs of three types: float features, int64 token ids (an embedding lookup), a bool mask."""
    g = _rng(14)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embedding"),  # [N, 4, 8]
        helper.make_node("Cast", ["mask"], ["mask_f"], name="mask_cast", to=FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"], name="mask_mul"),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], name="pool", keepdims=0),  # [N, 8]
        helper.make_node("Concat", ["pooled", "feat"], ["joined"], name="join", axis=1),  # [N, 14]
        helper.make_node("MatMul", ["joined", "w"], ["y"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(_w(g, 20, 8), "table"), numpy_helper.from_array(_w(g, 14, 3), "w"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"), numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    inputs = [vi("feat", [batch, 6]), vi("ids", [batch, 4], TensorProto.INT64), vi("mask", [batch, 4], TensorProto.BOOL)]
    return model(nodes, inputs, [vi("y", [batch, 3])], inits)


def to_fp16(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float16 throughout (weights, inputs, outputs), as an FP16 export writes it."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for init in out.graph.initializer:
        if init.data_type == FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        if v.type.tensor_type.elem_type == FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in out.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            elif a.name == "to" and a.i == FLOAT:
                a.i = TensorProto.FLOAT16
    onnx.checker.check_model(out)
    return out


def already_quantized() -> onnx.ModelProto:
    """A dynamically quantized MatMul (``DynamicQuantizeLinear`` + ``MatMulInteger``), as ONNX Runtime writes one."""
    g = _rng(15)
    wq = g.integers(0, 255, (8, 4)).astype(np.uint8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="quantize_x"),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"], name="matmul_integer"),
        helper.make_node("Cast", ["acc"], ["accf"], name="cast", to=FLOAT),
        helper.make_node("Mul", ["accf", "xs"], ["y"], name="rescale"),
    ]
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.array(128, np.uint8), "wz")]
    return model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])], inits)
