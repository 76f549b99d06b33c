"""keep_float: chosen layers of an INT8 Q/DQ model back in float, on the tiny conv model (both targets)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantlab.collect import ort_session
from quantlab.errors import QuantlabError
from quantlab.qdq.keep import keep_float
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
