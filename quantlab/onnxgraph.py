"""ONNX graph utilities every stage shares: loading, who writes and reads each tensor, node copies and
renames, topological order.

A graph here is ONNX's: a list of nodes, each reading tensors by name (``node.input``, ``""`` for an
absent optional input) and writing tensors by name (``node.output``); initializers and graph inputs
are written by no node.  In a valid graph every tensor has at most one writer, and the node list is
in topological order: every node reads only tensors written before it.

>>> from onnx import helper
>>> nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "r"], ["y"])]
>>> producers(nodes)
{'r': (0, 0), 'y': (1, 0)}
>>> consumers(nodes), consumers(nodes, each_read=True)
({'x': [0], 'r': [1]}, {'x': [0], 'r': [1, 1]})

Each user of these helpers keeps its own domain look-ups (lint's constants and element types, the
transforms' weighted layers, the per-layer analysis's INT8/FP32 correspondence) on top of
:class:`GraphIndex`.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import onnx

from quantlab.errors import QuantlabError, check

ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]


def load_model(model: ModelLike, what: str = "ONNX") -> onnx.ModelProto:
    """``model`` itself when it is a ``ModelProto``, else the model read from that path.

    The one error policy for models given by the user: a missing file or one that is not an ONNX
    protobuf is a :class:`QuantlabError` naming the path (``what`` says which model, e.g. ``"INT8"``).
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise QuantlabError(f"{what} model must be an onnx.ModelProto or a path to an .onnx file, not {type(model).__name__}")
    p = Path(model)
    check(p.is_file(), f"{what} model '{p}' does not exist: pass the path of an .onnx file")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises DecodeError, onnx ValueError, the OS OSError...
        raise QuantlabError(f"'{p}' is not an ONNX model ({type(exc).__name__}): pass an .onnx file") from None


def node_key(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's name when it has none (names are optional in ONNX)."""
    return node.name or node.output[0]


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs the caller feeds: declared inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, tuple[int, int]]:
    """Tensor -> (index of the node writing it, position among that node's outputs)."""
    return {o: (i, k) for i, n in enumerate(nodes) for k, o in enumerate(n.output) if o}


def consumers(nodes: Iterable[onnx.NodeProto], *, each_read: bool = False) -> dict[str, list[int]]:
    """Tensor -> indices of the nodes reading it, in graph order.

    A node reading a tensor twice (``Add(x, x)``) is listed once, or once per read with ``each_read``
    (what counting readers needs).
    """
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in (n.input if each_read else dict.fromkeys(n.input)):
            if name:
                users.setdefault(name, []).append(i)
    return users


class GraphIndex:
    """Who writes and who reads each tensor of one graph, as of when it was built.

    ``producer[t]`` is the node writing ``t``; ``consumers[t]`` the nodes reading it (see
    :func:`consumers` for ``each_read``); ``outputs`` the graph's output names.
    """

    def __init__(self, graph: onnx.GraphProto, *, each_read: bool = False) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.position = producers(self.nodes)
        self.producer: dict[str, onnx.NodeProto] = {t: self.nodes[i] for t, (i, _) in self.position.items()}
        self.consumers: dict[str, list[onnx.NodeProto]] = {
            t: [self.nodes[i] for i in users] for t, users in consumers(self.nodes, each_read=each_read).items()
        }
        self.outputs = {o.name for o in graph.output}


def copy_node(node: onnx.NodeProto, rename: Callable[[str], str], name: str | None = None) -> onnx.NodeProto:
    """A copy of ``node`` reading and writing ``rename(t)`` for each tensor ``t`` (absent inputs stay
    absent), named ``name`` when given."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.input[:] = [rename(x) if x else x for x in node.input]
    out.output[:] = [rename(x) if x else x for x in node.output]
    if name is not None:
        out.name = name
    return out


def clone(message: Any) -> Any:
    """A deep copy of a protobuf message (node, tensor, value info)."""
    out = type(message)()
    out.CopyFrom(message)
    return out


def renamed_initializer(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """A copy of initializer ``init`` called ``name``."""
    out = clone(init)
    out.name = name
    return out


def rename_tensor(nodes: Iterable[onnx.NodeProto], graph: onnx.GraphProto, old: str, new: str) -> None:
    """Call tensor ``old`` ``new`` everywhere: in ``nodes`` and in the graph's inputs, outputs,
    value infos and initializers (in place)."""
    for node in nodes:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


def stable_toposort(nodes: Sequence[onnx.NodeProto], defined: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in topological order, keeping the given order wherever it is already valid.

    Kahn's algorithm with the ready nodes in a min-heap of their positions: of the nodes whose inputs
    are all written (or in ``defined``: graph inputs, initializers), the earliest comes next.  A cycle
    is a :class:`QuantlabError`.
    """
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
    check(len(order) == len(nodes),
          "the graph has a cycle, so its nodes have no topological order: check the model with onnx.checker")
    return [nodes[i] for i in order]


def check_topological(graph: onnx.GraphProto) -> None:
    """Raise ``ValueError`` unless every node reads only tensors defined before it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        missing = [x for x in node.input if x and x not in defined]
        if missing:
            raise ValueError(f"node '{node_key(node)}' of graph '{graph.name}' reads {missing} before they are defined")
        defined.update(o for o in node.output if o)
    missing = [o.name for o in graph.output if o.name not in defined]
    if missing:
        raise ValueError(f"graph '{graph.name}' outputs {missing} are never defined")
