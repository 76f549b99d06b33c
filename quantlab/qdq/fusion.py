"""Fusion advice: Q/DQ placements TensorRT runs, but slower or less accurately than it could.

A model that passes :func:`quantlab.qdq.lint.lint_tensorrt` builds, but TensorRT only fuses Q/DQ
where its patterns find them (TensorRT developer guide, "Q/DQ layer placement recommendations"):
it quantizes the inputs of weighted layers, fuses a residual ``Add`` into the convolution whose
output it reads (Conv+Add: only the *other* input is INT8), fuses bias and pointwise epilogues into
the weighted layer, and moves Q/DQ across pooling and Concat.  A Q/DQ pair elsewhere is kept as an
explicit reformat: the engine runs a quantize/dequantize kernel and the values lose precision for no
fusion in return.  :func:`fusion_advice` reports those places, each with a rule id:

* ``residual-both-inputs``: both inputs of a residual ``Add`` are quantized, one of them a
  convolution's output; quantize only the other (skip) input, so the Add fuses into the convolution;
* ``constant-add``: an ``Add``/``Sub``/``Mul``/``Div`` with a constant operand (a bias, GELU's +1,
  a scale) reads a quantized input, or its constant is itself quantized; TensorRT fuses such ops
  into the preceding layer in float;
* ``weighted-output``: the output of a Conv/ConvTranspose/Gemm/MatMul is quantized although no
  layer that runs in INT8 reads it (it feeds an activation, a bias, a graph output...);
* ``lone-qdq``: any other Q/DQ pair whose dequantized value no INT8 layer reads: a reformat.

This is advice, not a rule: the model is valid; ``quantlab lint`` prints it and exits 0 unless a rule
of :mod:`quantlab.qdq.lint` is broken.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import onnx

from quantlab.qdq.lintindex import LintIndex, LintIssue

ADVICE: Mapping[str, str] = MappingProxyType({
    "residual-both-inputs": "a residual Add quantizes only its skip input, so it fuses into the convolution",
    "constant-add": "no Q/DQ on an Add/Sub/Mul/Div with a constant operand (bias, scale), nor on that constant",
    "weighted-output": "no Q/DQ on a weighted layer's output unless an INT8 layer reads it",
    "lone-qdq": "every Q/DQ pair feeds a layer TensorRT runs in INT8",
})

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CONVOLUTIONS = ("Conv", "ConvTranspose")
#: layers that read INT8 in a TensorRT engine: weighted layers, and those Q/DQ move across
_INT8_READERS = (*_WEIGHTED, "MaxPool", "AveragePool", "GlobalAveragePool", "Concat")
_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def fusion_advice(model: onnx.ModelProto) -> tuple[LintIssue, ...]:
    """Q/DQ placements of ``model`` that TensorRT will not fuse (see the module docstring), graph order.

    Each is a :class:`~quantlab.qdq.lintindex.LintIssue` whose ``rule`` is a key of :data:`ADVICE`.
    """
    graph = model.graph
    index = LintIndex(graph)
    producer, consumers, outputs = index.producer, index.consumers, index.outputs
    constants = index.tensors  # initializers and Constant outputs

    def dequantized(name: str) -> str | None:
        """The float tensor behind ``name`` when ``name`` is the output of an activation's Q -> DQ."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in constants:
            return None
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        return q.input[0]

    def constant(name: str) -> bool:
        dq = producer.get(name)
        return name in constants or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in constants)

    def int8_reader(node: onnx.NodeProto, reads: list[str]) -> bool:
        """Whether TensorRT runs ``node`` on the INT8 tensor it reads through one of ``reads``."""
        if node.op_type != "Add":
            return node.op_type in _INT8_READERS
        others = [i for i in node.input if i not in reads]  # a residual Add's skip input: the other side a Conv
        return any(i in producer and producer[i].op_type in _CONVOLUTIONS for i in others)

    advice: list[LintIssue] = []
    flagged: set[str] = set()  # Q/DQ'd tensors already reported
    for node in graph.node:
        if node.op_type in _ARITHMETIC and any(constant(i) for i in node.input):
            quantized = [dequantized(i) for i in node.input]
            q_constant = [i for i in node.input if i not in constants and constant(i)]
            if any(quantized) or q_constant:
                what = next(filter(None, quantized), None) or q_constant[0]
                advice.append(LintIssue(
                    "constant-add", index.label(node), what,
                    f"{node.op_type} '{index.label(node)}' has a constant operand and a quantized input or constant "
                    f"('{what}'): TensorRT fuses it into the layer before it in float; remove that Q/DQ",
                ))
                flagged.update(t for t in quantized if t)
        elif node.op_type == "Add" and len(node.input) == 2:
            sources = [dequantized(i) for i in node.input]
            if all(sources):
                conv = [s for s in sources if s in producer and producer[s].op_type in _CONVOLUTIONS]
                if conv:
                    advice.append(LintIssue(
                        "residual-both-inputs", index.label(node), conv[0],
                        f"both inputs of the residual Add '{index.label(node)}' are quantized; leave the output of "
                        f"{producer[conv[0]].op_type} '{index.label(producer[conv[0]])}' ('{conv[0]}') in float so the Add "
                        "fuses into it, and quantize only the other input",
                    ))
                    flagged.add(conv[0])
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in constants or q.input[0] in flagged:
            continue
        readers = [r for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"
                   for r in consumers.get(dq.output[0], [])]
        dq_outputs = [dq.output[0] for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"]
        if any(int8_reader(r, dq_outputs) for r in readers):
            continue
        tensor = q.input[0]
        where = ", ".join(sorted({r.op_type for r in readers} | ({"graph output"} if set(dq_outputs) & outputs else set())))
        source = producer.get(tensor)
        if source is not None and source.op_type in _WEIGHTED:
            advice.append(LintIssue(
                "weighted-output", index.label(source), tensor,
                f"the output '{tensor}' of {source.op_type} '{index.label(source)}' is quantized but read only by "
                f"{where or 'nothing'}: TensorRT fuses that epilogue in float; remove its Q/DQ",
            ))
        else:
            advice.append(LintIssue(
                "lone-qdq", index.label(q), tensor,
                f"'{tensor}' is quantized but read only by {where or 'nothing'}, which TensorRT runs in float: "
                "the Q/DQ pair becomes a reformat; remove it",
            ))
    return tuple(advice)
