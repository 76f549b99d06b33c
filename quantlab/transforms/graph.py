"""What every transform needs of an ONNX graph: its weighted layers, initializers it may rewrite,
new nodes in topological order, the activations it reads on calibration data, and the weight
quantization of the targets.

**Weight quantization of both targets** (``tensorrt`` and ``ort-cpu``): symmetric INT8 per output
channel, ``s_c = max|W_c| / 127`` in float32 (1 for an all-zero channel) and
``q = clip(round_half_even(W / s_c), -127, 127)``, as ONNX Runtime's ``compute_scale_zp`` and
``quantize_nparray`` compute them.  Example: a channel ``[0.5, -1.27, 0.013]`` has ``s = 0.01`` and
``q = [50, -127, 1]``, dequantized ``[0.5, -1.27, 0.01]``.

The output-channel axis is the one ONNX Runtime quantizes per channel: 0 for ``Conv`` and a ``Gemm``
with ``transB = 1``, 1 for ``ConvTranspose``, a ``Gemm`` with ``transB = 0`` and a ``MatMul`` whose
second input is a 2-D constant ``[K, N]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.onnxgraph import GraphIndex

Feed = dict[str, np.ndarray]

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """A node with a constant weight: where its channels are and what it reads.

    Attributes:
        node: the node (``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul``).
        weight: name of the weight initializer.
        bias: name of the bias initializer, or ``None`` when the node has none.
        out_axis: weight axis of the output channels (the per-channel quantization axis).
        in_axis: weight axis of the input channels (within a group for grouped convolutions).
        groups: ``group`` of a convolution, 1 otherwise.
        channel_axis: axis of the output channels in the node's *output* tensor (1 for
            convolutions, -1 for ``Gemm`` and ``MatMul``).
    """

    node: onnx.NodeProto
    weight: str
    bias: str | None
    out_axis: int
    in_axis: int
    groups: int
    channel_axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node`` (``default`` when it is absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class Graph:
    """A mutable view of a model: initializers by name, producers and readers of every tensor.

    Changes go straight into the ``ModelProto`` it wraps (a copy of the caller's), so the model it
    returns is the model it changed.  Initializers keep their position; new nodes go right after the
    node that produces their first input, so the node list stays topologically sorted.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.refresh()

    def refresh(self) -> None:
        g = self.model.graph
        self.inits = {i.name: i for i in g.initializer}
        index = GraphIndex(g, each_read=True)  # readers counted per read: Add(x, x) reads x twice
        self.producer: dict[str, onnx.NodeProto] = index.producer
        self.readers: dict[str, list[onnx.NodeProto]] = index.consumers
        self.outputs = index.outputs
        self._names = {n.name for n in g.node} | set(self.producer) | set(self.inits) | {i.name for i in g.input}

    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace initializer ``name`` with ``value`` (same dtype as before)."""
        old = self.inits[name]
        new = numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(old).dtype), name)
        old.CopyFrom(new)

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        name = self.unique(name)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.model.graph.initializer[-1]
        self._names.add(name)
        return name

    def copy_value_info(self, src: str, dst: str) -> None:
        """Declare tensor ``dst`` with the type and shape shape inference gave ``src`` (if any)."""
        for v in self.model.graph.value_info:
            if v.name == src:
                new = self.model.graph.value_info.add()
                new.CopyFrom(v)
                new.name = dst
                return

    def unique(self, base: str) -> str:
        """``base``, or ``base_<k>`` for the smallest k making it a name the graph does not use yet."""
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def insert_after(self, anchor: str, node: onnx.NodeProto) -> None:
        """Insert ``node`` right after the producer of tensor ``anchor`` (first if a graph input)."""
        nodes = self.model.graph.node
        producer = self.producer.get(anchor)
        index = 0 if producer is None else next(i for i, n in enumerate(nodes) if n is producer) + 1
        nodes.insert(index, node)
        self.refresh()

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name`` when there is exactly one and it is no graph output."""
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def readers_of(self, name: str) -> int:
        return len(self.readers.get(name, [])) + (name in self.outputs)

    def layer(self, node: onnx.NodeProto) -> Layer | None:
        """``node`` as a :class:`Layer`, or ``None`` when it has no constant weight this module handles."""
        op = node.op_type
        if op not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in self.inits:
            return None
        w = self.inits[node.input[1]]
        if w.data_type != onnx.TensorProto.FLOAT:
            return None
        rank = len(w.dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and (bias not in self.inits or len(self.inits[bias].dims) != 1):
            return None
        if op == "Conv" and rank >= 3:
            return Layer(node, w.name, bias, 0, 1, int(attr(node, "group", 1)), 1)
        if op == "ConvTranspose" and rank >= 3:
            return Layer(node, w.name, bias, 1, 0, int(attr(node, "group", 1)), 1)
        if op == "Gemm" and rank == 2 and not attr(node, "transA", 0):
            trans = bool(attr(node, "transB", 0))
            return Layer(node, w.name, bias, 0 if trans else 1, 1 if trans else 0, 1, -1)
        if op == "MatMul" and rank == 2:
            return Layer(node, w.name, None, 1, 0, 1, -1)
        return None

    def layers(self) -> list[Layer]:
        return [layer for node in self.model.graph.node if (layer := self.layer(node)) is not None]

    def owns(self, layer: Layer) -> bool:
        """Whether the layer's weight (and bias) are read by this node only: safe to rewrite."""
        return self.readers_of(layer.weight) == 1 and (layer.bias is None or self.readers_of(layer.bias) == 1)


def per_channel_scale(w: np.ndarray, axis: int) -> np.ndarray:
    """``s_c = max|W_c| / 127`` (float32; 1 where that is below the smallest normal float, as ONNX Runtime does), shaped to broadcast on ``w``."""
    other = tuple(d for d in range(w.ndim) if d != axis)
    amax = np.max(np.abs(w.astype(np.float32)), axis=other, keepdims=True)
    scale = amax / np.float32(127.0)
    return np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``: the INT8 values (as int32) and per-channel scale the targets give weight ``w``."""
    s = per_channel_scale(w, axis)
    q = np.clip(np.round(w.astype(np.float32) / s), -127, 127).astype(np.int32)
    return q, s


def fake_quantize_weight(w: np.ndarray, axis: int) -> np.ndarray:
    """``s * q``: the weight as the INT8 model computes with it (float32)."""
    q, s = quantize_weight(w, axis)
    return (q.astype(np.float32) * s).astype(np.float32)


def run_batches(model: onnx.ModelProto, feeds: Sequence[Feed], names: Sequence[str]) -> Iterator[list[np.ndarray]]:
    """Run ``model`` on each feed and yield the values of tensors ``names`` (any tensors of the graph)."""
    from quantlab.collect import ort_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    session = ort_session(m)
    inputs = [i.name for i in session.get_inputs()]
    for feed in feeds:
        yield session.run(list(names), {k: feed[k] for k in inputs})


def samples_of(feeds: Sequence[Feed]) -> int:
    return sum(next(iter(f.values())).shape[0] for f in feeds)
