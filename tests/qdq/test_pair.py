"""QdqPair: the quantized layers of an INT8 Q/DQ model, their Q/DQ chains and FP32 counterparts."""

from __future__ import annotations

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
