"""The shared ONNX graph utilities: loading under one error policy, the producer/consumer index, node
copies and renames, topological order."""

from __future__ import annotations

import doctest

import onnx
import pytest
from onnx import TensorProto, helper

import quantlab.onnxgraph
from quantlab.errors import QuantlabError
from quantlab.onnxgraph import (
    GraphIndex, check_topological, consumers, copy_node, graph_inputs, load_model, node_key, producers, rename_tensor,
    stable_toposort,
)

from conftest import conv_net, save_model


def _diamond() -> onnx.GraphProto:
    """x -> Relu(a) -> r; Add(r, r) -> s; Mul(r, s) -> y."""
    return helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="a"),
            helper.make_node("Add", ["r", "r"], ["s"], name="b"),
            helper.make_node("Mul", ["r", "s"], ["y"]),
        ],
        "diamond",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )


def test_docstring_example():
    assert doctest.testmod(quantlab.onnxgraph).failed == 0


def test_load_model_one_error_policy(tmp_path):
    model = helper.make_model(_diamond())
    assert load_model(model) is model
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert load_model(path) == model and load_model(str(path)) == model
    with pytest.raises(QuantlabError, match="INT8 model '.*missing.onnx' does not exist: pass the path of an .onnx file"):
        load_model(tmp_path / "missing.onnx", "INT8")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 4)
    with pytest.raises(QuantlabError, match=r"'.*junk.onnx' is not an ONNX model \(\w+\): pass an .onnx file"):
        load_model(junk)
    with pytest.raises(QuantlabError, match="ONNX model must be an onnx.ModelProto or a path"):
        load_model(42)  # type: ignore[arg-type]


def test_index_of_producers_and_consumers():
    graph = _diamond()
    nodes = list(graph.node)
    assert producers(nodes) == {"r": (0, 0), "s": (1, 0), "y": (2, 0)}
    assert consumers(nodes) == {"x": [0], "r": [1, 2], "s": [2]}
    assert consumers(nodes, each_read=True) == {"x": [0], "r": [1, 1, 2], "s": [2]}
    index = GraphIndex(graph)
    assert index.producer["s"].name == "b" and "x" not in index.producer
    assert [n.op_type for n in index.consumers["r"]] == ["Add", "Mul"]
    assert [n.op_type for n in GraphIndex(graph, each_read=True).consumers["r"]] == ["Add", "Add", "Mul"]
    assert index.outputs == {"y"}
    assert [node_key(n) for n in graph.node] == ["a", "b", "y"]


def test_graph_inputs_leave_out_initializers(tmp_path):
    model = onnx.load(str(save_model(conv_net(), tmp_path / "tiny.onnx")))
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 3, 3, 3]))
    assert graph_inputs(model) == ["input"]


def test_copy_and_rename():
    graph = _diamond()
    copy = copy_node(graph.node[1], lambda t: t + "'", "b2")
    assert (list(copy.input), list(copy.output), copy.name) == (["r'", "r'"], ["s'"], "b2")
    assert list(graph.node[1].input) == ["r", "r"]  # the original is untouched
    rename_tensor(graph.node, graph, "y", "out")
    assert graph.node[2].output[0] == "out" and graph.output[0].name == "out"
    check_topological(graph)


def test_stable_toposort_keeps_a_valid_order_and_repairs_an_invalid_one():
    graph = _diamond()
    nodes = list(graph.node)
    assert stable_toposort(nodes, {"x"}) == nodes
    shuffled = [nodes[2], nodes[0], nodes[1]]
    assert stable_toposort(shuffled, {"x"}) == nodes
    del graph.node[:]
    graph.node.extend(shuffled)
    with pytest.raises(ValueError, match="reads .* before they are defined"):
        check_topological(graph)
    loop = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    with pytest.raises(QuantlabError, match="cycle"):
        stable_toposort(loop, set())
