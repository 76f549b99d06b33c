"""Targets: how a calibrated model becomes a deployable Q/DQ ONNX model.

quantlab computes every activation range itself and hands them to ONNX Runtime's maintained Q/DQ
rewriter (``quantize_static`` with a precomputed range cache), which places the nodes.  Two targets:

``tensorrt``
    Signed INT8, symmetric, zero-point 0 everywhere; weights per channel on the output-channel axis
    in [-127, 127]; scale ``amax / 127``; no INT32 bias quantization; Q/DQ only on the *inputs* of
    Conv, ConvTranspose, Gemm, MatMul, Add, Concat and pooling (TensorRT's recommended placement:
    it fuses the rest).
``ort-cpu``
    U8 activations with zero-points (``s = (hi - lo) / 255``, ``zp = round(-lo / s)``), S8 symmetric
    per-channel weights, INT32 biases: the combination ONNX Runtime's CPU kernels (VNNI) run fastest.

A zero range never yields a zero scale: an all-zero tensor gets the range [-1, 1] (symmetric) or
[0, 1] (asymmetric); any scale represents 0 exactly.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantlab.calibrators import Calibrator, asymmetric_range
from quantlab.stats import StatsSet

_TRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")


@dataclass(frozen=True)
class Target:
    """A deployment target's quantization scheme (see the module docstring)."""

    name: str
    symmetric: bool
    op_types: tuple[str, ...] | None
    quantize_bias: bool
    description: str

    def uses_unsigned(self, stats_min: float) -> bool:
        """Whether a tensor with this minimum is quantized over [0, amax] with 256 levels."""
        return not self.symmetric and stats_min >= 0.0


TARGETS: dict[str, Target] = {
    "tensorrt": Target("tensorrt", True, _TRT_OPS, False, "S8 symmetric activations and weights, for TensorRT"),
    "ort-cpu": Target("ort-cpu", False, None, True, "U8 asymmetric activations, S8 per-channel weights, for ONNX Runtime CPU"),
}


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


def write_qdq_model(model_path: str | Path, ranges: dict[str, TensorRange], target: Target, out: str | Path) -> None:
    """Write the Q/DQ model of ``target`` with the given activation ranges to ``out``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {
        name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi)) for name, r in sorted(ranges.items())
    }
    extra: dict[str, object] = {"ActivationSymmetric": target.symmetric, "WeightSymmetric": True}
    kwargs: dict[str, object] = {}
    if target.op_types is not None:
        kwargs["op_types_to_quantize"] = list(target.op_types)
        extra["OpTypesToExcludeOutputQuantization"] = list(target.op_types)
    if not target.quantize_bias:
        extra["QuantizeBias"] = False
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".quantlab-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        dst = Path(tmp) / "model.onnx"
        quiet = logging.getLogger("root"), logging.getLogger()
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(model_path), str(dst), None,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if target.symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache),
                    extra_options=extra,
                    **kwargs,
                )
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dst, out)


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
    without ONNX Runtime's ``_quantized`` suffix).  INT32 bias DQ nodes are left out.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}

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
        name = x.removesuffix("_quantized") if is_weight else x
        kind = "weight" if is_weight else "activation"
        params.setdefault(
            (kind, name),
            QuantParam(name, kind, str(zp.dtype), axis, tuple(float(s) for s in scale), tuple(int(z) for z in zp.ravel())),
        )
    return list(params.values())
