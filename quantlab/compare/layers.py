"""Per-layer quantization error, per-layer sensitivity, and partial quantization of Q/DQ models.

A *quantized layer* is a node of the INT8 (Q/DQ) model, other than ``QuantizeLinear`` and
``DequantizeLinear``, that reads at least one ``DequantizeLinear`` output: Conv, Gemm, MatMul, Add,
Concat, pooling, and for ``ort-cpu`` also Reshape, Flatten and the like.  Each input of a layer that
is a DQ output is traced back through its Q/DQ *chain* (``DQ``, ``DQ <- Q``, or longer) to its
*root*: an activation (the float tensor before the Q/DQ pair) or an initializer (a quantized weight
or bias).

**FP32 counterparts.**  ONNX Runtime's ``quantize_static`` keeps node names, so every INT8 node is
matched to the FP32 node of the same name and op type (then by its first output name).  Tensor names
mostly survive, but not always: for ``ort-cpu`` a ``Relu``/``Clip`` after a Conv is removed and the
Conv writes the activation's output name (``c1 -> Relu -> r1`` becomes ``Conv -> r1``, pre-activation
values under the post-activation name), and a quantized graph output ``y`` becomes
``Gemm -> y_QuantizeLinear_Input -> Q -> DQ -> y``.  So correspondences are made by node and
position, never by tensor name: the INT8 tensor ``N.output[i]`` is the FP32 tensor ``F.output[i]``
where ``F`` is ``N``'s match.

**Own error** (``LayerError.own_sqnr_db``): for every layer a small ONNX model holds the layer
behind copies of its Q/DQ chains (same scales, zero-points, dtypes, axes, quantized initializers),
its chain roots and other inputs fed the FP32 values of the same tensors, taken from one run of the
FP32 model; it runs in ONNX Runtime and is compared with the FP32 model's output of the layer in that
same run (bit for bit what the float layer computes on those inputs).  **Accumulated error** (``accumulated_sqnr_db``): the layer's output in one run of the whole
INT8 model against the FP32 node's output.  Both are ``SQNR = 20 log10(||y|| / ||y - y_q||)`` over all
samples and all float outputs of the node (ONNX Runtime's ``qdq_loss_debug`` definition), accumulated
in float64 batch by batch, so memory holds one batch of activations.  A layer with no error gets
``SQNR_CAP_DB`` (999.0) instead of infinity; a zero reference with a non-zero error, or an infinite
error (an attention mask of -3.4e38 that became -inf), gets ``-SQNR_CAP_DB``; every value is clipped
to that range, and NaN activations give NaN.

**Sensitivity**: one layer at a time is quantized (its inputs only, exactly as in the INT8 model:
activation chains re-rooted on the FP32 tensor the INT8 model quantizes, weights dequantized from the
INT8 initializers) and everything else stays FP32.  Only the part of the graph downstream of that
layer changes, so for each layer the FP32 graph is cut to the layer, its Q/DQ chains and every node
that transitively reads its outputs; the cut's frontier (tensors read there but produced upstream, the
graph inputs among them) is fed from FP32 activations cached by one run of the FP32 model, and graph
outputs the subgraph does not produce are taken from the cache.  ``method="full"`` reruns the whole
partially quantized model instead; both give the same numbers bit for bit because every model here
runs with ONNX Runtime's graph optimizations off (fusions would depend on which tensors are exposed).
The same holds for the errors: they are those of the Q/DQ graph evaluated with float kernels, which
the integer kernels of a deployment engine approximate closely but not bit-exactly.

**Partial quantization** (:func:`keep_float`): the INT8 model with chosen layers computing in float.
Their chained inputs are rewired to the float value of the FP32 node's input: the float tensor before
the Q/DQ pair, with any activation ONNX Runtime removed put back, or the FP32 initializer of a weight.
A kept layer's output that was quantized only to become a graph output is left unquantized.  Q/DQ
nodes and initializers nobody reads any more are removed.  Keeping every layer gives the FP32 model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantlab.compare.metrics import SQNR_CAP_DB
from quantlab.compare.metrics import sqnr_db_of_sums as sqnr_db
from quantlab.errors import QuantlabError, check

MEMORY_BYTES = 1 << 30  # default bound on the FP32 activations held at once by the analyses below
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

ModelLike = onnx.ModelProto | str | Path
Feed = Mapping[str, np.ndarray]
Feeds = Feed | Sequence[Feed]


@dataclass
class LayerError:
    """Quantization error of one quantized layer.

    ``output`` is the FP32 model's name of the layer's output; ``activations`` names the float tensors
    quantized on the way in (as the INT8 model's QuantizeLinear nodes name them, i.e. the calibrated
    tensors) and ``weights`` the FP32 initializers replaced by quantized ones.  SQNR values in dB,
    capped at +-``SQNR_CAP_DB`` (see the module docstring).
    """

    node: str
    op_type: str
    output: str
    activations: tuple[str, ...]
    weights: tuple[str, ...]
    own_sqnr_db: float
    accumulated_sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activations"], d["weights"] = list(self.activations), list(self.weights)
        return d


@dataclass
class LayerSensitivity:
    """The caller's score of the model outputs with only this layer quantized (higher is better)."""

    node: str
    op_type: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# loading, feeding, running


def load_model(model: ModelLike, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    p = Path(model)
    check(p.is_file(), f"{what} model '{p}' does not exist: pass the path of an .onnx file")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise QuantlabError(f"'{p}' is not an ONNX model ({type(exc).__name__}): pass an .onnx file") from None


def _feed_list(feeds: Feeds, inputs: list[str]) -> list[dict[str, np.ndarray]]:
    batches = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    check(len(batches) > 0, "no feeds given: pass a dict of input arrays or a list of them")
    out = []
    for i, feed in enumerate(batches):
        check(isinstance(feed, Mapping), f"feed {i} is a {type(feed).__name__}, not a dict of input name -> array")
        missing = [n for n in inputs if n not in feed]
        check(not missing, f"feed {i} has no array for model input(s) {missing}: the model's inputs are {inputs}")
        out.append({n: np.asarray(feed[n]) for n in inputs})
    return out


def _session(model: onnx.ModelProto):
    """A CPU session with graph optimizations off: what runs is exactly the graph as written."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


class _Exposed:
    """A whole model run with chosen intermediate tensors added as outputs."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str]) -> None:
        self.inputs = _graph_inputs(model)
        present = {o.name for o in model.graph.output}
        wanted = [n for n in dict.fromkeys(names) if n and n not in self.inputs]
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        for name in wanted:
            if name not in present:
                exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
        self.names = wanted
        self.session = _session(exposed)

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(zip(self.names, self.session.run(self.names, {k: feed[k] for k in self.inputs})))
        out.update({k: feed[k] for k in self.inputs})
        return out


# ---------------------------------------------------------------------------------------------------
# the INT8 model, the FP32 model, and how they correspond


@dataclass
class _Chain:
    """The Q/DQ nodes in front of one layer input, root first."""

    nodes: list[onnx.NodeProto]
    root: str  # INT8 tensor name: an initializer (weight) or a float activation
    weight: bool


@dataclass
class _Layer:
    index: int  # position among the INT8 graph's nodes
    node: onnx.NodeProto  # INT8
    fp32: onnx.NodeProto
    fp32_index: int
    chains: dict[int, _Chain]  # input position -> chain

    @property
    def name(self) -> str:
        return _key(self.node)


def _key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _producers(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    return {o: (i, k) for i, n in enumerate(graph.node) for k, o in enumerate(n.output) if o}


def _consumers(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in dict.fromkeys(n.input):
            if name:
                users.setdefault(name, []).append(i)
    return users


class _Pair:
    """An INT8 Q/DQ model, the FP32 model it was made from, and their node correspondence."""

    def __init__(self, int8: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
        self.q, self.f = int8, fp32
        self.q_inits = {i.name: i for i in int8.graph.initializer}
        self.f_inits = {i.name: i for i in fp32.graph.initializer}
        self.q_prod, self.f_prod = _producers(int8.graph), _producers(fp32.graph)
        self.inputs = _graph_inputs(fp32)
        self.f_types = {  # element types the FP32 graph declares (shape inference fills value_info)
            v.name: v.type.tensor_type.elem_type
            for v in (*fp32.graph.value_info, *fp32.graph.input, *fp32.graph.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
        }
        q_inputs = _graph_inputs(int8)
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
        self.layers: list[_Layer] = []
        for i, n in enumerate(int8.graph.node):
            if n.op_type in QDQ_OPS:
                continue
            chained = {k: x for k, x in enumerate(n.input) if x in self.q_prod and self._op(x) == "DequantizeLinear"}
            if not chained:
                continue
            check(
                i in self.match,
                f"INT8 node '{_key(n)}' ({n.op_type}) has no counterpart in the FP32 model: pass the FP32 model it was quantized from",
            )
            j = self.match[i]
            check(
                all(k < len(f_nodes[j].input) for k in chained),
                f"INT8 node '{_key(n)}' has inputs its FP32 counterpart lacks: pass the FP32 model it was quantized from",
            )
            self.layers.append(_Layer(i, n, f_nodes[j], j, {k: self._chain(x) for k, x in chained.items()}))

    def _op(self, tensor: str) -> str:
        return self.q.graph.node[self.q_prod[tensor][0]].op_type

    def _chain(self, tensor: str) -> _Chain:
        nodes = []
        while tensor in self.q_prod and self._op(tensor) in QDQ_OPS:
            node = self.q.graph.node[self.q_prod[tensor][0]]
            nodes.append(node)
            tensor = node.input[0]
        if tensor in self.q_inits:
            return _Chain(nodes[::-1], tensor, True)
        check(
            tensor in self.fp32_of,
            f"Q/DQ input '{tensor}' of the INT8 model has no FP32 counterpart: pass the FP32 model it was quantized from",
        )
        return _Chain(nodes[::-1], tensor, False)

    def find(self, names: Iterable[Any] | None) -> list[_Layer]:
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

    def quantized_inputs(self, layer: _Layer) -> tuple[tuple[str, ...], tuple[str, ...]]:
        acts = tuple(c.root for c in layer.chains.values() if not c.weight)
        weights = tuple(layer.fp32.input[k] for k, c in layer.chains.items() if c.weight)
        return acts, weights

    def opsets(self) -> list[onnx.OperatorSetIdProto]:
        return list(self.q.opset_import)


def mismatch(fp32_model: ModelLike, int8_model: ModelLike) -> str | None:
    """Why ``int8_model`` cannot be analysed against ``fp32_model``, or None when it can.

    Every function here needs the INT8 model to be a Q/DQ copy of the FP32 graph (as ONNX Runtime's
    quantizer writes it); a model exported separately, e.g. after QAT, is not.
    """
    try:
        _Pair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    except QuantlabError as exc:
        return str(exc)
    return None


def _copy_node(node: onnx.NodeProto, rename: Callable[[str], str], name: str | None = None) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.input[:] = [rename(x) if x else x for x in node.input]
    out.output[:] = [rename(x) if x else x for x in node.output]
    if name is not None:
        out.name = name
    return out


def _clone(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _renamed_init(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(init)
    out.name = name
    return out


_Q = "::int8"  # suffix of INT8 artefacts copied into models built here


def _quantized_copy(
    pair: _Pair, layer: _Layer, fp32_name: Callable[[str], str]
) -> tuple[list[onnx.NodeProto], onnx.NodeProto, dict[str, onnx.TensorProto]]:
    """The layer's Q/DQ chains and the layer itself, chain roots named by ``fp32_name``.

    Returns the chain nodes, the layer node reading them (its inputs that are not chained keep their
    FP32 names, its outputs are the FP32 node's) and the INT8 initializers the chains need.
    """
    inits: dict[str, onnx.TensorProto] = {}

    def ren(x: str) -> str:
        if x in pair.q_inits:
            inits.setdefault(x + _Q, _renamed_init(pair.q_inits[x], x + _Q))
        return x + _Q

    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()  # a chain two inputs share (Add(x, x)) is copied once
    node = onnx.NodeProto()
    node.CopyFrom(layer.fp32)
    for k, chain in layer.chains.items():
        root = ren(chain.root) if chain.weight else fp32_name(chain.root)
        for c in chain.nodes:
            if c.output[0] in seen:
                continue
            seen.add(c.output[0])
            copy = _copy_node(c, ren, c.name + _Q)
            if c.input[0] == chain.root:
                copy.input[0] = root
            nodes.append(copy)
        node.input[k] = ren(layer.node.input[k])
    return nodes, node, inits


def _value_info(name: str, dtype: np.dtype) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)


def _model(pair: _Pair, graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=pair.opsets())
    model.ir_version = pair.q.ir_version
    return model


def check_topological(graph: onnx.GraphProto) -> None:
    """Raise ``ValueError`` unless every node reads only tensors defined before it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        missing = [x for x in node.input if x and x not in defined]
        if missing:
            raise ValueError(f"node '{_key(node)}' of graph '{graph.name}' reads {missing} before they are defined")
        defined.update(o for o in node.output if o)
    missing = [o.name for o in graph.output if o.name not in defined]
    if missing:
        raise ValueError(f"graph '{graph.name}' outputs {missing} are never defined")


# ---------------------------------------------------------------------------------------------------
# 1. per-layer errors


def _layer_model(pair: _Pair, layer: _Layer, dtypes: Mapping[str, np.dtype]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The layer behind copies of its Q/DQ chains, on FP32 inputs; returns it, its inputs, the FP32 outputs it mirrors.

    The FP32 reference is the FP32 model's own output of the layer: with graph optimizations off it is
    bit for bit what a float copy of the node would compute on the same inputs.
    """
    f = layer.fp32
    floats = [o for o in f.output if o and np.issubdtype(dtypes[o], np.floating)]
    chain_nodes, qnode, q_inits = _quantized_copy(pair, layer, lambda x: pair.fp32_of[x])
    qnode.output[:] = [o + _Q if o in floats else o + "::unused" if o else o for o in f.output]
    qnode.name = _key(f) + _Q
    nodes = [*chain_nodes, qnode]
    inits = {x: pair.f_inits[x] for n in nodes for x in n.input if x in pair.f_inits}
    inits.update(q_inits)
    produced = {o for n in nodes for o in n.output}
    feeds = list(dict.fromkeys(x for n in nodes for x in n.input if x and x not in inits and x not in produced))
    graph = helper.make_graph(
        nodes, "layer", [_value_info(x, dtypes[x]) for x in feeds],
        [helper.make_empty_tensor_value_info(o + _Q) for o in floats], list(inits.values()),
    )
    check_topological(graph)
    return _model(pair, graph), feeds, floats


def _sumsq(y: np.ndarray, yq: np.ndarray) -> tuple[float, float]:
    a = np.asarray(y, dtype=np.float64)
    d = a - np.asarray(yq, dtype=np.float64)
    return float(np.vdot(a.ravel(), a.ravel())), float(np.vdot(d.ravel(), d.ravel()))


def _is_float_output(pair: _Pair, name: str) -> bool:
    types = pair.f_types
    return types.get(name, onnx.TensorProto.FLOAT) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                          onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _samples(batches: Sequence[Feed]) -> int:
    return sum(next(iter(b.values())).shape[0] for b in batches)


def _nbytes(values: Mapping[str, np.ndarray], names: Iterable[str]) -> int:
    return sum(values[n].nbytes for n in set(names) if n in values)


def _fixed_batch(model: onnx.ModelProto) -> int:
    """The batch size a model's inputs fix (their first dimension), or 1 when the batch axis is dynamic."""
    inits = {i.name for i in model.graph.initializer}
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim if v.type.HasField("tensor_type") else []
        if v.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return 1


def _rebatch(batches: Sequence[Feed], size: int) -> list[dict[str, np.ndarray]]:
    """The same samples in batches of at most ``size`` (batch boundaries kept; nothing is copied)."""
    out = []
    for feed in batches:
        n = next(iter(feed.values())).shape[0]
        out += [{k: v[i : i + size] for k, v in feed.items()} for i in range(0, n, size)]
    return out


def layer_errors(
    fp32_model: ModelLike, int8_model: ModelLike, feeds: Feeds, *, memory_bytes: int = MEMORY_BYTES
) -> list[LayerError]:
    """Own and accumulated SQNR of every quantized layer of ``int8_model``, in graph order.

    ``feeds`` is one dict of input arrays or a list of them (batches); each full model runs once per
    batch and each one-layer model once per batch (see the module docstring).  Batches whose exposed
    activations would take more than ``memory_bytes`` are run in smaller pieces (sizes measured on one
    sample); that changes the numbers only by the kernels' rounding (about 1e-6 dB).
    """
    pair = _Pair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    batches = _feed_list(feeds, pair.inputs)
    # a layer with no float output (e.g. a comparison feeding a mask) has no SQNR to measure
    layers = [layer for layer in pair.layers if any(_is_float_output(pair, o) for o in layer.fp32.output if o)]
    need_f: list[str] = []
    for layer in layers:
        need_f += [x for x in layer.fp32.input if x and x not in pair.f_inits]
        need_f += [pair.fp32_of[c.root] for c in layer.chains.values() if not c.weight]
        need_f += [o for o in layer.fp32.output if o]
    run_f = _Exposed(pair.f, need_f)
    run_q = _Exposed(pair.q, [o for layer in layers for o in layer.node.output if o])
    fixed = _fixed_batch(pair.f)  # a model with a fixed batch dimension runs on batches of exactly that size
    if layers and _samples(batches) > len(batches) * fixed:
        one = {k: v[:fixed] for k, v in batches[0].items()}
        per_sample = (_nbytes(run_f(one), run_f.names) + _nbytes(run_q(one), run_q.names)) // fixed
        size = max(1, memory_bytes // max(per_sample, 1))
        batches = _rebatch(batches, max(fixed, size - size % fixed))
    own = np.zeros((len(layers), 2))
    acc = np.zeros((len(layers), 2))
    minis: list[tuple[Any, list[str], list[str]]] | None = None
    for feed in batches:
        ref, quant = run_f(feed), run_q(feed)
        if minis is None:
            dtypes = {k: v.dtype for k, v in ref.items()}
            minis = []
            for layer in layers:
                model, inputs, floats = _layer_model(pair, layer, dtypes)
                minis.append((_session(model) if floats else None, inputs, floats))
        for i, (layer, (session, inputs, floats)) in enumerate(zip(layers, minis)):
            if session is None:
                continue
            outs = session.run(None, {x: ref[x] for x in inputs})
            for name, yq in zip(floats, outs):
                own[i] += _sumsq(ref[name], yq)
            for a, b in zip(layer.fp32.output, layer.node.output):
                if a and b and np.issubdtype(ref[a].dtype, np.floating):
                    acc[i] += _sumsq(ref[a], quant[b])
    rows = []
    for i, layer in enumerate(layers):
        acts, weights = pair.quantized_inputs(layer)
        rows.append(LayerError(
            layer.name, layer.node.op_type, layer.fp32.output[0], acts, weights,
            sqnr_db(*own[i]), sqnr_db(*acc[i]),
        ))
    return rows


# ---------------------------------------------------------------------------------------------------
# 2. sensitivity


@dataclass
class _Partial:
    """The FP32 model with one layer quantized: the whole of it or the part downstream of the layer.

    Holds references only; :meth:`model` builds the ONNX model (with its copy of the weights) when it
    is about to run, so one of them is in memory at a time.
    """

    pair: _Pair
    nodes: list[onnx.NodeProto]
    inits: dict[str, onnx.TensorProto]
    frontier: list[str]  # inputs fed from cached FP32 activations (or the feeds, for the whole model)
    outputs: list[str]  # graph outputs it computes; the rest come from the cache
    name: str

    def model(self, dtypes: Mapping[str, np.dtype] | None = None) -> onnx.ModelProto:
        graph = self.pair.f.graph
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*graph.input, *graph.value_info, *graph.output)
            if v.type.HasField("tensor_type")
        }
        if dtypes is not None:  # the cached arrays know best (shape tensors are not float)
            types.update({x: helper.np_dtype_to_tensor_dtype(dtypes[x]) for x in self.frontier if x in dtypes})
        outputs = [o for o in graph.output if o.name in self.outputs]
        built = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(x, types.get(x, onnx.TensorProto.FLOAT), None) for x in self.frontier],
            outputs, list(self.inits.values()),
        )
        check_topological(built)
        return _model(self.pair, built)


def _partial(pair: _Pair, layer: _Layer, users: dict[str, list[int]], *, downstream: bool) -> _Partial:
    f_nodes = pair.f.graph.node
    chain_nodes, qnode, q_inits = _quantized_copy(pair, layer, lambda x: pair.fp32_of[x])
    if downstream:
        keep, todo = {layer.fp32_index}, [o for o in layer.fp32.output if o]
        while todo:
            for i in users.get(todo.pop(), []):
                if i not in keep:
                    keep.add(i)
                    todo += [o for o in f_nodes[i].output if o]
        order = sorted(keep)
    else:
        order = list(range(len(f_nodes)))
    nodes: list[onnx.NodeProto] = []
    for i in order:
        if i == layer.fp32_index:
            nodes += [*chain_nodes, qnode]
        else:
            nodes.append(f_nodes[i])
    inits = {x: pair.f_inits[x] for n in nodes for x in n.input if x in pair.f_inits}
    inits.update(q_inits)
    produced = {o for n in nodes for o in n.output if o}
    frontier = list(dict.fromkeys(x for n in nodes for x in n.input if x and x not in inits and x not in produced))
    outputs = [o.name for o in pair.f.graph.output if o.name in produced]
    return _Partial(pair, nodes, inits, frontier, outputs, "downstream" if downstream else "partial")


def _groups(pair: _Pair, partials: Sequence[_Partial], batches: Sequence[Feed], memory_bytes: int) -> list[list[int]]:
    """Consecutive partials whose cached frontiers (over every sample) fit in ``memory_bytes`` together."""
    graph_outputs = [o.name for o in pair.f.graph.output]
    probe = _Exposed(pair.f, [x for p in partials for x in p.frontier] + graph_outputs)
    fixed = _fixed_batch(pair.f)
    sizes = {k: v.nbytes // fixed for k, v in probe({k: v[:fixed] for k, v in batches[0].items()}).items()}
    del probe
    samples = _samples(batches)

    def cost(names: set[str]) -> int:
        return samples * sum(sizes.get(n, 0) for n in names)

    groups: list[list[int]] = []
    held: set[str] = set(graph_outputs)
    for i, part in enumerate(partials):
        grown = held | set(part.frontier)
        if groups and groups[-1] and cost(grown) > memory_bytes:
            groups.append([i])
            held = set(graph_outputs) | set(part.frontier)
        else:
            if not groups:
                groups.append([])
            groups[-1].append(i)
            held = grown
    return groups


def sensitivity(
    fp32_model: ModelLike,
    int8_model: ModelLike,
    feeds: Feeds,
    score: Callable[[list[np.ndarray]], float],
    layers: Iterable[Any] | None = None,
    *,
    method: str = "subgraph",
    memory_bytes: int = MEMORY_BYTES,
) -> list[LayerSensitivity]:
    """Score the model with one layer quantized at a time; worst (lowest score) first.

    ``score(outputs)`` gets one array per graph output, in the model's output order, concatenated over
    the batches of ``feeds`` along axis 0, and must return a number where **higher is better**: e.g.
    top-1 agreement with the FP32 outputs, cosine similarity, SQNR, or a negated error.  ``layers``
    limits the run to those layer names (default: every quantized layer).  Ties keep graph order and
    a NaN score sorts first.  ``method="full"`` reruns the whole model per layer instead of the
    downstream subgraph (same numbers; for checking and timing).

    The cached FP32 activations of every sample are kept within ``memory_bytes``: the layers are
    taken in graph order in groups whose frontiers fit (sizes measured on one sample), and the FP32
    model runs once per group.  A small model is one group; the numbers do not depend on the grouping.
    """
    check(method in ("subgraph", "full"), f"unknown sensitivity method '{method}': use 'subgraph' or 'full'")
    pair = _Pair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    batches = _feed_list(feeds, pair.inputs)
    chosen = pair.find(layers)
    users = _consumers(pair.f.graph.node)
    partials = [_partial(pair, layer, users, downstream=method == "subgraph") for layer in chosen]
    graph_outputs = [o.name for o in pair.f.graph.output]
    groups = _groups(pair, partials, batches, memory_bytes) if method == "subgraph" and partials else [list(range(len(partials)))]
    rows: list[LayerSensitivity] = []
    for group in groups:
        if method == "subgraph":
            run = _Exposed(pair.f, [x for i in group for x in partials[i].frontier] + graph_outputs)
            cache = [run(feed) for feed in batches]
            del run
        else:
            cache = batches
        for i in group:
            layer, part = chosen[i], partials[i]
            session = _session(part.model({k: v.dtype for k, v in cache[0].items()}))
            outs: dict[str, list[np.ndarray]] = {o: [] for o in graph_outputs}
            for values in cache:
                got = dict(zip(part.outputs, session.run(part.outputs, {x: values[x] for x in part.frontier})))
                for o in graph_outputs:
                    outs[o].append(got[o] if o in got else values[o])
            del session
            value = score([np.concatenate(outs[o], axis=0) for o in graph_outputs])
            rows.append(LayerSensitivity(layer.name, layer.node.op_type, float(value)))
        del cache
    order = sorted(range(len(rows)), key=lambda i: (not math.isnan(rows[i].score), rows[i].score if not math.isnan(rows[i].score) else 0.0, i))
    return [rows[i] for i in order]


# ---------------------------------------------------------------------------------------------------
# 3. partial quantization


def _rename(nodes: Iterable[onnx.NodeProto], graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in nodes:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


def _stable_toposort(nodes: list[onnx.NodeProto], defined: set[str]) -> list[onnx.NodeProto]:
    """Topological order that keeps the given order wherever it is already valid."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer and x not in defined} - {i} for i, n in enumerate(nodes)]
    waiting = [len(d) for d in deps]
    after: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            after.setdefault(j, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in after.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    check(len(order) == len(nodes), "the graph has a cycle: keep_float cannot order its nodes")
    return [nodes[i] for i in order]


def keep_float(int8_model: ModelLike, fp32_model: ModelLike, nodes: Iterable[Any]) -> onnx.ModelProto:
    """A copy of ``int8_model`` in which the named quantized layers compute in float.

    ``nodes`` are layer names as :func:`layer_errors` gives them (or its rows).  See the module
    docstring for what changes; the result passes ``onnx.checker`` and loads in ONNX Runtime.
    """
    pair = _Pair(load_model(int8_model, "INT8"), load_model(fp32_model, "FP32"))
    chosen = pair.find(list(nodes))
    model = onnx.ModelProto()
    model.CopyFrom(pair.q)
    graph = model.graph
    node_list = [_copy_node(n, lambda x: x) for n in graph.node]
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
                new_inits.append(_renamed_init(pair.f_inits[name], out))
        elif name in pair.int8_of and pair.int8_of[name] in pair.q_prod:
            out = pair.int8_of[name]
        else:
            check(name in pair.f_prod, f"FP32 tensor '{name}' has no producer: pass the FP32 model the INT8 model was quantized from")
            source = f_nodes[pair.f_prod[name][0]]  # a node the quantizer removed (Relu, Clip): put it back
            names = {x: resolve(x, before) for x in source.input if x}
            outs = {o: fresh(o) for o in source.output if o}
            resolved.update(outs)
            node = _copy_node(source, lambda x: outs.get(x, names.get(x, x)), fresh(source.name) if source.name else None)
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
        _rename([*node_list, *(n for group in inserted.values() for n in group)], graph, chain.root, out)
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
    inits = [_clone(i) for i in (*graph.initializer, *new_inits) if i.name in read]
    io = set(pair.inputs) | outputs
    defined = {x for n in merged for x in n.output} | {i.name for i in inits}
    value_info = [_clone(v) for v in graph.value_info if v.name in defined and v.name not in io]
    graph.ClearField("node")
    graph.node.extend(_stable_toposort(merged, {i.name for i in inits} | set(pair.inputs)))
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("value_info")
    graph.value_info.extend(value_info)
    # fresh names go back to the FP32 names they stand for wherever those are free again
    for alias, name in aliases.items():
        taken = {x for n in graph.node for x in (*n.input, *n.output)} | {i.name for i in graph.initializer}
        if name not in taken and name not in io and alias in taken:
            _rename(graph.node, graph, alias, name)
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
    int8 = load_model(int8_model, "INT8")
    fp32 = load_model(fp32_model, "FP32")
    wanted = {layer.name for layer in _Pair(int8, fp32).find(list(nodes))}
    model = keep_float(int8, fp32, wanted)
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
        if _key(node) not in wanted:
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
    kept_inits = [_clone(i) for i in (*graph.initializer, *new_inits) if i.name in read]
    graph.ClearField("initializer")
    graph.initializer.extend(kept_inits)
    graph.ClearField("node")
    graph.node.extend(merged)
    defined = {x for n in merged for x in n.output}
    info = [_clone(v) for v in graph.value_info if v.name in defined]
    graph.ClearField("value_info")
    graph.value_info.extend(info)
    check_topological(graph)
    return model
