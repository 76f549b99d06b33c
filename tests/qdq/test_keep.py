"""keep_float / keep_fp16: chosen layers of an INT8 Q/DQ model back in float (FP32, or FP16 as TensorRT
runs them), on the tiny conv model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantlab.collect import ort_session
from quantlab.errors import QuantlabError
from quantlab.qdq.keep import keep_float, keep_fp16
from quantlab.qdq.pair import QdqPair
from quantlab.qdq.targets import TARGETS


def _run(model, feeds):
    session = ort_session(model)
    return [np.concatenate(x) for x in zip(*(session.run(None, f) for f in feeds))]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_keep_float_everything_is_fp32(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    names = [layer.name for layer in QdqPair(models[target], fp32).layers]
    model = keep_float(models[target], fp32, names)
    onnx.checker.check_model(model)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert sorted(n.op_type for n in model.graph.node) == sorted(n.op_type for n in fp32.graph.node)
    for a, b in zip(_run(model, feeds), _run(fp32, feeds)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_keep_float_one_node(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    q = models[target]
    model = keep_float(q, fp32, ["conv2"])
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    originals = {n.name: n for n in q.graph.node}
    conv2 = nodes["conv2"]
    assert conv2.input[1] == "w2" and conv2.input[2] == "b2"  # FP32 weights and bias
    assert conv2.input[0] in ("r1", "r1::float")  # the float activation, before the Q/DQ pair
    # the shared Q/DQ of r1 still feeds the residual Add; w2's DQ and its initializers are gone
    assert nodes["add1"].input[1] == "r1_DequantizeLinear_Output"
    assert "r1_QuantizeLinear" in nodes and "w2_DequantizeLinear" not in nodes
    inits = {i.name for i in model.graph.initializer}
    assert "w2_quantized" not in inits and "w2_scale" not in inits and "w2" in inits
    for name, node in originals.items():  # every other node as it was
        if name not in ("conv2", "w2_DequantizeLinear", "b2_DequantizeLinear"):
            assert nodes[name] == node, name
    # numerically: INT8 everywhere but conv2, which matches FP32 conv2 on the same (INT8-upstream) input
    (out,) = _run(model, feeds)
    (ref,) = _run(fp32, feeds)
    (int8,) = _run(q, feeds)
    assert not np.array_equal(out, int8) and not np.array_equal(out, ref)


def test_unknown_layer_is_a_user_error(tiny_pair):
    fp32, models, _ = tiny_pair
    with pytest.raises(QuantlabError, match="not a quantized layer"):
        keep_float(models["tensorrt"], fp32, ["relu1"])


def test_keep_fp16_structure_and_values(tiny_pair):
    fp32, models, feeds = tiny_pair
    q = models["tensorrt"]
    model = keep_fp16(q, fp32, ["conv2", "add1", "fc"])
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    conv2, add1 = nodes["conv2"], nodes["add1"]
    # conv2 reads its activation through a Cast to float16 and float16 copies of w2 and b2
    assert inits[conv2.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert inits[conv2.input[2]].data_type == onnx.TensorProto.FLOAT16
    assert "w2" not in inits and "w2_quantized" not in inits
    cast_in = next(n for n in model.graph.node if n.output[0] == conv2.input[0])
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT16
    # two FP16 layers in a row pass float16 directly; add1's output is cast back for the pooling
    assert add1.input[0] == conv2.output[0]
    cast_out = next(n for n in model.graph.node if add1.output[0] in n.input)
    assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "Cast" and conv2.output[0] in n.input for n in model.graph.node)
    assert inits[nodes["fc"].input[1]].data_type == onnx.TensorProto.FLOAT16
    logits = next(n for n in model.graph.node if n.output[0] == "logits")  # the graph output, cast back
    assert logits.op_type == "Cast" and logits.input[0] == nodes["fc"].output[0]
    # every other layer keeps its Q/DQ: only those of the three kept layers are gone
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) < sum(
        n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert nodes["conv1"] == next(n for n in q.graph.node if n.name == "conv1")
    # it evaluates: close to the FP32 partial model (float16 rounding only), different from it
    (half,) = _run(model, feeds)
    (full,) = _run(keep_float(q, fp32, ["conv2", "add1", "fc"]), feeds)
    assert half.dtype == np.float32
    assert not np.array_equal(half, full)
    assert np.abs(half - full).max() <= 1e-2 * np.abs(full).max()
    assert keep_fp16(q, fp32, ["conv2", "add1", "fc"]).SerializeToString() == model.SerializeToString()


def test_keep_fp16_of_every_layer_is_the_fp16_model(tiny_pair):
    fp32, models, feeds = tiny_pair
    q = models["tensorrt"]
    names = [layer.name for layer in QdqPair(q, fp32).layers]
    model = keep_fp16(q, fp32, names)
    onnx.checker.check_model(model)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    # every quantized layer reads float16 only; the float nodes between them (Relu, pooling) stay float32
    halves = {o for n in model.graph.node for o in n.output if o.endswith("::fp16")}
    for n in model.graph.node:
        if n.name in names:
            assert all(x in halves or x.endswith("::fp16") for x in n.input), n.name
    casts = [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "Cast"]
    assert casts == [("input", "input::fp16"), ("c1::fp16", "c1"), ("r1", "r1::fp16"), ("a1::fp16", "a1"),
                     ("flat", "flat::fp16"), ("logits::fp16", "logits")]
    (half,) = _run(model, feeds)
    (ref,) = _run(fp32, feeds)
    assert np.abs(half - ref).max() <= 1e-2 * np.abs(ref).max()
