"""Fake quantizers on a converted ONNX graph, and the trained graph written back as Q/DQ ONNX.

QAT of a model that exists only as ONNX (:mod:`quantlab.qat.convert`) keeps the graph quantlab
calibrated: the quantizers go on the same edges as the Q/DQ nodes of a quantlab PTQ model, start
from the same ranges, and the trained model is written by inserting QuantizeLinear/DequantizeLinear
into the prepared FP32 graph, node names and tensor names unchanged.  The result is therefore a
Q/DQ copy of the FP32 graph, like the PTQ models: ``quantlab compare``'s per-layer analysis and
partial quantization work on it as on them.

**Plan** (:class:`QdqPlan`): which input of which node is fake-quantized.  :func:`plan_from_qdq`
reads it from a Q/DQ model of the same graph (the run's ``int8/<calibrator>.tensorrt.onnx``), so QAT
follows whatever placement quantlab's ``tensorrt`` target chose; :func:`plan_weighted` is the
plain rule for use without a run: every activation input and the weight of each Conv,
ConvTranspose, Gemm and MatMul.

**Quantizers**: modelopt ``TensorQuantizer`` s, signed INT8.  An activation tensor gets one
per-tensor quantizer with ``amax`` from quantlab's ranges (or, for a tensor quantlab has no range
for, modelopt's max calibration over a few batches); each weight one per-channel quantizer on its
output-channel axis (Conv 0, ConvTranspose 1, Gemm ``0 if transB else 1``, MatMul the last) whose
``amax`` is the per-channel ``max |W|`` of the starting weights.  Ranges stay fixed during training;
the straight-through estimator passes gradients inside ``[-amax, amax]`` and zeroes them outside.

**Export** (:func:`export_qdq`): with ``s = amax / 127``, an activation ``x`` becomes
``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)``, which computes
``s * clip(round(x / s), -128, 127)``, the fake quantizer's value; a weight is stored as INT8,
``q = clip(round(W / s_c), -127, 127)`` per output channel ``c``, behind one DequantizeLinear with
``axis``, as ONNX Runtime writes quantlab's PTQ models.  Worked example: ``amax = 2.54`` gives
``s = 0.02``; ``x = 0.4567`` quantizes to ``round(22.835) = 23`` and reads back as ``0.46``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantlab.errors import check
from quantlab.qat.convert import WEIGHTED, OnnxModule

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
Edge = tuple[str, int]  # (node key: its name, or its first output; input position)


def node_key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass(frozen=True)
class QdqPlan:
    """Where the fake quantizers go.

    Attributes:
        activations: quantized activation edges -> the tensor they read.
        weights: quantized weight edges -> ``(initializer, axis)``; ``axis`` None is per-tensor.
        source: where the plan comes from, for reports.
    """

    activations: dict[Edge, str] = field(default_factory=dict)
    weights: dict[Edge, tuple[str, int | None]] = field(default_factory=dict)
    source: str = ""

    @property
    def tensors(self) -> list[str]:
        """The quantized activation tensors, each once, in edge order."""
        return list(dict.fromkeys(self.activations[e] for e in sorted(self.activations)))


def weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of the weight (input 1) of a weighted node, as TensorRT wants it."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        return 0 if transposed else 1
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1
    return None


def plan_weighted(model: onnx.ModelProto) -> QdqPlan:
    """Activation inputs and the constant weight of every Conv, ConvTranspose, Gemm and MatMul."""
    inits = {i.name: i for i in model.graph.initializer}
    plan = QdqPlan(source="inputs of the weighted layers")
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        key = node_key(node)
        for k, name in enumerate(node.input[:2]):
            if not name:
                continue
            if name in inits:
                if k == 1:
                    plan.weights[(key, 1)] = (name, weight_axis(node, len(inits[name].dims)))
            else:
                plan.activations[(key, k)] = name
    return plan


def plan_from_qdq(fp32: onnx.ModelProto, qdq: onnx.ModelProto, source: str = "") -> QdqPlan:
    """The edges ``qdq`` (a Q/DQ model written from ``fp32``) quantizes, in ``fp32``'s names.

    An input of a node is quantized when it reads a DequantizeLinear.  Behind it is either a
    constant (an INT8 weight, or a float weight behind QuantizeLinear): a weight edge, whose FP32
    initializer is the FP32 node's input at the same position; or QuantizeLinear of an activation
    tensor: an activation edge.  Nodes are matched by name (by first output when unnamed).
    """
    consts = {i.name for i in qdq.graph.initializer}
    consts.update(o for n in qdq.graph.node if n.op_type == "Constant" for o in n.output)
    q_inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    f_nodes = {node_key(n): n for n in fp32.graph.node}
    f_inits = {i.name for i in fp32.graph.initializer}
    plan = QdqPlan(source=source)
    for node in qdq.graph.node:
        if node.op_type in (_Q, _DQ):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != _DQ:
                continue
            key = node_key(node)
            f = f_nodes.get(key)
            check(
                f is not None and f.op_type == node.op_type and k < len(f.input),
                f"the Q/DQ model's node '{key}' ({node.op_type}) has no counterpart in the FP32 model: "
                "pass a Q/DQ model quantlab wrote from this FP32 model",
            )
            behind = dq.input[0]
            q = producer.get(behind)
            if q is not None and q.op_type == _Q:
                behind = q.input[0]
            if behind in consts:
                check(f.input[k] in f_inits, f"the Q/DQ model quantizes input {k} of '{key}' as a weight, "
                      "but the FP32 model's input there is not an initializer: pass the matching FP32 model")
                scale = q_inits.get(dq.input[1])
                per_channel = scale is not None and len(scale.dims) == 1
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                rank = len(next(i for i in fp32.graph.initializer if i.name == f.input[k]).dims)
                plan.weights[(key, k)] = (f.input[k], (axis + rank if axis < 0 else axis) if per_channel else None)
            else:
                check(f.input[k] == behind, f"the Q/DQ model quantizes '{behind}' at input {k} of '{key}', where the "
                      f"FP32 model reads '{f.input[k]}': pass a Q/DQ model quantlab wrote from this FP32 model")
                plan.activations[(key, k)] = behind
    check(plan.activations or plan.weights, "the Q/DQ model quantizes nothing: pass a quantlab INT8 Q/DQ model")
    return plan


# ---------------------------------------------------------------------------------------- quantizers


@dataclass
class Quantizers:
    """The quantizers :func:`attach_quantizers` put on a converted model.

    ``mapped`` activation tensors took quantlab's amax; ``fallback`` ones need modelopt's max
    calibration (:func:`calibrate_fallback`).
    """

    activations: dict[str, str]  # tensor -> quantizer name
    weights: dict[str, str]  # initializer -> quantizer name
    mapped: list[str]
    fallback: list[str]


def _tensor_quantizer(axis: int | None) -> Any:
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=axis))


def attach_quantizers(module: OnnxModule, plan: QdqPlan, amax: Mapping[str, float]) -> Quantizers:
    """Put signed INT8 fake quantizers on ``plan``'s edges of ``module`` (see the module docstring)."""
    import torch

    acts: dict[str, str] = {}
    mapped, fallback = [], []
    for edge in sorted(plan.activations):
        tensor = plan.activations[edge]
        if tensor not in acts:
            acts[tensor] = f"a{len(acts)}"
            q = _tensor_quantizer(None)
            value = amax.get(tensor)
            if value is not None and np.isfinite(value) and value > 0:
                q.amax = torch.tensor(float(value))
                mapped.append(tensor)
            else:
                fallback.append(tensor)
            module.set_quantizer(edge[0], edge[1], acts[tensor], q)
        else:
            module.set_quantizer(edge[0], edge[1], acts[tensor], module.quantizers[acts[tensor]])
    weights: dict[str, str] = {}
    for edge in sorted(plan.weights):
        name, axis = plan.weights[edge]
        if name not in weights:
            weights[name] = f"w{len(weights)}"
            q = _tensor_quantizer(axis)
            w = module.initializer(name).detach()
            q.enable_calib()
            q.disable_quant()
            q(w)  # modelopt's max calibrator: per-channel max |W| on ``axis``
            q.load_calib_amax()
            q.disable_calib()
            q.enable_quant()
            module.set_quantizer(edge[0], edge[1], weights[name], q)
        else:
            module.set_quantizer(edge[0], edge[1], weights[name], module.quantizers[weights[name]])
    return Quantizers(acts, weights, mapped, fallback)


def calibrate_fallback(module: OnnxModule, quantizers: Quantizers, batches: Iterable[list[Any]]) -> None:
    """Max-calibrate the activation quantizers quantlab had no range for, on ``batches`` of inputs."""
    import torch

    names = [quantizers.activations[t] for t in quantizers.fallback]
    if not names:
        return
    chosen = [module.quantizers[n] for n in names]
    others = [q for n, q in module.quantizers.items() if n not in names]
    for q in chosen:
        q.enable_calib()
        q.disable_quant()
    for q in others:
        q.disable_quant()  # calibrate on FP32 activations, as quantlab's statistics were
    with torch.no_grad():
        for inputs in batches:
            module(*inputs)
    for q in chosen:
        q.load_calib_amax(strict=False)
        if not torch.isfinite(q.amax).all() or float(q.amax.max()) <= 0:
            q.amax = torch.tensor(1e-8)  # the tensor never took a nonzero value: any scale > 0 works
        q.disable_calib()
    for q in (*chosen, *others):
        q.enable_quant()


def set_quantizers(module: OnnxModule, enabled: bool) -> None:
    """Switch every quantizer of ``module`` on (fake INT8) or off (FP32)."""
    for q in module.quantizers.values():
        q.enable() if enabled else q.disable()


# ------------------------------------------------------------------------------------------- export


def _amax(q: Any) -> np.ndarray:
    value = q.amax.detach().float().cpu().numpy()
    return np.maximum(value, np.float32(1e-8))  # a zero range must never give scale 0


def _scale(q: Any) -> np.ndarray:
    """The Q/DQ scale of a weight quantizer: ``amax / 127``, or a learned quantizer's own step (the
    very float32 value its fake quantization used, see :mod:`quantlab.qat.ranges`)."""
    if hasattr(q, "log_step"):
        return q.step.detach().float().cpu().numpy()
    return (_amax(q) / 127.0).astype(np.float32)


def _activation_scale(q: Any) -> np.float32:
    """The per-tensor Q/DQ scale of an activation quantizer (``amax / 127`` rounded once to float32)."""
    if hasattr(q, "log_step"):
        return np.float32(_scale(q).reshape(-1)[0])
    return np.float32(float(_amax(q).reshape(-1)[0]) / 127.0)


def export_qdq(module: OnnxModule, fp32: onnx.ModelProto, plan: QdqPlan, quantizers: Quantizers) -> onnx.ModelProto:
    """The prepared FP32 graph with ``module``'s trained weights and its quantizers as Q/DQ nodes."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    trained: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if module.is_trainable(init.name):
            value = module.initializer(init.name).detach().cpu().numpy()
            trained[init.name] = value.astype(numpy_helper.to_array(init).dtype)
    new_inits: list[onnx.TensorProto] = []
    zero = np.zeros((), dtype=np.int8)
    # weights: INT8 initializer behind one DequantizeLinear per weight
    w_out: dict[str, str] = {}
    w_nodes: dict[str, onnx.NodeProto] = {}
    for name, qname in quantizers.weights.items():
        q = module.quantizers[qname]
        w = module.initializer(name).detach().float().cpu().numpy()
        axis = next(a for e, (n, a) in plan.weights.items() if n == name)
        scale = _scale(q)
        ints = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        if axis is None:
            scale_arr, zp = scale.reshape(()), zero
        else:
            scale_arr = scale.reshape(-1)
            zp = np.zeros(scale_arr.shape, dtype=np.int8)
        new_inits += [numpy_helper.from_array(ints, f"{name}_quantized"),
                      numpy_helper.from_array(scale_arr, f"{name}_scale"),
                      numpy_helper.from_array(zp, f"{name}_zero_point")]
        attrs = {} if axis is None else {"axis": axis}
        w_out[name] = f"{name}_DequantizeLinear_Output"
        w_nodes[name] = helper.make_node(_DQ, [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                         [w_out[name]], name=f"{name}_DequantizeLinear", **attrs)
    # activations: QuantizeLinear -> DequantizeLinear per tensor
    a_out: dict[str, str] = {}
    a_nodes: dict[str, list[onnx.NodeProto]] = {}
    for tensor, qname in quantizers.activations.items():
        scale = _activation_scale(module.quantizers[qname])
        new_inits += [numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{tensor}_scale"),
                      numpy_helper.from_array(zero, f"{tensor}_zero_point")]
        qo, a_out[tensor] = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        a_nodes[tensor] = [
            helper.make_node(_Q, [tensor, f"{tensor}_scale", f"{tensor}_zero_point"], [qo], name=f"{tensor}_QuantizeLinear"),
            helper.make_node(_DQ, [qo, f"{tensor}_scale", f"{tensor}_zero_point"], [a_out[tensor]],
                             name=f"{tensor}_DequantizeLinear"),
        ]
    nodes: list[onnx.NodeProto] = []
    emitted: set[str] = set()
    still_float: set[str] = set()  # weights some reader keeps reading in float
    for node in graph.node:
        key = node_key(node)
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(node.input):
            if (key, k) in plan.weights:
                if name not in emitted:
                    nodes.append(w_nodes[name])
                    emitted.add(name)
                new.input[k] = w_out[name]
            elif (key, k) in plan.activations:
                if name not in emitted:
                    nodes.extend(a_nodes[name])
                    emitted.add(name)
                new.input[k] = a_out[name]
            elif name:
                still_float.add(name)
        nodes.append(new)
    kept = []
    for init in graph.initializer:
        if init.name in quantizers.weights and init.name not in still_float:
            continue  # stored as INT8 only
        kept.append(numpy_helper.from_array(trained[init.name], init.name) if init.name in trained else init)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return model
