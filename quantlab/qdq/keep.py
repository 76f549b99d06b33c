"""Partial quantization: an INT8 Q/DQ model with chosen layers computing in float again.

The chained inputs of each kept layer (see :mod:`quantlab.qdq.pair`) are rewired to the float value
of the FP32 node's input: the float tensor before the Q/DQ pair, with any activation ONNX Runtime
removed (``Relu``, ``Clip`` folded into a Conv) put back, or the FP32 initializer of a weight.  A kept
layer's output that was quantized only to become a graph output is left unquantized.  Q/DQ nodes and
initializers nobody reads any more are removed, and the nodes are put back in topological order,
keeping the INT8 model's order wherever it is valid.  Keeping every layer gives the FP32 model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import onnx

from quantlab.errors import check
from quantlab.onnxgraph import (
    ModelLike, check_topological, clone, copy_node, load_model, rename_tensor, renamed_initializer, stable_toposort,
)
from quantlab.qdq.pair import QDQ_OPS, QdqPair


def keep_float(int8_model: ModelLike, fp32_model: ModelLike, nodes: Iterable[Any]) -> onnx.ModelProto:
    """A copy of ``int8_model`` in which the named quantized layers compute in float.

    ``nodes`` are layer names (as :class:`~quantlab.qdq.pair.QdqPair` and
    :func:`quantlab.compare.layers.layer_errors` list them), or rows with a ``node`` attribute.  See
    the module docstring for what changes; the result passes ``onnx.checker`` and loads in ONNX Runtime.
    """
    pair = QdqPair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    chosen = pair.find(list(nodes))
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
