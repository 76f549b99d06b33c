"""Targets: how a calibrated model becomes a deployable Q/DQ ONNX model.

quantlab computes every activation range itself and hands them to ONNX Runtime's maintained Q/DQ
rewriter (``quantize_static`` with a precomputed range cache), which places the nodes.  Two targets:

``tensorrt``
    Signed INT8, symmetric, zero-point 0 everywhere; weights per channel on the output-channel axis
    in [-127, 127]; scale ``amax / 127``; no INT32 bias quantization; Q/DQ where TensorRT fuses
    them: the inputs of weighted layers, the skip input of residual adds, pooling and Concat where
    INT8 flows through them (:mod:`quantlab.qdq.placement`).
``ort-cpu``
    U8 activations with zero-points (``s = (hi - lo) / 255``, ``zp = round(-lo / s)``), S8 symmetric
    per-channel weights, INT32 biases: the combination ONNX Runtime's CPU kernels (VNNI) run fastest;
    weighted layers always, other ops where INT8 reaches them (:mod:`quantlab.qdq.placement`).

A zero range never yields a zero scale: an all-zero tensor gets the range [-1, 1] (symmetric) or
[0, 1] (asymmetric); any scale represents 0 exactly.

Writing one model per calibrator: the Q/DQ graph ONNX Runtime builds depends on the model and the
target, never on the ranges; the ranges only set each activation's ``<tensor>_scale`` and
``<tensor>_zero_point`` initializers and, where biases are quantized to INT32, the bias
initializers derived from them.  :func:`plan_rewrite` maps those initializers of a model
``quantize_static`` wrote; :meth:`QdqRewrite.apply` then recomputes them for other ranges with
ONNX Runtime's own arithmetic, giving the model ``quantize_static`` would write, byte for byte, at a
small fraction of its cost.  Whatever cannot be mapped with certainty makes the caller fall back to
``quantize_static``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantlab.calibrators import Calibrator, asymmetric_range
from quantlab.errors import QuantlabError
from quantlab.onnxgraph import GraphIndex, consumers, load_model
from quantlab.qdq.placement import Placement, plan_placement, release_float_inputs
from quantlab.stats import StatsSet

@dataclass(frozen=True)
class Target:
    """A deployment target's quantization scheme (see the module docstring)."""

    name: str
    symmetric: bool
    quantize_bias: bool
    description: str
    runtime: str  # the backend its models are built for: their latency means something only there

    def uses_unsigned(self, stats_min: float) -> bool:
        """Whether a tensor with this minimum is quantized over [0, amax] with 256 levels."""
        return not self.symmetric and stats_min >= 0.0


TARGETS: dict[str, Target] = {
    "tensorrt": Target("tensorrt", True, False, "S8 symmetric activations and weights, for TensorRT", "tensorrt"),
    "ort-cpu": Target("ort-cpu", False, True, "U8 asymmetric activations, S8 per-channel weights, for ONNX Runtime CPU",
                      "onnxruntime"),
}


def runtime_of(target: str | None) -> str | None:
    """The backend a target's INT8 models are built for (``ort-dynamic``: ONNX Runtime); ``None``
    for float engines, which every backend runs as they are."""
    if target is None:
        return None
    return TARGETS[target].runtime if target in TARGETS else "onnxruntime"


@dataclass(frozen=True)
class TensorRange:
    """The range one activation gets: ``amax`` from the calibrator and the ``[lo, hi]`` used."""

    amax: float
    lo: float
    hi: float


def compute_ranges(stats: StatsSet, calibrator: Calibrator, target: Target) -> dict[str, TensorRange]:
    """Range of every calibrated and folded tensor for one calibrator and target."""
    ranges: dict[str, TensorRange] = {}
    for name, st in stats.tensors.items():
        amax = float(calibrator.compute_amax(st, unsigned=target.uses_unsigned(st.min)))
        if not amax > 0.0:
            amax = st.amax if st.amax > 0.0 else 1.0
        if target.symmetric:
            lo, hi = -amax, amax
        else:
            lo, hi = asymmetric_range(st, amax)
            if hi - lo <= 0.0:
                lo, hi = 0.0, amax
        ranges[name] = TensorRange(amax, lo, hi)
    for name, source in stats.folded.items():
        ranges[name] = ranges[source]
    return ranges


FILL_VALUE = 1e30  # |x| at least this is a fill value (an attention mask's -3.4e38), not a measurement


def fill_value_tensors(stats: StatsSet) -> list[str]:
    """Calibrated tensors whose range reaches a fill value such as the -3.4e38 of an attention mask.

    One INT8 scale cannot hold both such a value and the ordinary values beside it: the scale of
    ``-3.4e38 / 255`` sends every attention score to the zero point.  These tensors stay in float.
    """
    fills = {n for n, st in stats.tensors.items() if max(abs(st.min), abs(st.max)) >= FILL_VALUE}
    return sorted(fills | {n for n, source in stats.folded.items() if source in fills})


def float_nodes(model: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    """Names of the nodes that write or read any of ``tensors``: kept in float so none is quantized."""
    wanted = set(tensors)
    return sorted(
        n.name for n in model.graph.node
        if n.name and n.op_type not in _QDQ_OPS and (wanted & set(n.input) or wanted & set(n.output))
    )


def _tensors_data(ranges: dict[str, TensorRange]) -> Any:
    """The ranges as ONNX Runtime's calibration cache holds them (MinMax ``TensorsData``)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    data = {
        name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi)) for name, r in sorted(ranges.items())
    }
    return TensorsData(CalibrationMethod.MinMax, data)


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's quantization tools log and warn freely; keep them quiet while they run."""
    quiet = logging.getLogger("root"), logging.getLogger()
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def write_qdq_model(
    model_path: str | Path, ranges: dict[str, TensorRange], target: Target, out: str | Path,
    exclude: Iterable[str] = (),
) -> None:
    """Write the Q/DQ model of ``target`` with the given activation ranges to ``out``.

    The nodes quantized are those of :func:`~quantlab.qdq.placement.plan_placement`; ``exclude``
    names nodes left in float.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    placement = placement_for(load_model(model_path, "FP32"), target, exclude)
    extra: dict[str, object] = {"ActivationSymmetric": target.symmetric, "WeightSymmetric": True}
    kwargs: dict[str, object] = {
        "op_types_to_quantize": list(placement.op_types), "nodes_to_quantize": list(placement.nodes),
    }
    extra["OpTypesToExcludeOutputQuantization"] = list(placement.exclude_output)
    if not target.quantize_bias:
        extra["QuantizeBias"] = False
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".quantlab-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(_tensors_data(ranges), cache)
        dst = Path(tmp) / "model.onnx"
        with _quiet_onnxruntime():
            quantize_static(
                str(_private_path(model_path, tmp)), str(dst), None,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if target.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
                extra_options=extra,
                **kwargs,
            )
        model = onnx.load(str(dst))
        release_float_inputs(model, placement)
        onnx.save(model, str(dst))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dst, out)


def _private_path(model_path: str | Path, tmp: str) -> Path:
    """A link to ``model_path`` inside ``tmp``, the path handed to ONNX Runtime's quantizers.

    They write ``<model>-inferred.onnx`` beside the model they read and delete it afterwards; two
    runs quantizing the same cached prepared model at once would delete each other's file.
    """
    link = Path(tmp) / "input.onnx"
    os.symlink(Path(model_path).resolve(), link)
    return link


DYNAMIC_TARGET = "ort-dynamic"
DYNAMIC_CALIBRATOR = "dynamic"  # the label of the one ort-dynamic model a run writes: no calibrator sets it


def check_dynamic(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> None:
    """A one-line error when ``ort-dynamic`` finds nothing to quantize in ``model`` (what ``exclude`` leaves)."""
    inits, excluded = {i.name for i in model.graph.initializer}, set(exclude)
    if not any(
        n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in excluded and any(i in inits for i in n.input[:2])
        for n in model.graph.node
    ):
        raise QuantlabError(
            f"target {DYNAMIC_TARGET} quantizes Conv, Gemm and MatMul nodes with constant weights, and the model has none "
            "(or all are kept in float): pass a model with weighted layers, or drop them from [ptq] exclude"
        )


def write_dynamic_model(model_path: str | Path, out: str | Path, exclude: Iterable[str] = ()) -> None:
    """Write the ``ort-dynamic`` model: ONNX Runtime's dynamic quantization (``quantize_dynamic``).

    Weights are S8 symmetric per output channel, stored as INT8; activations are quantized at run
    time, per tensor and per batch, from their actual min and max (``DynamicQuantizeLinear``: U8,
    ``s = (max(x, 0) - min(x, 0)) / 255``), so no calibration range is involved and every
    calibrator gives the same model.  ``exclude`` names nodes left in float.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    check_dynamic(load_model(model_path, "FP32"), exclude)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".quantlab-") as tmp:
        dst = Path(tmp) / "model.onnx"
        with _quiet_onnxruntime():
            quantize_dynamic(
                str(_private_path(model_path, tmp)), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(exclude) or None,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dst, out)


def placement_for(model: onnx.ModelProto, target: Target, exclude: Iterable[str] = ()) -> Placement:
    """Where ``target`` puts Q/DQ in ``model``; a one-line error when it quantizes nothing there."""
    placement = plan_placement(model, target.name, exclude)
    if not placement:
        raise QuantlabError(
            f"target {target.name} quantizes the activation inputs of Conv, ConvTranspose, Gemm and MatMul nodes, "
            "and the model has none that reads an activation (or all are kept in float): pass a model with weighted "
            "layers, or drop them from [ptq] exclude"
        )
    return placement


# ONNX Runtime's name for the float tensor in front of the Q/DQ pair of a quantized graph output
_RENAMED_OUTPUT_SUFFIX = "_QuantizeLinear_Input"


@dataclass(frozen=True)
class QuantParam:
    """One quantized tensor of a Q/DQ model as deployed: its scale(s) and zero-point(s)."""

    tensor: str
    kind: str  # "activation" or "weight"
    dtype: str  # "int8" or "uint8"
    axis: int | None
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]


def read_quant_params(model: onnx.ModelProto) -> list[QuantParam]:
    """Scales and zero-points of every Q/DQ-quantized tensor, read back from the model itself.

    Activations come from ``QuantizeLinear`` nodes (input = the float tensor); weights from
    ``DequantizeLinear`` nodes whose input is an INT8 initializer (the original weight name is kept
    without ONNX Runtime's ``_quantized`` suffix).  INT32 bias DQ nodes are left out.  A graph output
    that ONNX Runtime quantizes keeps its name on the DequantizeLinear output, and the float tensor
    its producer writes is renamed ``<output>_QuantizeLinear_Input``: it is reported as ``<output>``.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]) if name in inits else np.array([])

    params: dict[tuple[str, str], QuantParam] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        x = node.input[0]
        is_weight = node.op_type == "DequantizeLinear" and x in inits
        if node.op_type == "DequantizeLinear" and not is_weight:
            continue
        zp = value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if is_weight and value(x).dtype == np.int32:
            continue
        scale = value(node.input[1]).astype(np.float64).ravel()
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else None
        if is_weight:
            name = x.removesuffix("_quantized")
        else:
            name = x.removesuffix(_RENAMED_OUTPUT_SUFFIX) if x.removesuffix(_RENAMED_OUTPUT_SUFFIX) in outputs else x
        kind = "weight" if is_weight else "activation"
        params.setdefault(
            (kind, name),
            QuantParam(name, kind, str(zp.dtype), axis, tuple(float(s) for s in scale), tuple(int(z) for z in zp.ravel())),
        )
    return list(params.values())


# --- one quantize_static call per target: the other calibrators rewrite its model ------------------

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
_NORM_OPS = ("InstanceNormalization", "LayerNormalization", "BatchNormalization")


def _activation_qtype(target: Target) -> int:
    return onnx.TensorProto.INT8 if target.symmetric else onnx.TensorProto.UINT8


def ort_tensor_ranges(
    fp32: onnx.ModelProto, ranges: dict[str, TensorRange], target: Target, placement: Placement
) -> dict[str, Any] | None:
    """The range (a ``TensorData``) ONNX Runtime quantizes each activation with; ``None`` if it would fail.

    The ranges are read back from the JSON of the calibration cache, as ``quantize_static`` reads
    them, then adjusted on the FP32 graph as its ``adjust_tensor_ranges`` does: the input of a Relu
    or Clip that is quantized and is that input's only reader takes the output's range; the output
    of a quantized Softmax gets [0, 1].
    """
    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder, TensorData, TensorsData

    cache = json.loads(json.dumps(_tensors_data(ranges).to_dict(), cls=CalibrationCacheEncoder))
    read = dict(TensorsData.from_dict(cache).items())
    quantized = set(placement.nodes)
    readers = Counter(name for node in fp32.graph.node for name in node.input if name)
    for node in fp32.graph.node:
        if node.name not in quantized:
            continue
        if node.op_type in ("Clip", "Relu"):
            x, y = node.input[0], node.output[0]
            if readers[x] == 1 and x in read and y in read:
                read[x] = read[y]
        elif node.op_type == "Softmax":
            if node.output[0] not in read:
                return None
            read[node.output[0]] = TensorData(lowest=np.float32(0.0), highest=np.float32(1.0))
    return read


def activation_params(data: Any, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """``(zero_point, scale)`` ONNX Runtime computes for an activation range (``calc_quant_params``)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(_activation_qtype(target), reduce_range=False, symmetric=target.symmetric)
    rmin, rmax = data.range_value
    zero, scale = compute_scale_zp(rmin, rmax, qmin, qmax, target.symmetric, None)
    return zero.squeeze(), scale.squeeze()


def _scale_zp_initializers(name: str, zero: np.ndarray, scale: np.ndarray, qtype: int) -> list[onnx.TensorProto]:
    """``<name>_scale`` and ``<name>_zero_point`` built as ONNX Runtime builds them."""
    scale_type = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16}[scale.dtype]
    return [
        onnx.helper.make_tensor(f"{name}_scale", scale_type, scale.shape, scale.ravel().tolist()),
        onnx.helper.make_tensor(f"{name}_zero_point", qtype, zero.shape, zero.ravel().tolist()),
    ]


def _bias_floor(bias: np.ndarray, per_tensor: bool) -> np.ndarray:
    """The smallest ``input_scale * weight_scale`` ONNX Runtime accepts for a bias (per channel or for all)."""
    int32 = np.iinfo(np.int32)
    qrange = np.array(int32.max, dtype=np.float64) - np.array(int32.min + 1, dtype=np.float64)
    if per_tensor:
        rmin = np.minimum(bias.min(), np.array(0, dtype=np.float64))
        rmax = np.maximum(bias.max(), np.array(0, dtype=np.float64))
        return 1.0001 * (2.0 * np.maximum(np.abs(rmin), np.abs(rmax))) / qrange
    return 1.0001 * (2.0 * np.abs(bias)) / qrange


def _adjusted_weight_scale(input_scale: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The weight scale once ONNX Runtime has kept ``bias`` within INT32.

    ``quantize_static`` enlarges the scale of a weight wherever ``input_scale * weight_scale`` is below
    ``1.0001 * 2 |bias| / (2**32 - 2)``, by that ratio (``QDQQuantizer._adjust_weight_scale_for_int32_bias``,
    which has no public counterpart): the same expressions in the same dtypes, element by element.
    """
    if not weight_scale.size:
        return weight_scale
    smallest = _bias_floor(bias, weight_scale.ndim == 0)
    w = weight_scale.astype(np.float64)
    candidate = np.array(input_scale.item(), dtype=np.float64) * w
    low = (candidate < smallest) & (candidate > 0.0)
    if not low.any():
        return weight_scale
    out = weight_scale.copy()
    out[low] = (w * (smallest / np.where(low, candidate, 1.0)))[low].astype(weight_scale.dtype)
    return out


def _unadjusted_weight_scale(
    weight: onnx.TensorProto, axis: int | None, scale: np.ndarray, input_scale: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """A weight's scale before the bias adjustment, from the ``scale`` a model holds after it.

    An element well above the floor of :func:`_bias_floor` was not adjusted and is kept; any other is
    recomputed from the FP32 weight with ONNX Runtime's ``compute_data_quant_params`` (S8 symmetric).
    """
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, tensor_proto_to_array

    candidate = np.float64(input_scale.item()) * scale.astype(np.float64)
    near = ~(candidate > 2.0 * _bias_floor(bias, scale.ndim == 0))
    if not near.any():
        return scale
    data = tensor_proto_to_array(weight)
    if axis is None:
        return compute_data_quant_params(data.flatten(), onnx.TensorProto.INT8, True)[1]
    out = scale.copy()
    for i in np.flatnonzero(near):
        out[i] = compute_data_quant_params(data.take(i, axis).ravel(), onnx.TensorProto.INT8, True)[1]
    return out


def _requantized_weight(
    weight: onnx.TensorProto, axis: int | None, zero: np.ndarray, scale: np.ndarray, old_scale: np.ndarray,
    old: onnx.TensorProto,
) -> onnx.TensorProto:
    """``<weight>_quantized`` for a new ``scale``, requantizing only the channels whose scale changed.

    Per channel this is what ONNX Runtime's ``quantize_onnx_initializer`` does (``quantize_nparray``
    on each channel), so the result is the same array.
    """
    from onnx import numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_nparray, quantize_onnx_initializer, tensor_proto_to_array

    if axis is None:
        return quantize_onnx_initializer(weight, onnx.TensorProto.INT8, zero, scale, None)
    data = tensor_proto_to_array(weight)
    q = numpy_helper.to_array(old).copy()
    for i in np.flatnonzero(scale != old_scale):
        index = tuple(i if d == axis else slice(None) for d in range(q.ndim))
        channel = quantize_nparray(onnx.TensorProto.INT8, data.take(i, axis).ravel(), scale[i], zero[i])
        q[index] = channel.reshape(q[index].shape)
    return numpy_helper.from_array(q, old.name)


@dataclass(frozen=True)
class _Linked:
    """A weight whose node also has a bias: its scale, and the INT32 bias, follow the input's scale."""

    input: str  # the activation the node reads
    weight: onnx.TensorProto  # FP32
    axis: int | None
    zero_point: np.ndarray
    scale: np.ndarray  # before the bias adjustment
    bias_name: str
    bias: np.ndarray  # FP32
    beta: float
    bias_input_scale: str | None  # scale initializer the INT32 bias follows; None: bias left in float


class QdqRewrite:
    """A Q/DQ model ``quantize_static`` wrote, ready to take other ranges (see :func:`plan_rewrite`)."""

    def __init__(
        self, fp32: onnx.ModelProto, base: onnx.ModelProto, target: Target, keys: set[str], tensors: list[str],
        linked: list[_Linked], placement: Placement,
    ) -> None:
        self._placement = placement
        self._fp32 = fp32
        self._base = base
        self._target = target
        self._keys = keys
        self._tensors = tensors
        self._linked = linked
        self._index = {init.name: i for i, init in enumerate(base.graph.initializer)}

    def initializers(self, ranges: dict[str, TensorRange]) -> dict[str, onnx.TensorProto] | None:
        """Every range-dependent initializer for ``ranges``; ``None`` when they cannot be derived with certainty.

        A weight whose scale the bias adjustment leaves as in the model rewritten is left out (so are
        its quantized values, which only depend on that scale).
        """
        from onnx import numpy_helper

        if set(ranges) != self._keys:
            return None
        read = ort_tensor_ranges(self._fp32, ranges, self._target, self._placement)
        if read is None or any(t not in read for t in self._tensors) or any(k.input not in read for k in self._linked):
            return None
        qtype = _activation_qtype(self._target)
        out: dict[str, onnx.TensorProto] = {}
        for tensor in self._tensors:
            out.update((i.name, i) for i in _scale_zp_initializers(tensor, *activation_params(read[tensor], self._target), qtype))
        base = self._base.graph.initializer
        for k in self._linked:
            input_scale = np.asarray(activation_params(read[k.input], self._target)[1], dtype=np.float32)
            scale = _adjusted_weight_scale(input_scale, k.scale, k.bias)
            scale_init, _ = _scale_zp_initializers(k.weight.name, k.zero_point, scale, onnx.TensorProto.INT8)
            old_scale = numpy_helper.to_array(base[self._index[scale_init.name]])
            if scale.dtype != old_scale.dtype or scale.shape != old_scale.shape or (scale != old_scale).any():
                out[scale_init.name] = scale_init
                old = base[self._index[f"{k.weight.name}_quantized"]]
                out[old.name] = _requantized_weight(k.weight, k.axis, k.zero_point, scale, old_scale, old)
            if k.bias_input_scale is not None:
                # BaseQuantizer.quantize_bias_static_impl: scale input * weight * beta, zero-point 0
                bias_scale = numpy_helper.to_array(out[k.bias_input_scale]) * numpy_helper.to_array(scale_init) * k.beta
                q = np.asarray(k.bias, dtype=np.float64) / np.asarray(bias_scale, dtype=np.float64)
                q = np.clip(q.round(), np.float64(np.iinfo(np.int32).min), np.float64(np.iinfo(np.int32).max))
                name = f"{k.bias_name}_quantized"
                out[name] = numpy_helper.from_array(q.astype(np.int32).reshape(k.bias.shape), name)
                scale_data = np.asarray(bias_scale, dtype=k.bias.dtype).reshape(-1)
                out[f"{name}_scale"] = numpy_helper.from_array(scale_data, f"{name}_scale")
        return out

    def apply(self, ranges: dict[str, TensorRange]) -> onnx.ModelProto | None:
        """The model ``quantize_static`` writes for ``ranges``, or ``None``: then call it instead."""
        values = self.initializers(ranges)
        if values is None:
            return None
        model = onnx.ModelProto()
        model.CopyFrom(self._base)
        inits = model.graph.initializer
        for name, init in values.items():
            inits[self._index[name]].CopyFrom(init)
        return model


def plan_rewrite(
    fp32: onnx.ModelProto, base: onnx.ModelProto, ranges: dict[str, TensorRange], target: Target,
    exclude: Iterable[str] = (),
) -> QdqRewrite | None:
    """Map the range-dependent initializers of ``base``, the model ``write_qdq_model`` wrote for ``ranges``.

    ``exclude`` is what ``write_qdq_model`` was given.

    Activations: every Q/DQ node of a tensor reads ``<t>_scale`` and ``<t>_zero_point`` (``t`` the
    tensor whose range sets them; a tensor sharing its input's parameters reads the input's), used
    by Q/DQ nodes only.  Weights of a Conv, ConvTranspose or Gemm with an FP32 bias: the weight's
    scale (enlarged where the bias would overflow INT32) and, where the bias is quantized
    (``ort-cpu``), ``<b>_quantized`` and its scale.  ``None`` when anything else is met, or when
    recomputing ``ranges`` does not give back every one of those initializers of ``base`` exactly.
    """
    from onnx import numpy_helper
    from onnxruntime.quantization.operators.gemm import get_beta

    graph = base.graph
    inits = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    fp32_inits = {init.name: init for init in fp32.graph.initializer}
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    if (
        len(inits) != len(graph.initializer) or len(nodes) != len(graph.node) or "" in nodes
        or len(fp32_nodes) != len(fp32.graph.node) or "" in fp32_nodes
        or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)
    ):
        return None
    producer = GraphIndex(graph).producer
    fp32_readers = Counter({t: len(users) for t, users in consumers(fp32.graph.node, each_read=True).items()})

    weights: dict[str, onnx.NodeProto] = {}  # DequantizeLinear of a quantized weight, by its input
    biases: dict[str, onnx.NodeProto] = {}  # DequantizeLinear of an INT32 bias, by its output
    tensors: set[str] = set()
    for node in graph.node:
        if node.op_type not in _QDQ_OPS:
            continue
        if node.domain not in ("", "ai.onnx") or len(node.input) != 3 or not all(i in inits for i in node.input[1:]):
            return None
        x, s, z = node.input
        if x in inits:
            if node.op_type != "DequantizeLinear":
                return None
            if inits[x].data_type == onnx.TensorProto.INT32:
                biases[node.output[0]] = node
            else:
                weights[x] = node
            continue
        t = s.removesuffix("_scale")
        if t == s or z != f"{t}_zero_point":
            return None
        tensors.add(t)
    params = {f"{t}_scale" for t in tensors} | {f"{t}_zero_point" for t in tensors}
    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    if params & io or any(set(n.input[1:]) & params for n in [*weights.values(), *biases.values()]):
        return None
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in params and not (node.op_type in _QDQ_OPS and i in (1, 2) and node.input[0] not in inits):
                return None

    placement = placement_for(fp32, target, exclude)
    read = ort_tensor_ranges(fp32, ranges, target, placement)
    if read is None:
        return None
    linked: list[_Linked] = []
    used_biases: set[str] = set()
    quantized = set(placement.nodes)
    for original in fp32.graph.node:
        if original.op_type in _NORM_OPS and original.name in quantized:
            return None  # ONNX Runtime quantizes their bias too
        if original.op_type not in _BIAS_OPS or original.name not in quantized or len(original.input) < 3:
            continue
        x, w, b = original.input[:3]
        source = fp32_inits.get(b)
        if source is None:
            continue  # no constant bias: nothing follows the input's scale
        node = nodes.get(original.name)
        if node is None or node.op_type != original.op_type or len(node.input) != 3:
            return None
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if (
            source.data_type != onnx.TensorProto.FLOAT or fp32_readers[b] != 1 or fp32_readers[w] != 1
            or dq_x is None or dq_x.op_type != "DequantizeLinear" or dq_x.input[1] not in params
            or dq_w is None or weights.get(dq_w.input[0]) is not dq_w
        ):
            return None
        if list(dq_w.input) != [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"]:
            return None
        bias = numpy_helper.to_array(source)
        zero = numpy_helper.to_array(inits[dq_w.input[2]])
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), None) if zero.ndim else None
        weight = fp32_inits.get(w)
        if weight is None or zero.any() or (zero.ndim and (axis is None or bias.ndim != 1 or bias.size != zero.size)):
            return None
        bias_input_scale = None
        if node.input[2] in biases:
            dq_b = biases[node.input[2]]
            used_biases.add(node.input[2])
            if node.input[2] != b or list(dq_b.input) != [f"{b}_quantized", f"{b}_quantized_scale", f"{b}_quantized_zero_point"]:
                return None
            bias_input_scale = dq_x.input[1]
        elif node.input[2] != b or target.quantize_bias:
            return None
        if x not in read:
            return None
        input_scale = np.asarray(activation_params(read[x], target)[1], dtype=np.float32)
        scale = _unadjusted_weight_scale(weight, axis, numpy_helper.to_array(inits[f"{w}_scale"]), input_scale, bias)
        beta = get_beta(original) if original.op_type == "Gemm" else 1.0
        linked.append(_Linked(x, weight, axis, zero, scale, b, bias, beta, bias_input_scale))
    if used_biases != set(biases):
        return None
    rewrite = QdqRewrite(fp32, base, target, set(ranges), sorted(tensors), linked, placement)
    values = rewrite.initializers(ranges)
    if values is None or any(values[n].SerializeToString() != inits[n].SerializeToString() for n in values):
        return None
    return rewrite
