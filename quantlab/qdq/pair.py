"""An INT8 Q/DQ model, the FP32 model it was quantized from, and how their nodes correspond.

A *quantized layer* is a node of the INT8 model, other than ``QuantizeLinear`` and
``DequantizeLinear``, that reads at least one ``DequantizeLinear`` output.  Each such input is traced
back through its Q/DQ *chain* (``DQ``, ``DQ <- Q``, or longer) to its *root*: a float activation or an
initializer (a quantized weight or bias).  INT8 nodes are matched to FP32 nodes by name and op type,
then by first output name; tensors correspond by node and position, never by name alone (ONNX
Runtime's quantizer renames some: see :mod:`quantlab.compare.layers`).

Both the per-layer analysis (:mod:`quantlab.compare.layers`) and partial quantization
(:func:`quantlab.qdq.keep.keep_float`) read models through :class:`QdqPair`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import onnx

from quantlab.errors import check
from quantlab.onnxgraph import graph_inputs, node_key, producers

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QdqChain:
    """The Q/DQ nodes in front of one layer input, root first."""

    nodes: list[onnx.NodeProto]
    root: str  # INT8 tensor name: an initializer (weight) or a float activation
    weight: bool


@dataclass
class QuantizedLayer:
    index: int  # position among the INT8 graph's nodes
    node: onnx.NodeProto  # INT8
    fp32: onnx.NodeProto
    fp32_index: int
    chains: dict[int, QdqChain]  # input position -> chain

    @property
    def name(self) -> str:
        return node_key(self.node)


class QdqPair:
    """An INT8 Q/DQ model, the FP32 model it was made from, and their node correspondence."""

    def __init__(self, int8: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
        self.q, self.f = int8, fp32
        self.q_inits = {i.name: i for i in int8.graph.initializer}
        self.f_inits = {i.name: i for i in fp32.graph.initializer}
        self.q_prod, self.f_prod = producers(int8.graph.node), producers(fp32.graph.node)
        self.inputs = graph_inputs(fp32)
        self.f_types = {  # element types the FP32 graph declares (shape inference fills value_info)
            v.name: v.type.tensor_type.elem_type
            for v in (*fp32.graph.value_info, *fp32.graph.input, *fp32.graph.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
        }
        q_inputs = graph_inputs(int8)
        check(
            sorted(q_inputs) == sorted(self.inputs),
            f"the INT8 model's inputs {q_inputs} differ from the FP32 model's {self.inputs}: pass the FP32 model it was quantized from",
        )
        f_nodes = list(fp32.graph.node)
        by_name: dict[str, list[int]] = {}
        for i, n in enumerate(f_nodes):
            if n.name:
                by_name.setdefault(n.name, []).append(i)
        self.match: dict[int, int] = {}  # INT8 node index -> FP32 node index
        for i, n in enumerate(int8.graph.node):
            if n.op_type in QDQ_OPS:
                continue
            j = None
            same = by_name.get(n.name, []) if n.name else []
            if len(same) == 1 and f_nodes[same[0]].op_type == n.op_type:
                j = same[0]
            elif n.output and n.output[0] in self.f_prod:
                k = self.f_prod[n.output[0]][0]
                if f_nodes[k].op_type == n.op_type:
                    j = k
            if j is not None:
                self.match[i] = j
        self.fp32_of: dict[str, str] = {n: n for n in self.inputs}  # INT8 tensor -> FP32 tensor
        self.int8_of: dict[str, str] = {n: n for n in self.inputs}  # FP32 tensor -> INT8 tensor
        for i, j in self.match.items():
            for a, b in zip(int8.graph.node[i].output, f_nodes[j].output):
                if a and b:
                    self.fp32_of[a], self.int8_of[b] = b, a
        self.layers: list[QuantizedLayer] = []
        for i, n in enumerate(int8.graph.node):
            if n.op_type in QDQ_OPS:
                continue
            chained = {k: x for k, x in enumerate(n.input) if x in self.q_prod and self._op(x) == "DequantizeLinear"}
            if not chained:
                continue
            check(
                i in self.match,
                f"INT8 node '{node_key(n)}' ({n.op_type}) has no counterpart in the FP32 model: pass the FP32 model it was quantized from",
            )
            j = self.match[i]
            check(
                all(k < len(f_nodes[j].input) for k in chained),
                f"INT8 node '{node_key(n)}' has inputs its FP32 counterpart lacks: pass the FP32 model it was quantized from",
            )
            self.layers.append(QuantizedLayer(i, n, f_nodes[j], j, {k: self._chain(x) for k, x in chained.items()}))

    def _op(self, tensor: str) -> str:
        return self.q.graph.node[self.q_prod[tensor][0]].op_type

    def _chain(self, tensor: str) -> QdqChain:
        nodes = []
        while tensor in self.q_prod and self._op(tensor) in QDQ_OPS:
            node = self.q.graph.node[self.q_prod[tensor][0]]
            nodes.append(node)
            tensor = node.input[0]
        if tensor in self.q_inits:
            return QdqChain(nodes[::-1], tensor, True)
        check(
            tensor in self.fp32_of,
            f"Q/DQ input '{tensor}' of the INT8 model has no FP32 counterpart: pass the FP32 model it was quantized from",
        )
        check(
            nodes[-1].op_type == "QuantizeLinear",
            f"INT8 tensor '{tensor}' is already integer where the FP32 model has a float activation (an op run on "
            "quantized data, as ONNX Runtime's dynamic quantizer writes a Gather on an INT8 table): the model is not a "
            "Q/DQ copy of the FP32 graph",
        )
        return QdqChain(nodes[::-1], tensor, False)

    def find(self, names: Iterable[Any] | None) -> list[QuantizedLayer]:
        """The layers named (node names, or rows with a ``node`` attribute), in graph order."""
        if names is None:
            return list(self.layers)
        wanted = [getattr(n, "node", n) for n in names]
        known = {layer.name: layer for layer in self.layers}
        unknown = [n for n in wanted if n not in known]
        check(
            not unknown,
            f"{unknown[:3]} {'is not a quantized layer' if len(unknown) == 1 else 'are not quantized layers'} of the INT8 model: "
            "pass node names that layer_errors() lists",
        )
        chosen = set(wanted)
        return [layer for layer in self.layers if layer.name in chosen]

    def quantized_inputs(self, layer: QuantizedLayer) -> tuple[tuple[str, ...], tuple[str, ...]]:
        acts = tuple(c.root for c in layer.chains.values() if not c.weight)
        weights = tuple(layer.fp32.input[k] for k, c in layer.chains.items() if c.weight)
        return acts, weights

    def opsets(self) -> list[onnx.OperatorSetIdProto]:
        return list(self.q.opset_import)
