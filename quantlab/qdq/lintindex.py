"""What the TensorRT Q/DQ lint and the fusion advice share: the issue they report and their index of
one graph (constants, including ``Constant`` node outputs; node labels; element types told without
shape inference), built on :class:`quantlab.onnxgraph.GraphIndex`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.onnxgraph import GraphIndex

ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LintIssue:
    """One broken rule (or piece of advice): its id (a key of :data:`quantlab.qdq.lint.RULES` or
    :data:`quantlab.qdq.fusion.ADVICE`), where, and what to change."""

    rule: str
    node: str
    tensor: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


def int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto, or None for sparse/string values."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None


class LintIndex(GraphIndex):
    """Lint's look-ups over one graph: constants, labels and element types, on the shared producer and
    consumer index (each read listed, as the rules report each one)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        super().__init__(graph, each_read=True)
        self.labels: dict[int, str] = {}
        self.tensors: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.declared: dict[str, int] = {}
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                self.declared.setdefault(value.name, value.type.tensor_type.elem_type)
        for index, node in enumerate(graph.node):
            self.labels[id(node)] = node.name or f"{node.op_type}[{index}]"
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS and node.output:
                tensor = constant_node_tensor(node)
                if tensor is not None:
                    self.tensors.setdefault(node.output[0], tensor)
        self._arrays: dict[str, np.ndarray] = {}

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[id(node)]

    def is_constant(self, name: str) -> bool:
        return name in self.tensors

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.tensors:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.tensors[name])
        return self._arrays[name]

    def dims(self, name: str) -> tuple[int, ...] | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tuple(tensor.dims)

    def elem_type(self, name: str) -> int | None:
        """The element type of ``name`` when it can be told without shape inference."""
        if name in self.tensors:
            return self.tensors[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "QuantizeLinear" and node.domain in ONNX_DOMAINS:
            return q_output_type(self, node)
        return self.declared.get(name)


def node_input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def q_output_type(index: LintIndex, node: onnx.NodeProto) -> int | None:
    """A Q outputs its zero-point's type, else ``output_dtype`` (opset 21), else UINT8."""
    zero_point = node_input(node, 2)
    if zero_point:
        return index.elem_type(zero_point)
    return int_attribute(node, "output_dtype", 0) or onnx.TensorProto.UINT8
