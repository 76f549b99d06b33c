"""Placement: which nodes of a model get Q/DQ, per target, decided from the graph.

ONNX Runtime's Q/DQ rewriter (``quantize_static``) quantizes every node of the op types it is given;
a deployable INT8 model needs finer rules, node by node, because what an engine fuses decides what
must be quantized and every extra Q/DQ pair costs accuracy for nothing.  :func:`plan_placement`
returns the nodes to quantize (ONNX Runtime's ``nodes_to_quantize``) and, for ``tensorrt``, the
inputs of residual ``Add`` nodes that stay in float once ONNX Runtime has written the model.

``tensorrt`` (TensorRT developer guide, "Q/DQ layer placement recommendations"):

* **weighted layers** (Conv, ConvTranspose, Gemm, MatMul) get Q/DQ on their inputs: activations
  per tensor, weights per output channel; never on their outputs (TensorRT fuses the epilogue:
  bias, activation, residual add, and requantizes at the next quantized input);
* **residual Add**: when one input of an ``Add`` is the output of a Conv/ConvTranspose, TensorRT
  fuses the Add into that convolution and needs only the *other* (skip) input in INT8: that input
  is quantized, the convolution's output stays float.  An ``Add`` with no convolution behind it
  (a transformer's residual stream, a MatMul's bias) and an ``Add`` with a constant are left alone;
* **pooling and Concat** are quantized only where their output is read only by quantized inputs,
  so INT8 flows through them (TensorRT moves Q/DQ across these commuting layers); elsewhere a Q/DQ
  before them would only add a reformat;
* everything else (LayerNormalization, Softmax, GELU's Erf, Mul/Div, Sigmoid/HardSwish, Resize,
  Reshape/Transpose) stays in float: TensorRT fuses pointwise layers into the weighted layers'
  epilogues, and on transformers the residual stream, LayerNorm, Softmax input and GELU are what
  per-tensor INT8 hurts most.  The attention MatMuls (Q·Kᵀ and P·V) are weighted layers with two
  activation inputs and are quantized.

``ort-cpu`` (ONNX Runtime's CPU kernels): convolutions, Gemm and MatMul are always quantized, the
other ops of ONNX Runtime's Q/DQ registry only where INT8 reaches them: a node is quantized when
every float input it reads from another node comes from a quantized node (so U8 flows on without a
DequantizeLinear/QuantizeLinear round trip), and never when it reads a constant (a bias ``Add``, a
scaling ``Mul``) or is one of the numerically sensitive ops ONNX Runtime runs in float anyway
(normalizations, Softmax, embedding Gathers, Where).  On a CNN this quantizes what ONNX Runtime's
default op set does; on a transformer it quantizes the MatMuls, the op set ONNX Runtime recommends
for transformer models.  MatMul and Gemm outputs are not quantized (ONNX Runtime fuses a float
output into ``MatMulIntegerToFloat``/``QGemm``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from quantlab.onnxgraph import GraphIndex

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONVOLUTIONS = ("Conv", "ConvTranspose")
#: quantized for ``tensorrt`` only where INT8 flows through them
TRT_FLOW = ("MaxPool", "AveragePool", "GlobalAveragePool", "Concat")
#: never quantized for ``ort-cpu``: sensitive to INT8 and run in float by ONNX Runtime's CPU kernels
ORT_FLOAT = (
    "LayerNormalization", "InstanceNormalization", "BatchNormalization", "Softmax", "Gather", "GatherElements",
    "Where", "Attention",
)
#: ops whose constant input marks a bias or a scale, not data: never quantized for ``ort-cpu``
_ARITHMETIC = ("Add", "Mul", "Sub", "Div")


@dataclass(frozen=True)
class Placement:
    """Where a target's Q/DQ go in one model.

    Attributes:
        nodes: names of the nodes ONNX Runtime quantizes (``nodes_to_quantize``), graph order.
        op_types: their op types (``op_types_to_quantize``).
        float_inputs: ``(node, input index)`` of residual ``Add`` inputs left in float after
            ONNX Runtime quantized the node (``tensorrt``: the convolution's side).
        exclude_output: op types whose outputs ONNX Runtime must not quantize.
    """

    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    float_inputs: tuple[tuple[str, int], ...] = ()
    exclude_output: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.nodes)


class _Graph(GraphIndex):
    """Constants and declared element types of one graph, on the shared producer/consumer index."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        super().__init__(graph)
        self.constants = {i.name for i in graph.initializer}
        self.constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*graph.value_info, *graph.input, *graph.output)
            if v.type.HasField("tensor_type")
        }
        self.types = types

    def is_float(self, name: str) -> bool:
        return self.types.get(name, onnx.TensorProto.FLOAT) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

    def activations(self, node: onnx.NodeProto) -> list[str]:
        """The float, non-constant inputs of ``node``."""
        return [i for i in node.input if i and i not in self.constants and self.is_float(i)]


def _weighted(g: _Graph, node: onnx.NodeProto) -> bool:
    """A weighted layer that reads an activation (a MatMul of two constants does not)."""
    return node.op_type in WEIGHTED and bool(g.activations(node))


def plan_placement(model: onnx.ModelProto, target: str, exclude: Iterable[str] = ()) -> Placement:
    """The nodes ``target`` quantizes in ``model`` (see the module docstring); ``exclude`` stays float."""
    if target == "tensorrt":
        return _tensorrt(_Graph(model), set(exclude))
    if target == "ort-cpu":
        return _ort_cpu(_Graph(model), set(exclude))
    raise ValueError(f"no placement rules for target {target!r}")


def _residual_side(g: _Graph, node: onnx.NodeProto, quantized: dict[str, onnx.NodeProto]) -> int | None:
    """For a residual ``Add``, the index of the input TensorRT fuses (a quantized convolution's output)."""
    if node.op_type != "Add" or len(node.input) != 2 or len(g.activations(node)) != 2:
        return None
    convs = [
        i for i, name in enumerate(node.input)
        if name in g.producer and g.producer[name].op_type in CONVOLUTIONS and g.producer[name].name in quantized
        and len(g.consumers.get(name, [])) == 1
    ]
    if not convs:
        return None
    if len(convs) == 1:
        return convs[0]
    order = {id(n): k for k, n in enumerate(g.nodes)}
    # both sides are convolutions: TensorRT fuses the Add into the one computed last
    return max(convs, key=lambda i: order[id(g.producer[node.input[i]])])


def _tensorrt(g: _Graph, exclude: set[str]) -> Placement:
    quantized: dict[str, onnx.NodeProto] = {}
    float_inputs: list[tuple[str, int]] = []
    for node in g.nodes:
        if node.name in exclude or not node.name:
            continue
        if node.op_type in WEIGHTED and _weighted(g, node):
            quantized[node.name] = node
        elif node.op_type == "Add":
            side = _residual_side(g, node, quantized)
            if side is not None:
                quantized[node.name] = node
                float_inputs.append((node.name, side))

    def read_quantized(tensor: str) -> bool:
        users = g.consumers.get(tensor, [])
        return bool(users) and tensor not in g.outputs and all(u.name in quantized for u in users) and all(
            (u.name, i) not in float_inputs for u in users for i, x in enumerate(u.input) if x == tensor
        )

    # pooling and Concat, last to first, so that chains (pool -> Concat -> Conv) resolve
    for node in reversed(g.nodes):
        if node.op_type in TRT_FLOW and node.name and node.name not in exclude and g.activations(node):
            if all(read_quantized(o) for o in node.output if o):
                quantized[node.name] = node
    names = tuple(n.name for n in g.nodes if n.name in quantized)
    ops = tuple(sorted({quantized[n].op_type for n in names}))
    return Placement(names, ops, tuple(float_inputs), tuple(sorted({*WEIGHTED, "Add", *TRT_FLOW})))


def _ort_registry() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return (set(QLinearOpsRegistry) | set(QDQRegistry)) - {"QuantizeLinear", "DequantizeLinear"}


def _ort_cpu(g: _Graph, exclude: set[str]) -> Placement:
    registry = _ort_registry()
    quantized: dict[str, onnx.NodeProto] = {}
    int8: set[str] = set()  # tensors that leave a quantized node in INT8
    for node in g.nodes:
        if node.name in exclude or not node.name or node.op_type not in registry:
            continue
        if node.op_type in WEIGHTED:
            ok = _weighted(g, node)
        elif node.op_type in ORT_FLOAT:
            ok = False
        else:
            inputs = g.activations(node)
            constant = node.op_type in _ARITHMETIC and any(i in g.constants for i in node.input)
            ok = bool(inputs) and not constant and all(i in int8 for i in inputs)
        if ok:
            quantized[node.name] = node
            if node.op_type not in ("MatMul", "Gemm"):
                int8.update(o for o in node.output if o and g.is_float(o))
    names = tuple(n.name for n in g.nodes if n.name in quantized)
    ops = tuple(sorted({quantized[n].op_type for n in names}))
    return Placement(names, ops, (), ("Gemm", "MatMul"))


def release_float_inputs(model: onnx.ModelProto, placement: Placement) -> None:
    """Give float inputs back to the nodes ``placement`` leaves in float; drop the Q/DQ left unread.

    ONNX Runtime rewires *every* reader of a tensor it quantizes to the DequantizeLinear output, so a
    LayerNorm output quantized for the MatMuls that read it reaches the residual ``Add`` beside them
    through Q/DQ as well; and it quantizes every input of a node it quantizes, where TensorRT's
    Conv+Add fusion wants the convolution's side of a residual ``Add`` in float.  Each such input
    (``placement.float_inputs``, and any input of a node outside ``placement.nodes`` that reads an
    activation's DequantizeLinear) is rewired to the tensor the QuantizeLinear reads; Q, DQ and their
    scale and zero-point initializers that nothing reads any more are removed.  Edits ``model`` in place.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    quantized = set(placement.nodes)
    wanted = set(placement.float_inputs)
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            if node.name in quantized and (node.name, index) not in wanted:
                continue
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    dropped: set[str] = set()
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [
            n for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            dropped.update(n.input[1:])
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in dropped and i.name not in read]:
        graph.initializer.remove(init)
