"""Graph rewrites that turn what exporters write into the form quantization expects.

Exporters differ in how they store the same network.  Before a model is calibrated, preparation
(:func:`quantlab.model.prepare_model`) applies these rewrites, each of which leaves the function the
model computes unchanged:

* :func:`drop_shadowed_initializers`: models of IR version < 4 list every initializer among the graph
  inputs as well.  Quantization treats initializers as constants, so they are removed from the inputs
  and the IR version is raised to one where that is valid.
* :func:`upcast_fp16`: an FP16 model is quantized from its FP32 upcast.  Every float16 initializer,
  constant, value type and ``Cast``/``dtype`` target becomes float32; float16 values are exactly
  representable in float32, so the upcast model computes the FP16 network's function in higher
  precision (the INT8 model replaces the arithmetic either way).
* :func:`fold_constants`: weights that are not initializers, but outputs of a subgraph that reads
  only constants (``Constant``, ``ConstantOfShape``, ``Identity``, ``Transpose``/``Reshape``/``Cast``
  of an initializer, ...), become initializers.  The subgraph runs once in ONNX Runtime with graph
  optimizations off; each output a remaining node reads becomes an initializer holding that value.
  Example: ``MatMul(x, Transpose(W))``, the way some exporters write ``Linear``, becomes
  ``MatMul(x, W')`` with ``W' = W^T`` stored.
* :func:`weight_to_the_right`: ``MatMul(W, x)`` with a constant ``W`` on the left is rewritten as
  ``Transpose(MatMul(Transpose(x), W^T))``: ``(W x)^T = x^T W^T``, so the weight sits where
  per-channel quantization (one scale per output column of the right operand) expects it.
* :func:`split_grouped_deconv_bias`: the bias of a grouped ``ConvTranspose`` moves into an ``Add``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantlab.errors import QuantlabError, describe

# ops whose output differs from run to run: never folded
NONDETERMINISTIC = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
# ops of an already quantized model
QUANTIZED_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "DequantizeBFP", "QuantizeBFP",
)
_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph of its nodes (``If`` branches, ``Loop``/``Scan`` bodies), recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) operator set the model imports; 0 if none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that only an already quantized model holds (``QuantizeLinear``, ``ConvInteger``, ...)."""
    return [n for g in graphs(model.graph) for n in g.node if n.op_type in QUANTIZED_OPS]


def drop_shadowed_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers from the graph inputs; raise the IR version to at least 4.  Returns how many."""
    inits = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    dropped = len(model.graph.input) - len(kept)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return dropped


# --- FP16 -> FP32 ---------------------------------------------------------------------------------

_FP16 = TensorProto.FLOAT16


def _upcast_tensor(t: TensorProto) -> TensorProto:
    out = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
    out.doc_string = t.doc_string
    return out


def _upcast_type(tp: onnx.TypeProto) -> int:
    """Rewrite float16 element types inside a type (tensors, sequences, optionals, maps); returns how many."""
    which = tp.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        t = getattr(tp, which)
        if t.elem_type == _FP16:
            t.elem_type = TensorProto.FLOAT
            return 1
        return 0
    if which == "sequence_type":
        return _upcast_type(tp.sequence_type.elem_type)
    if which == "optional_type":
        return _upcast_type(tp.optional_type.elem_type)
    if which == "map_type":
        return _upcast_type(tp.map_type.value_type)
    return 0


def uses_dtype(model: onnx.ModelProto, dtype: int) -> bool:
    """Whether any value, initializer, constant or cast of the model has element type ``dtype``."""
    for g in graphs(model.graph):
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == dtype:
                return True
        if any(i.data_type == dtype for i in g.initializer):
            return True
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == dtype:
                    return True
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == dtype:
                    return True
    return False


def upcast_fp16(model: onnx.ModelProto) -> int:
    """Turn every float16 of the model into float32 (see the module docstring); returns how many changed."""
    changed = 0
    for g in graphs(model.graph):
        for v in (*g.input, *g.output, *g.value_info):
            changed += _upcast_type(v.type)
        for i, init in enumerate(g.initializer):
            if init.data_type == _FP16:
                g.initializer[i].CopyFrom(_upcast_tensor(init))
                changed += 1
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _FP16:
                    a.t.CopyFrom(_upcast_tensor(a.t))
                    changed += 1
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == _FP16:
                    a.i = TensorProto.FLOAT
                    changed += 1
    return changed


# --- constant folding ----------------------------------------------------------------------------


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraphs of ``graph``'s nodes read from an enclosing scope (or anywhere: a superset)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in _SUBGRAPH:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    for g in graphs(sub):
                        names.update(i for n in g.node for i in n.input)
                        names.update(o.name for o in g.output)
    return names


def _foldable(node: onnx.NodeProto, constant: set[str]) -> bool:
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in NONDETERMINISTIC
        and not any(a.type in _SUBGRAPH for a in node.attribute)
        and all(not i or i in constant for i in node.input)
    )


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace every node that reads only constants by initializers (see the module docstring).

    Returns the number of nodes removed.  Only the values that remaining nodes (or subgraphs) read
    are stored; initializers no node reads any more are dropped.  The result is deterministic: the
    same model gives the same initializers, in node order after the original ones.
    """
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:  # topological order (onnx.checker enforces it)
        if _foldable(node, constant) and not (set(node.output) & outputs):
            folded.append(node)
            constant.update(o for o in node.output if o)
    if not folded:
        return 0
    folded_ids = {id(n) for n in folded}
    kept = [n for n in graph.node if id(n) not in folded_ids]
    read = {i for n in kept for i in n.input if i} | outputs | _outer_references(graph)
    produced = [o for n in folded for o in n.output if o]
    frontier = [o for o in produced if o in read]
    values = _evaluate(model, folded, frontier) if frontier else {}
    inits = [i for i in graph.initializer if i.name in read]
    new = [numpy_helper.from_array(np.asarray(values[name]), name) for name in frontier]
    del graph.initializer[:]
    graph.initializer.extend([*inits, *new])
    del graph.node[:]
    graph.node.extend(kept)
    keep_info = [v for v in graph.value_info if v.name not in set(produced)]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)
    return len(folded)


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], names: list[str]) -> dict[str, np.ndarray]:
    """Run the constant subgraph ``nodes`` once in ONNX Runtime (no graph optimizations) for ``names``."""
    import onnxruntime as ort

    needed = {i for n in nodes for i in n.input if i}
    inits = [i for i in model.graph.initializer if i.name in needed]
    graph = helper.make_graph(nodes, "constants", [], [helper.make_empty_tensor_value_info(n) for n in names], inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = session.run(names, {})
    except Exception as exc:  # ONNX Runtime's own errors on the user's constant subgraph
        raise QuantlabError(
            f"prepare: ONNX Runtime cannot evaluate the model's constant subgraph ({describe(exc)}): "
            "check that the model runs in ONNX Runtime, or export it with constant folding on"
        ) from exc
    return dict(zip(names, values))


# --- MatMul with the weight on the left ----------------------------------------------------------


def weight_to_the_right(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``MatMul(W, x)`` (``W`` a 2-D initializer, ``x`` not constant) with the weight on the right.

    ``Y = W x`` becomes ``Y = Transpose(MatMul(Transpose(x), W^T))`` where both transposes swap the last
    two axes of an input of rank ``r`` (known from shape inference; nodes whose ``x`` has no known rank
    >= 2 are left alone).  Returns the names of the rewritten nodes.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    ranks = _ranks(model)
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    rewritten: list[str] = []

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    for node in graph.node:
        w = node.input[0] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else ""
        x = node.input[1] if w else ""
        rank = ranks.get(x)
        if not w or w not in inits or x in inits or len(inits[w].dims) != 2 or rank is None or rank < 2:
            new_nodes.append(node)
            continue
        perm = [*range(rank - 2), rank - 1, rank - 2]
        label = node.name or node.output[0]
        wt = fresh(f"{w}_transposed")
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[w]).T), wt))
        xt, yt = fresh(f"{label}_input_t"), fresh(f"{label}_output_t")
        new_nodes += [
            helper.make_node("Transpose", [x], [xt], name=fresh(f"{label}_transpose_in"), perm=perm),
            helper.make_node("MatMul", [xt, wt], [yt], name=node.name or fresh(f"{label}_matmul")),
            helper.make_node("Transpose", [yt], [node.output[0]], name=fresh(f"{label}_transpose_out"), perm=perm),
        ]
        readers[w] -= 1
        rewritten.append(label)
    if rewritten:
        unread = {w for w, n in readers.items() if n == 0 and w in inits} - _outer_references(graph)
        unread -= {o.name for o in graph.output}
        kept = [i for i in graph.initializer if i.name not in unread]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *new_inits])
        del graph.node[:]
        graph.node.extend(new_nodes)
    return rewritten


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value whose shape ONNX shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here: unknown ranks leave nodes alone
        inferred = model
    g = inferred.graph
    ranks = {}
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    for i in g.initializer:
        ranks[i.name] = len(i.dims)
    return ranks


# --- grouped ConvTranspose with a bias ------------------------------------------------------------


def split_grouped_deconv_bias(model: onnx.ModelProto) -> list[str]:
    """Move the bias of a grouped ``ConvTranspose`` into an ``Add`` after it.

    A grouped ``ConvTranspose`` weight is ``[C_in, C_out / group, k...]``: per-channel scales on its
    axis 1 number ``C_out / group``, while the bias has ``C_out`` values, so ONNX Runtime cannot form
    the INT32 bias scale ``s_x * s_w[c]``.  ``Y = ConvTranspose(x, W) + b`` with ``b`` reshaped to
    ``[C_out, 1, ...]`` computes the same.  Returns the names of the rewritten nodes.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    nodes: list[onnx.NodeProto] = []
    added: list[TensorProto] = []
    done: list[str] = []
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if (
            node.op_type != "ConvTranspose" or group <= 1 or len(node.input) < 3 or not node.input[2]
            or node.input[2] not in inits or node.input[1] not in inits
        ):
            nodes.append(node)
            continue
        label = node.name or node.output[0]
        rank = len(inits[node.input[1]].dims)
        bias = numpy_helper.to_array(inits[node.input[2]])
        shaped, raw = f"{node.input[2]}_{label}_broadcast", f"{label}_without_bias"
        while shaped in taken or raw in taken:
            shaped, raw = shaped + "_", raw + "_"
        taken.update((shaped, raw))
        added.append(numpy_helper.from_array(bias.reshape(bias.shape[0], *([1] * (rank - 2))), shaped))
        deconv = onnx.NodeProto()
        deconv.CopyFrom(node)
        del deconv.input[2:]
        deconv.output[0] = raw
        nodes += [deconv, helper.make_node("Add", [raw, shaped], [node.output[0]], name=f"{label}_bias")]
        done.append(label)
    if done:
        read = {i for n in nodes for i in n.input} | _outer_references(graph) | {o.name for o in graph.output}
        kept = [i for i in graph.initializer if i.name in read]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *added])
        del graph.node[:]
        graph.node.extend(nodes)
    return done
