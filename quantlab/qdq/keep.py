"""Partial quantization: an INT8 Q/DQ model with chosen layers computing in float again.

The chained inputs of each kept layer (see :mod:`quantlab.qdq.pair`) are rewired to the float value
of the FP32 node's input: the float tensor before the Q/DQ pair, with any activation ONNX Runtime
removed (``Relu``, ``Clip`` folded into a Conv) put back, or the FP32 initializer of a weight.  A kept
layer's output that was quantized only to become a graph output is left unquantized.  Q/DQ nodes and
initializers nobody reads any more are removed, and the nodes are put back in topological order,
keeping the INT8 model's order wherever it is valid.  Keeping every layer gives the FP32 model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantlab.errors import check
from quantlab.onnxgraph import (
    ModelLike, check_topological, clone, copy_node, load_model, node_key, rename_tensor, renamed_initializer,
    stable_toposort,
)
from quantlab.qdq.pair import QDQ_OPS, QdqPair, QuantizedLayer


def keep_float(int8_model: ModelLike, fp32_model: ModelLike, nodes: Iterable[Any]) -> onnx.ModelProto:
    """A copy of ``int8_model`` in which the named quantized layers compute in float.

    ``nodes`` are layer names (as :class:`~quantlab.qdq.pair.QdqPair` and
    :func:`quantlab.compare.layers.layer_errors` list them), or rows with a ``node`` attribute.  See
    the module docstring for what changes; the result passes ``onnx.checker`` and loads in ONNX Runtime.
    """
    pair = QdqPair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    return _keep_float(pair, pair.find(list(nodes)))


def _keep_float(pair: QdqPair, chosen: list[QuantizedLayer]) -> onnx.ModelProto:
    """:func:`keep_float` of the ``chosen`` layers of ``pair``."""
    model = onnx.ModelProto()
    model.CopyFrom(pair.q)
    graph = model.graph
    node_list = [copy_node(n, lambda x: x) for n in graph.node]
    f_nodes = pair.f.graph.node
    used = {x for n in node_list for x in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    used |= {i.name for i in graph.input} | {o.name for o in graph.output}
    aliases: dict[str, str] = {}  # fresh name -> the FP32 name it stands for

    def fresh(name: str) -> str:
        new = name
        while new in used:
            new += "::float"
        used.add(new)
        if new != name:
            aliases[new] = name
        return new

    resolved: dict[str, str] = {}  # FP32 tensor -> tensor of the new graph with its float value
    inserted: dict[int, list[onnx.NodeProto]] = {}  # INT8 node index -> restored nodes to put before it
    new_inits: list[onnx.TensorProto] = []

    def resolve(name: str, before: int) -> str:
        if name in resolved:
            return resolved[name]
        if name in pair.inputs:
            out = name
        elif name in pair.f_inits:
            if name in pair.q_inits and pair.q_inits[name] == pair.f_inits[name]:
                out = name
            else:
                out = fresh(name)
                new_inits.append(renamed_initializer(pair.f_inits[name], out))
        elif name in pair.int8_of and pair.int8_of[name] in pair.q_prod:
            out = pair.int8_of[name]
        else:
            check(name in pair.f_prod, f"FP32 tensor '{name}' has no producer: pass the FP32 model the INT8 model was quantized from")
            source = f_nodes[pair.f_prod[name][0]]  # a node the quantizer removed (Relu, Clip): put it back
            names = {x: resolve(x, before) for x in source.input if x}
            outs = {o: fresh(o) for o in source.output if o}
            resolved.update(outs)
            node = copy_node(source, lambda x: outs.get(x, names.get(x, x)), fresh(source.name) if source.name else None)
            inserted.setdefault(before, []).append(node)
            return resolved[name]
        resolved[name] = out
        return out

    kept = {layer.index for layer in chosen}
    for layer in chosen:
        node = node_list[layer.index]
        for k in layer.chains:
            node.input[k] = resolve(layer.fp32.input[k], layer.index)
    # a kept layer's output quantized only to be a graph output stays float
    outputs = {o.name for o in graph.output}
    for out in list(outputs):
        where = pair.q_prod.get(out)
        if where is None or node_list[where[0]].op_type != "DequantizeLinear":
            continue
        chain = pair._chain(out)
        if chain.weight or chain.root not in pair.q_prod or pair.q_prod[chain.root][0] not in kept:
            continue
        node_list[where[0]].output[0] = fresh(out + "::dropped")
        rename_tensor([*node_list, *(n for group in inserted.values() for n in group)], graph, chain.root, out)
    merged: list[onnx.NodeProto] = []
    for i, node in enumerate(node_list):
        merged += inserted.get(i, [])
        merged.append(node)
    # drop Q/DQ nodes nobody reads, then initializers nobody reads
    while True:
        read = {x for n in merged for x in n.input} | outputs
        dead = {j for j, n in enumerate(merged) if n.op_type in QDQ_OPS and not any(o in read for o in n.output if o)}
        if not dead:
            break
        merged = [n for j, n in enumerate(merged) if j not in dead]
    read = {x for n in merged for x in n.input} | outputs
    inits = [clone(i) for i in (*graph.initializer, *new_inits) if i.name in read]
    io = set(pair.inputs) | outputs
    defined = {x for n in merged for x in n.output} | {i.name for i in inits}
    value_info = [clone(v) for v in graph.value_info if v.name in defined and v.name not in io]
    graph.ClearField("node")
    graph.node.extend(stable_toposort(merged, {i.name for i in inits} | set(pair.inputs)))
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("value_info")
    graph.value_info.extend(value_info)
    # fresh names go back to the FP32 names they stand for wherever those are free again
    for alias, name in aliases.items():
        taken = {x for n in graph.node for x in (*n.input, *n.output)} | {i.name for i in graph.initializer}
        if name not in taken and name not in io and alias in taken:
            rename_tensor(graph.node, graph, alias, name)
    check_topological(graph)
    return model


_HALF = "::fp16"  # suffix of the FP16 copies keep_fp16 makes
FP16_MAX = 65504.0  # the largest finite float16


def _fp16_slots(node: onnx.NodeProto, opset: int) -> tuple[set[int], set[int]]:
    """Positions of ``node``'s inputs and outputs whose type constraint admits ``tensor(float16)``.

    Only those may change from float32 to float16: a ``Resize`` keeps its float32 ``scales``, a
    ``LayerNormalization`` its float32 ``Mean`` output, an integer ``shape`` input is never float.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return set(), set()
    allowed = {c.type_param_str for c in schema.type_constraints if "tensor(float16)" in c.allowed_type_strs}
    allowed.add("tensor(float16)")

    def slots(formal: Sequence[Any], count: int) -> set[int]:
        out: set[int] = set()
        for k in range(count):
            f = formal[min(k, len(formal) - 1)] if formal else None  # a variadic last input repeats
            if f is not None and f.type_str in allowed:
                out.add(k)
        return out

    return slots(schema.inputs, len(node.input)), slots(schema.outputs, len(node.output))


def keep_fp16(int8_model: ModelLike, fp32_model: ModelLike, nodes: Iterable[Any]) -> onnx.ModelProto:
    """A copy of ``int8_model`` in which the named quantized layers compute in FP16, as TensorRT runs them.

    TensorRT builds a layer whose Q/DQ were removed in FP16 when FP16 is enabled (a strongly typed
    network: in the precision the ONNX graph states), not in FP32.  So a layer kept out of INT8 for
    the ``tensorrt`` target is written the way TensorRT would compute it: :func:`keep_float` removes
    its Q/DQ, then every float32 input the operator admits in float16 becomes float16 (weights and
    other initializers stored as float16, clipped to +-65504; activations through ``Cast(to=FLOAT16)``)
    and every float output is cast back (``Cast(to=FLOAT)``) under its old name, so the rest of the
    graph is unchanged.  Two kept layers in a row pass float16 directly, without a round trip.

    Worked example: a ``MatMul(x, W)`` kept in FP16 becomes ``Cast(x) -> x::fp16``,
    ``MatMul(x::fp16, W::fp16) -> y::fp16``, ``Cast(y::fp16) -> y``; the rounding of ``x`` and ``W`` to
    11 significant bits (relative error <= 2^-11) is what TensorRT's FP16 layer adds to FP32.  ONNX
    Runtime's CPU provider evaluates the same graph (operators without an FP16 CPU kernel run in FP32
    between casts it inserts, so inputs and outputs are rounded exactly as written, the accumulation is
    FP32 as on TensorRT's tensor cores).
    """
    pair = QdqPair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    chosen = pair.find(list(nodes))
    wanted = {layer.name for layer in chosen}
    model = _keep_float(pair, chosen)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    inferred = onnx.shape_inference.infer_shapes(model)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {i.name: i for i in graph.initializer}
    types.update({name: i.data_type for name, i in inits.items()})
    used = {x for n in graph.node for x in (*n.input, *n.output)} | set(inits)

    def fresh(name: str) -> str:
        new = name + _HALF
        while new in used:
            new += "'"
        used.add(new)
        return new

    half: dict[str, str] = {}  # float32 tensor -> its float16 copy
    back_casts: set[str] = set()  # float32 outputs recovered by a Cast from float16
    new_inits: list[onnx.TensorProto] = []
    merged: list[onnx.NodeProto] = []
    for node in graph.node:
        if node_key(node) not in wanted:
            merged.append(node)
            continue
        ins, outs = _fp16_slots(node, opset)
        for k in sorted(ins):
            x = node.input[k]
            if not x or types.get(x) != F32:
                continue
            if x not in half:
                half[x] = fresh(x)
                if x in inits:
                    w = onnx.numpy_helper.to_array(inits[x])
                    w16 = np.clip(w, -FP16_MAX, FP16_MAX).astype(np.float16)
                    new_inits.append(onnx.numpy_helper.from_array(w16, half[x]))
                else:
                    merged.append(helper.make_node("Cast", [x], [half[x]], name=half[x], to=F16))
            node.input[k] = half[x]
        back = []
        for k in sorted(outs):
            y = node.output[k]
            if not y or types.get(y) != F32:
                continue
            half[y] = fresh(y)
            node.output[k] = half[y]
            back_casts.add(y)
            back.append(helper.make_node("Cast", [half[y]], [y], name=half[y] + "->fp32", to=F32))
        merged += [node, *back]
    outputs = {o.name for o in graph.output}
    read = {x for n in merged for x in n.input} | outputs
    merged = [n for n in merged if n.output[0] not in back_casts or n.output[0] in read]  # no FP32 reader left
    read = {x for n in merged for x in n.input} | outputs
    kept_inits = [clone(i) for i in (*graph.initializer, *new_inits) if i.name in read]
    graph.ClearField("initializer")
    graph.initializer.extend(kept_inits)
    graph.ClearField("node")
    graph.node.extend(merged)
    defined = {x for n in merged for x in n.output}
    info = [clone(v) for v in graph.value_info if v.name in defined]
    graph.ClearField("value_info")
    graph.value_info.extend(info)
    check_topological(graph)
    return model
