"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.2, its empirical variant).

Rounding a layer's weights to INT8 changes them by ``dW = Q(W) - W``; its output moves by
``dW x``.  That error does not average out when the inputs do not: after a ReLU every input is
non-negative, so ``E[dW x] = dW E[x]`` is a systematic shift of each output channel, and it adds up
through the network.  Bias correction measures the shift on the calibration data and subtracts it
from the bias::

    b' = b - E[dW x]          (per output channel, expectation over samples and positions)

``Q`` is the targets' weight quantization (symmetric INT8 per output channel, ``s = max|W|/127``),
so the weights quantize to what they quantized to before and the INT8 layer's mean output is the
FP32 layer's.  ``E[dW x]`` is exact, padding included: the layer is run once more inside the graph
with ``dW`` as its weight and no bias, and its output averaged over everything but the channel axis
(one ONNX Runtime pass over the calibration data for all layers).  ``x`` is the FP32 input.

Where the bias is: a ``Conv``, ``ConvTranspose`` or ``Gemm`` bias input (added when the layer has
none); for a ``MatMul``, the constant of the ``Add`` that is the only reader of its output.  A
MatMul without one is left as it is and the run says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from quantlab.config import TransformConfig
from quantlab.transforms.graph import Feed, Graph, Layer, attr, fake_quantize_weight, run_batches
from quantlab.transforms.result import TransformResult, rounded


def _bias_target(g: Graph, layer: Layer) -> tuple[str, str | None, float] | None:
    """Where the correction goes: ``(kind, initializer or None to add one, factor)``.

    The output moves by ``factor * c`` when the initializer moves by ``c`` (Gemm's ``beta``).
    """
    op = layer.node.op_type
    if op in ("Conv", "ConvTranspose"):
        return ("bias", layer.bias, 1.0)
    if op == "Gemm":
        beta = float(attr(layer.node, "beta", 1.0))
        if layer.bias is None:
            return ("bias", None, 1.0) if len(layer.node.input) < 3 or not layer.node.input[2] else None
        return ("bias", layer.bias, beta) if beta != 0.0 else None
    add = g.sole_reader(layer.node.output[0])
    if add is None or add.op_type != "Add":
        return None
    other = [i for i in add.input if i != layer.node.output[0]]
    if len(other) != 1 or other[0] not in g.inits or g.readers_of(other[0]) != 1:
        return None
    n = g.inits[layer.weight].dims[layer.out_axis]
    dims = list(g.inits[other[0]].dims)
    if int(np.prod(dims)) != n or (dims and dims[-1] != n):
        return None
    return ("add", other[0], 1.0)


def _delta_nodes(g: Graph, layer: Layer, delta: str, out: str) -> list[onnx.NodeProto]:
    """The layer again with weight ``delta`` and no bias, then its mean per output channel -> ``out``."""
    node = layer.node
    copy = helper.make_node(node.op_type, [node.input[0], delta], [f"{out}_full"], name=f"{out}_layer")
    copy.attribute.extend(a for a in node.attribute if a.name != "beta")
    if node.op_type in ("Conv", "ConvTranspose"):
        rank = len(g.inits[layer.weight].dims)
        axes = [0, *range(2, rank)]
        source = f"{out}_full"
    else:
        shape = g.add_initializer(f"{out}_rows", np.array([-1, g.inits[layer.weight].dims[layer.out_axis]], np.int64))
        reshape = helper.make_node("Reshape", [f"{out}_full", shape], [f"{out}_2d"], name=f"{out}_reshape")
        axes, source = [0], f"{out}_2d"
    if g.opset >= 18:
        name = g.add_initializer(f"{out}_axes", np.array(axes, np.int64))
        mean = helper.make_node("ReduceMean", [source, name], [out], name=f"{out}_mean", keepdims=0)
    else:
        mean = helper.make_node("ReduceMean", [source], [out], name=f"{out}_mean", axes=axes, keepdims=0)
    return [copy, mean] if node.op_type in ("Conv", "ConvTranspose") else [copy, reshape, mean]


def output_shifts(model: onnx.ModelProto, layers: list[Layer], data: Sequence[Feed]) -> dict[str, np.ndarray]:
    """``E[dW x]`` per output channel of each layer, over all calibration samples."""
    g = Graph(model)
    names = {}
    for layer in layers:
        w = g.array(layer.weight)
        delta = g.add_initializer(f"{layer.weight}_quant_delta", fake_quantize_weight(w, layer.out_axis) - w)
        out = g.unique(f"{layer.name}_quant_shift")
        g.model.graph.node.extend(_delta_nodes(g, layer, delta, out))
        names[layer.name] = out
    total: dict[str, np.ndarray] = {}
    count = 0
    for feed, values in zip(data, run_batches(g.model, data, list(names.values()))):
        n = next(iter(feed.values())).shape[0]
        for key, v in zip(names, values):
            total[key] = total.get(key, 0.0) + np.asarray(v, np.float64) * n
        count += n
    return {key: (v / max(count, 1)) for key, v in total.items()}


def bias_correction(model: onnx.ModelProto, data: Sequence[Feed], config: TransformConfig,
                    keep: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, TransformResult]:
    """Correct the bias of every quantized layer for its weights' INT8 rounding (see the module docstring).

    Layers in ``keep`` stay in float: they have no rounding to correct.
    """
    g = Graph(model)
    layers, targets, no_bias, exact = [], {}, [], 0
    for layer in g.layers():
        if layer.name in keep or not g.owns(layer):
            continue
        target = _bias_target(g, layer)
        if target is None:
            no_bias.append(layer.name)
            continue
        w = g.array(layer.weight)
        if np.array_equal(fake_quantize_weight(w, layer.out_axis), w):
            exact += 1  # already INT8-representable (AdaRound): nothing moves
            continue
        layers.append(layer)
        targets[layer.name] = target
    if not layers:
        why = [f"{len(no_bias)} MatMul(s) without a bias Add"] if no_bias else []
        why += [f"{exact} layer(s) whose weights are already INT8 levels"] if exact else []
        return model, TransformResult("bias-correction", False, "no layer with a bias to correct"
                                      + (f" ({'; '.join(why)})" if why else ""))
    shifts = output_shifts(model, layers, data)
    records = []
    added = 0
    for layer in layers:
        shift = shifts[layer.name].astype(np.float32)
        kind, name, factor = targets[layer.name]
        if name is None:  # a Conv/Gemm without bias gets one
            name = g.add_initializer(f"{layer.weight}_bias", (-shift / factor).astype(np.float32))
            while len(layer.node.input) < 3:
                layer.node.input.append("")
            layer.node.input[2] = name
            added += 1
        else:
            old = g.array(name)
            g.set_array(name, (old.reshape(-1) - shift / factor).reshape(old.shape))
        records.append({"layer": layer.name, "bias": kind, "shift_abs_max": rounded(np.abs(shift).max(), 8),
                        "shift_abs_mean": rounded(np.abs(shift).mean(), 8)})
    g.refresh()
    detail = f"corrected the bias of {len(records)} layer(s)"
    if added:
        detail += f" ({added} given a bias they lacked)"
    if no_bias:
        detail += f"; {len(no_bias)} MatMul(s) without a bias Add left as they are"
    if exact:
        detail += f"; {exact} layer(s) already on INT8 levels (nothing to correct)"
    return g.model, TransformResult("bias-correction", True, detail, records)
