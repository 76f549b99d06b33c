"""QdqPair: the quantized layers of an INT8 Q/DQ model, their Q/DQ chains and FP32 counterparts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantlab.errors import QuantlabError
from quantlab.qdq.pair import QdqPair

from conftest import conv_net


def _layers(pair: QdqPair) -> dict[str, dict[int, tuple[str, bool, list[str]]]]:
    return {
        layer.name: {k: (c.root, c.weight, [n.op_type for n in c.nodes]) for k, c in layer.chains.items()}
        for layer in pair.layers
    }


def test_tensorrt_layers_and_chains(tiny_pair):
    fp32, models, _ = tiny_pair
    pair = QdqPair(models["tensorrt"], fp32)
    act, weight = ["QuantizeLinear", "DequantizeLinear"], ["DequantizeLinear"]
    assert _layers(pair) == {
        "conv1": {0: ("input", False, act), 1: ("w1_quantized", True, weight)},
        "conv2": {0: ("r1", False, act), 1: ("w2_quantized", True, weight)},
        "add1": {1: ("r1", False, act)},  # the residual Add quantizes only its skip input
        "fc": {0: ("flat", False, act), 1: ("w3_quantized", True, weight)},
    }
    assert all(layer.fp32.name == layer.name for layer in pair.layers)
    assert pair.quantized_inputs(pair.layers[0]) == (("input",), ("w1",))  # FP32 names of the weights


def test_ort_cpu_correspondence_by_position_not_name(tiny_pair):
    fp32, models, _ = tiny_pair
    pair = QdqPair(models["ort-cpu"], fp32)
    assert [layer.name for layer in pair.layers] == ["conv1", "conv2", "add1", "gap", "flatten", "fc"]
    # ONNX Runtime removed relu1: conv1 writes r1, which holds FP32's c1 (pre-activation values)
    assert pair.fp32_of["r1"] == "c1" and pair.int8_of["c1"] == "r1"
    assert pair.quantized_inputs(pair.layers[0]) == (("input",), ("w1", "b1"))


def test_int8_model_of_another_graph_is_a_user_error(tiny_pair):
    fp32, models, _ = tiny_pair
    other = onnx.helper.make_model(conv_net(batch=2))
    other.graph.input[0].name = "x"
    for node in other.graph.node:
        node.input[:] = ["x" if i == "input" else i for i in node.input]
    with pytest.raises(QuantlabError, match="pass the FP32 model it was quantized from"):
        QdqPair(models["tensorrt"], other)


def test_dynamic_model_with_a_gather_on_int8_data_is_not_a_qdq_copy(tmp_path):
    """quantize_dynamic stores an embedding table as INT8 and runs Gather on it: the Gather's output is
    INT8 where the FP32 graph's is float, so the per-layer analysis must skip that model (it used to
    build a DequantizeLinear fed by the FP32 float tensor, which ONNX Runtime rejects)."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.compare.layers import mismatch
    from quantlab.qdq.targets import write_dynamic_model

    g = np.random.default_rng(0)
    table = numpy_helper.from_array(g.standard_normal((50, 16)).astype(np.float32), "table")
    w = numpy_helper.from_array(g.standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("Gather", ["table", "ids"], ["emb2"], name="embed2"),
         helper.make_node("Add", ["emb", "emb2"], ["sum"], name="add"),
         helper.make_node("MatMul", ["sum", "w"], ["y"], name="proj")],
        "gather_matmul",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [table, w],
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32_path = tmp_path / "fp32.onnx"
    onnx.save(fp32, str(fp32_path))
    write_dynamic_model(fp32_path, tmp_path / "dyn.onnx")
    dyn = onnx.load(str(tmp_path / "dyn.onnx"))
    assert any(n.op_type == "Gather" and n.input[0] != "table" for n in dyn.graph.node)  # Gather reads INT8
    why = mismatch(fp32, dyn)
    assert why is not None and "already integer" in why
