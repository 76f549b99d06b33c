"""Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules, without TensorRT.

TensorRT builds an INT8 engine from an ONNX model in which every quantized tensor passes through
``QuantizeLinear`` (Q) and ``DequantizeLinear`` (DQ)::

    x (float) -> Q(scale, zero_point) -> int8 -> DQ(scale, zero_point) -> float -> Conv
    W (int8 initializer) ------------------------> DQ(scale[C_out], 0, axis=0) -> Conv

with ``q = saturate(round(x / scale) + zero_point)`` and ``x' = (q - zero_point) * scale``.
TensorRT accepts only part of what ONNX allows.  :func:`lint_tensorrt` checks these rules, each
with a short id (see :data:`RULES`):

* ``opset``: the default-domain opset is >= 13 (the first with per-axis Q/DQ);
* ``no-qdq``: at least one Q feeds a DQ; otherwise nothing is quantized;
* ``qdq-domain``: Q/DQ come from the ONNX domain, not ONNX Runtime's ``com.microsoft`` ops;
* ``zero-point-type``, ``zero-point-value``, ``zero-point-constant``: every zero-point is a
  constant INT8 0 (symmetric quantization).  A Q without a zero-point outputs UINT8, the ONNX
  default, unless ``output_dtype`` says INT8;
* ``scale-constant``, ``scale-value``, ``scale-shape``: every scale is a constant (an initializer
  or a ``Constant`` output), finite and > 0, a scalar (shape ``[]``) per-tensor or 1-D per-channel.
  A per-tensor scale of shape ``[1]`` is reported: TensorRT wants a true scalar;
* ``int32-bias``: no DQ of an INT32 constant (ONNX Runtime quantizes biases to INT32 unless
  ``QuantizeBias=False``; TensorRT does not take them);
* ``weight-per-channel``, ``weight-axis``, ``weight-channels``: a quantized weight feeding
  Conv/ConvTranspose/Gemm/MatMul as its weight input is per-channel on the output-channel axis
  (Conv 0, ConvTranspose 1, Gemm 0 if ``transB=1`` else 1, MatMul the last axis) with one scale per
  channel.  Per-tensor weights are reported for Conv and ConvTranspose only: TensorRT runs
  per-tensor Gemm/MatMul weights, but convolutions need per-channel scales to keep accuracy;
* ``weight-range``: INT8 weight initializers hold values in -127..127 (symmetric; -128 has no
  positive counterpart);
* ``activation-per-tensor``: Q/DQ of activations (anything but a constant) use one scale;
* ``q-feeds-dq``: every Q output feeds DQ nodes only.

Only the main graph is checked, not the bodies of If/Loop/Scan.  Weights are recognised both as
INT8 initializers read by a DQ (ONNX Runtime's form) and as float initializers passed through Q
then DQ (the fake-quantized form PyTorch exports), whose constant Q TensorRT folds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx

from quantlab.onnxgraph import load_model
from quantlab.qdq.fusion import fusion_advice
from quantlab.qdq.lintindex import LintIndex, LintIssue, int_attribute, node_input

__all__ = ["RULES", "LintIssue", "LintReport", "lint_onnx_file", "lint_tensorrt"]

#: Every rule id :func:`lint_tensorrt` reports, with what it requires.
RULES: Mapping[str, str] = MappingProxyType({
    "opset": "the default-domain opset is >= 13",
    "no-qdq": "at least one QuantizeLinear feeds a DequantizeLinear",
    "qdq-domain": "QuantizeLinear/DequantizeLinear come from the ONNX domain",
    "zero-point-type": "every zero-point (or the implied one) is INT8",
    "zero-point-value": "every zero-point is exactly 0",
    "zero-point-constant": "every zero-point is a constant",
    "scale-constant": "every scale is a constant initializer or Constant output",
    "scale-value": "every scale is finite and > 0",
    "scale-shape": "scales are scalars (per-tensor) or 1-D (per-channel)",
    "int32-bias": "no DequantizeLinear of INT32 constants (quantized biases)",
    "weight-per-channel": "Conv/ConvTranspose weights are quantized per-channel",
    "weight-axis": "per-channel weights are quantized on the output-channel axis",
    "weight-channels": "per-channel weights have one scale per output channel",
    "weight-range": "INT8 weights lie in -127..127",
    "activation-per-tensor": "activations are quantized per-tensor",
    "q-feeds-dq": "every QuantizeLinear output feeds DequantizeLinear nodes only",
})

_Q = "QuantizeLinear"
_DQ = "DequantizeLinear"
_ONNX_DOMAINS = ("", "ai.onnx")
_INT8 = onnx.TensorProto.INT8
_UINT8 = onnx.TensorProto.UINT8
_INT32 = onnx.TensorProto.INT32
_MIN_OPSET = 13


@dataclass(frozen=True)
class LintReport:
    """The outcome of :func:`lint_tensorrt`: truthy when the model breaks no rule.

    ``qdq_nodes`` counts the QuantizeLinear/DequantizeLinear nodes that were checked.
    """

    issues: tuple[LintIssue, ...] = ()
    qdq_nodes: int = 0
    advice: tuple[LintIssue, ...] = ()  # quantlab.qdq.fusion: valid, but TensorRT will not fuse there

    def __bool__(self) -> bool:
        return not self.issues

    @property
    def rules(self) -> tuple[str, ...]:
        """The ids of the broken rules, sorted, each once."""
        return tuple(sorted({issue.rule for issue in self.issues}))

    def summary(self) -> str:
        """A readable multi-line text: a verdict line, then one line per issue."""
        checked = f"{self.qdq_nodes} QuantizeLinear/DequantizeLinear nodes"
        if not self.issues:
            lines = [f"TensorRT Q/DQ lint: passed ({checked} checked)"]
        else:
            count = len(self.issues)
            lines = [f"TensorRT Q/DQ lint: {count} issue{'s' if count != 1 else ''} ({checked})"]
            lines.extend(f"  {issue}" for issue in self.issues)
        if self.advice:
            count = len(self.advice)
            lines.append(f"fusion advice: {count} place{'s' if count != 1 else ''} TensorRT will not fuse")
            lines.extend(f"  {advice}" for advice in self.advice)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary: ``passed``, ``qdq_nodes`` and the list of ``issues``."""
        return {
            "passed": bool(self),
            "qdq_nodes": self.qdq_nodes,
            "issues": [asdict(issue) for issue in self.issues],
            "advice": [asdict(advice) for advice in self.advice],
        }


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def _weight_source(index: LintIndex, node: onnx.NodeProto) -> str | None:
    """The constant a Q/DQ quantizes: its own input, or the input of the Q before a DQ."""
    x = node_input(node, 0)
    if index.is_constant(x):
        return x
    producer = index.producer.get(x)
    if node.op_type == _DQ and producer is not None and producer.op_type == _Q:
        before = node_input(producer, 0)
        if index.is_constant(before):
            return before
    return None


def _normalized_axis(node: onnx.NodeProto, rank: int) -> int:
    axis = int_attribute(node, "axis", 1)
    return axis + rank if axis < 0 else axis


def _expected_weight_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of the weight input of ``consumer``, or None if it has none."""
    op = consumer.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if int_attribute(consumer, "transB", 0) else 1
    if op == "MatMul" and rank >= 2:
        return rank - 1
    return None


class _Linter:
    """One pass over a model's Q/DQ nodes, collecting issues in graph order, each once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = LintIndex(model.graph)
        self.issues: list[LintIssue] = []
        self._seen: set[LintIssue] = set()

    def report(self, rule: str, node: str, tensor: str, message: str) -> None:
        issue = LintIssue(rule=rule, node=node, tensor=tensor, message=message)
        if issue not in self._seen:
            self._seen.add(issue)
            self.issues.append(issue)

    def qdq_nodes(self) -> Iterator[onnx.NodeProto]:
        return (node for node in self.model.graph.node if node.op_type in (_Q, _DQ))

    def run(self) -> LintReport:
        self.check_opset()
        nodes = list(self.qdq_nodes())
        self.check_pairs(nodes)
        for node in nodes:
            self.check_node(node)
        return LintReport(issues=tuple(self.issues), qdq_nodes=len(nodes))

    def check_opset(self) -> None:
        versions = {entry.domain: entry.version for entry in self.model.opset_import}
        version = versions.get("", versions.get("ai.onnx"))
        if version is None:
            self.report(
                "opset", "", "",
                "the model imports no default-domain (ai.onnx) opset; export it with opset >= 13",
            )
        elif version < _MIN_OPSET:
            self.report(
                "opset", "", "",
                f"the model uses opset {version}; TensorRT's per-channel Q/DQ needs opset >= 13: "
                "re-export with opset_version >= 13 or use onnx.version_converter",
            )

    def check_pairs(self, nodes: list[onnx.NodeProto]) -> None:
        for node in nodes:
            if node.op_type != _Q:
                continue
            for consumer in self.index.consumers.get(node.output[0], []):
                if consumer.op_type == _DQ:
                    return
        self.report(
            "no-qdq", "", "",
            "no QuantizeLinear feeds a DequantizeLinear, so nothing is quantized and TensorRT "
            "builds in float; quantize the model for the tensorrt target first",
        )

    def check_node(self, node: onnx.NodeProto) -> None:
        label = self.index.label(node)
        where = f"{node.op_type} '{label}'"
        if node.domain not in _ONNX_DOMAINS:
            self.report(
                "qdq-domain", label, node_input(node, 0),
                f"{where} is from domain '{node.domain}', which TensorRT does not read; "
                "quantize with the ONNX-domain ops (no UseQDQContribOps, INT8 types only)",
            )
        x = node_input(node, 0)
        if node.op_type == _DQ and self.index.is_constant(x) and self.index.elem_type(x) == _INT32:
            self.report(
                "int32-bias", label, x,
                f"{where} dequantizes INT32 tensor '{x}' (a quantized bias); TensorRT takes no "
                "INT32 Q/DQ: keep biases in float (ONNX Runtime: extra_options QuantizeBias=False)",
            )
            return
        scale = self.check_scale(node, label, where)
        self.check_zero_point(node, label, where)
        source = _weight_source(self.index, node)
        if source is None:
            self.check_activation_scale(node, label, where, scale)
            if node.op_type == _Q:
                self.check_q_consumers(node, label, where)
            return
        reported_shape = self.check_weight_scale_shape(node, label, where, scale, source)
        if node.op_type == _DQ:
            if not reported_shape:
                self.check_weight_consumers(node, label, where, scale, source)
            if self.index.is_constant(x):
                self.check_weight_range(node, label, where, x)
        else:
            self.check_q_consumers(node, label, where)

    def check_scale(self, node: onnx.NodeProto, label: str, where: str) -> np.ndarray | None:
        name = node_input(node, 1)
        scale = self.index.array(name)
        if scale is None:
            self.report(
                "scale-constant", label, name,
                f"scale '{name}' of {where} is computed at run time; TensorRT needs a build-time "
                "constant: store it as an initializer",
            )
            return None
        values = scale.astype(np.float64).ravel()
        bad = values[~(np.isfinite(values) & (values > 0))]
        if values.size == 0 or bad.size:
            shown = "an empty tensor" if values.size == 0 else repr(float(bad[0]))
            self.report(
                "scale-value", label, name,
                f"scale '{name}' of {where} holds {shown}; scales must be finite and > 0: "
                "recalibrate, and floor zero ranges to a small positive amax",
            )
        if scale.ndim > 1:
            self.report(
                "scale-shape", label, name,
                f"scale '{name}' of {where} has shape {list(scale.shape)}; TensorRT takes a scalar "
                "(per-tensor) or 1-D (per-channel) scale: no block-wise quantization",
            )
        return scale

    def check_zero_point(self, node: onnx.NodeProto, label: str, where: str) -> None:
        name = node_input(node, 2)
        fix = "quantize to signed INT8 with symmetric ranges (zero-point 0)"
        if not name:
            if node.op_type == _Q:
                output_type = int_attribute(node, "output_dtype", 0) or _UINT8
                if output_type != _INT8:
                    self.report(
                        "zero-point-type", label, node.output[0],
                        f"{where} has no zero-point, so it outputs {_type_name(output_type)} "
                        "(the ONNX default is UINT8); add an INT8 zero-point initializer of 0",
                    )
            else:
                x_type = self.index.elem_type(node_input(node, 0))
                if x_type is not None and x_type != _INT8:
                    self.report(
                        "zero-point-type", label, node_input(node, 0),
                        f"{where} reads {_type_name(x_type)} tensor '{node_input(node, 0)}'; "
                        f"TensorRT needs INT8: {fix}",
                    )
            return
        zp_type = self.index.elem_type(name)
        if zp_type is not None and zp_type != _INT8:
            self.report(
                "zero-point-type", label, name,
                f"zero-point '{name}' of {where} is {_type_name(zp_type)}; TensorRT needs INT8: "
                f"{fix}",
            )
            return
        values = self.index.array(name)
        if values is None:
            self.report(
                "zero-point-constant", label, name,
                f"zero-point '{name}' of {where} is computed at run time; TensorRT needs a "
                "constant INT8 0: store it as an initializer",
            )
        elif np.any(values != 0):
            nonzero = int(values.ravel()[np.flatnonzero(values)[0]])
            self.report(
                "zero-point-value", label, name,
                f"zero-point '{name}' of {where} holds {nonzero}; TensorRT needs exactly 0: "
                "use symmetric quantization (ONNX Runtime: ActivationSymmetric=True, "
                "WeightSymmetric=True)",
            )

    def check_activation_scale(
        self, node: onnx.NodeProto, label: str, where: str, scale: np.ndarray | None
    ) -> None:
        if scale is None or scale.ndim != 1:
            return
        name = node_input(node, 1)
        if scale.size == 1:
            self.report(
                "scale-shape", label, name,
                f"per-tensor scale '{name}' of {where} has shape [1]; TensorRT wants a scalar "
                "(shape []): store the scale as a 0-D initializer",
            )
        else:
            self.report(
                "activation-per-tensor", label, name,
                f"activation '{node_input(node, 0)}' is quantized per-channel by {where} "
                f"({scale.size} scales); TensorRT quantizes activations per-tensor: use one scalar "
                "scale",
            )

    def check_weight_scale_shape(
        self, node: onnx.NodeProto, label: str, where: str, scale: np.ndarray | None, source: str
    ) -> bool:
        """Report a ``[1]`` scale unless it is per-channel over an axis of size 1."""
        if scale is None or scale.ndim != 1 or scale.size != 1:
            return False
        dims = self.index.dims(source) or ()
        axis = _normalized_axis(node, len(dims))
        if 0 <= axis < len(dims) and dims[axis] == 1:
            return False
        name = node_input(node, 1)
        channels = dims[axis] if 0 <= axis < len(dims) else "no"
        self.report(
            "scale-shape", label, name,
            f"scale '{name}' of {where} has shape [1] but weight '{source}' has {channels} "
            f"channels on axis {axis}; use a scalar for per-tensor or one scale per output channel",
        )
        return True

    def check_weight_consumers(
        self, node: onnx.NodeProto, label: str, where: str, scale: np.ndarray | None, source: str
    ) -> None:
        if scale is None:
            return
        dims = self.index.dims(source) or ()
        output = node.output[0]
        for consumer in self.index.consumers.get(output, []):
            if node_input(consumer, 1) != output:
                continue
            expected = _expected_weight_axis(consumer, len(dims))
            if expected is None or expected >= len(dims):
                continue
            target = f"{consumer.op_type} '{self.index.label(consumer)}'"
            if scale.ndim == 0:
                if consumer.op_type in ("Conv", "ConvTranspose"):
                    self.report(
                        "weight-per-channel", label, source,
                        f"weight '{source}' of {target} is quantized per-tensor by {where}; "
                        f"use per-channel scales on axis {expected} (ONNX Runtime: "
                        "per_channel=True)",
                    )
                continue
            if scale.ndim != 1:
                continue
            axis = _normalized_axis(node, len(dims))
            if axis != expected:
                self.report(
                    "weight-axis", label, source,
                    f"weight '{source}' of {target} is quantized on axis {axis} by {where}; its "
                    f"output channels are on axis {expected}: set axis={expected}",
                )
            elif scale.size != dims[expected]:
                self.report(
                    "weight-channels", label, source,
                    f"weight '{source}' of {target} has {dims[expected]} output channels but "
                    f"{where} has {scale.size} scales; give one scale per output channel",
                )

    def check_weight_range(self, node: onnx.NodeProto, label: str, where: str, x: str) -> None:
        if self.index.elem_type(x) != _INT8:
            return
        values = self.index.array(x)
        if values is None or values.size == 0:
            return
        count = int(np.count_nonzero(values < -127))
        if count:
            self.report(
                "weight-range", label, x,
                f"INT8 weight '{x}' read by {where} holds -128 in {count} place"
                f"{'s' if count != 1 else ''}; TensorRT's symmetric weights use -127..127: "
                "requantize with a symmetric weight range (ONNX Runtime: WeightSymmetric=True)",
            )

    def check_q_consumers(self, node: onnx.NodeProto, label: str, where: str) -> None:
        output = node.output[0]
        if output in self.index.outputs:
            self.report(
                "q-feeds-dq", label, output,
                f"output '{output}' of {where} is a graph output; TensorRT expects each "
                "QuantizeLinear to be followed by DequantizeLinear: add one",
            )
        for consumer in self.index.consumers.get(output, []):
            if consumer.op_type != _DQ:
                self.report(
                    "q-feeds-dq", label, output,
                    f"output '{output}' of {where} feeds {consumer.op_type} "
                    f"'{self.index.label(consumer)}'; TensorRT expects each QuantizeLinear to be "
                    "followed by DequantizeLinear: insert one before that node",
                )


def lint_tensorrt(model: onnx.ModelProto | str | os.PathLike[str]) -> LintReport:
    """Check ``model`` (a ModelProto or a path to one) against TensorRT's Q/DQ rules.

    Returns a :class:`LintReport` that is truthy when no rule is broken.  Issues come in graph
    order, after the model-wide ones (``opset``, ``no-qdq``); each names the node and tensor and
    says what to change.

    >>> from onnx import helper, TensorProto
    >>> graph = helper.make_graph(
    ...     [helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> report = lint_tensorrt(model)
    >>> bool(report), report.rules
    (False, ('no-qdq',))
    """
    from dataclasses import replace

    loaded = load_model(model)
    report = _Linter(loaded).run()
    return replace(report, advice=fusion_advice(loaded))


def lint_onnx_file(path: str | os.PathLike[str]) -> LintReport:
    """Lint the ONNX file at ``path`` as ``quantlab lint`` does.

    The model must pass ``onnx.checker``, except when it breaks the ``opset`` rule: below opset 13
    the checker rejects per-channel Q/DQ (``axis`` on ``DequantizeLinear``), the very thing the
    rule explains, so the report says that instead of the checker's message.  A file that is not
    an ONNX model, or fails the checker for another reason, is a :class:`QuantlabError`.
    """
    from quantlab.model import check_onnx, load_onnx

    model = load_onnx(path, checker=False)
    report = lint_tensorrt(model)
    if "opset" not in report.rules:
        check_onnx(model, path)
    return report
