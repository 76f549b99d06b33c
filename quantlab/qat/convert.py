"""An ONNX graph as a ``torch.nn.Module``: QAT for models that exist only as ONNX.

:class:`OnnxModule` interprets the nodes of an ONNX graph in order with PyTorch operations, so the
graph can be trained: initializers become parameters (the weights and biases of weighted layers,
normalization scales) or buffers (everything else: shapes, indices, constants), each node becomes
the PyTorch expression that computes the same thing, and autograd differentiates through it.  The
module runs eagerly (shape computations such as ``Shape -> Gather -> Reshape`` run on real values
at every call), so dynamic batch sizes need no special care; it is never traced or exported: the
trained Q/DQ model is written from the ONNX graph itself (:mod:`quantlab.qat.graph`).

Hooks for fake quantization sit on **edges**, an input position of a node: ``set_quantizer(node,
index, module)`` puts ``module`` between the tensor and that one reader, so a tensor read by a
quantized Conv and by a float Add is fake-quantized for the Conv only, as a Q/DQ model does.
Edges that share a tensor and a quantizer compute it once per call.

The op set is what quantlab meets in CNN, detector and transformer exports (opset 13 and later):
convolutions and transposed convolutions with explicit or ``auto_pad`` padding, Gemm/MatMul,
pooling, Resize (nearest and linear modes), normalizations, activations, element-wise arithmetic
and comparisons, and the shape operators of transformer exports (Shape, Gather, Slice, Reshape,
Expand, Range, Where, ...).  A graph with any other op is refused before anything is built, with
every op it lacks named, because a converter that guessed would train a different network.  Every
conversion is checked against ONNX Runtime on real data before training
(:func:`quantlab.qat.graph.check_conversion`).

Worked example: ``Conv(x, W[8,3,3,3], B[8], pads=[1,1,1,1])`` becomes
``F.conv2d(x, W, B, stride=1, padding=(1, 1), dilation=1, groups=1)`` with ``W`` and ``B``
``nn.Parameter``; ``Resize(x, scales=[1,1,2,2], mode="nearest", coordinate_transformation_mode=
"asymmetric", nearest_mode="floor")`` becomes ``F.interpolate(x, scale_factor=(2.0, 2.0),
mode="nearest")``: output pixel ``i`` reads input pixel ``floor(i / 2)`` in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from quantlab.errors import QuantlabError, check

Attrs = dict[str, Any]
OpFn = Callable[[list[Any], Attrs], Any]

#: Ops whose inputs after the first are the layer's weight (index 1) and bias (index 2).
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def supported_ops() -> tuple[str, ...]:
    """The ONNX op types :class:`OnnxModule` converts, sorted (``Constant`` nodes become buffers)."""
    return tuple(sorted([*_OPS, "Constant"]))


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of ``model``'s main graph that cannot be converted, sorted (``domain:op`` outside ONNX's)."""
    bad = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad.add(f"{node.domain}:{node.op_type}")
        elif node.op_type not in _OPS and node.op_type != "Constant":
            bad.add(node.op_type)
    return sorted(bad)


# --------------------------------------------------------------------------------------------- dtypes

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def _torch_dtype(elem_type: int) -> torch.dtype:
    check(elem_type in _DTYPES, f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} has no PyTorch "
          "counterpart here: export the model with float, integer or bool tensors")
    return _DTYPES[elem_type]


def _array(t: onnx.TensorProto) -> torch.Tensor:
    a = numpy_helper.to_array(t)
    return torch.from_numpy(np.array(a, copy=True))


def _ints(x: Any) -> list[int]:
    """An ONNX shape-like input (a tensor of integers) as Python ints."""
    return [int(v) for v in x.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ------------------------------------------------------------------------------------ convolutions


def _same_pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               mode: str) -> tuple[list[int], list[int]]:
    """``auto_pad`` SAME_UPPER/SAME_LOWER: output ``ceil(in / stride)``, the odd pixel at the end (upper) or start."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin, end


def _pads(x: torch.Tensor, a: Attrs, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    n = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x.shape[2:], kernel, strides, dilations, auto)
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(a.get("pads", [0] * (2 * n)))
    return pads[:n], pads[n:]


def _pad_spatial(x: torch.Tensor, begin: Sequence[int], end: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the spatial axes of ``x`` (N, C, *spatial) by ``begin``/``end`` pixels."""
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad lists the last axis first
        flat += [b, e]
    return F.pad(x, flat, value=value) if any(flat) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv")
def _conv(x: list[Any], a: Attrs) -> torch.Tensor:
    inp, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    check(n in _CONV, f"Conv with {n} spatial axes cannot be converted: only 1-D, 2-D and 3-D convolutions")
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    begin, end = _pads(inp, a, kernel, strides, dilations)
    if begin != end:
        inp, begin = _pad_spatial(inp, begin, end), [0] * n
    return _CONV[n](inp, w, bias, stride=strides, padding=begin, dilation=dilations, groups=a.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(x: list[Any], a: Attrs) -> torch.Tensor:
    inp, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    check(n in _CONV_T, f"ConvTranspose with {n} spatial axes cannot be converted: only 1-D, 2-D and 3-D")
    check(a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and "output_shape" not in a,
          "ConvTranspose with auto_pad SAME or output_shape cannot be converted: export it with explicit pads")
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    pads = list(a.get("pads", [0] * (2 * n)))
    extra = list(a.get("output_padding", [0] * n))
    # full transposed convolution (no padding), then crop pads[i] at the start and pads[n + i] at the end
    y = _CONV_T[n](inp, w, bias, stride=strides, padding=0, output_padding=extra, groups=a.get("group", 1),
                   dilation=dilations)
    for i in range(n):
        b, e = pads[i], pads[n + i]
        if b or e:
            y = y.narrow(2 + i, b, y.shape[2 + i] - b - e)
    return y


@_op("Gemm")
def _gemm(x: list[Any], a: Attrs) -> torch.Tensor:
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return y


_op("MatMul")(lambda x, a: torch.matmul(x[0], x[1]))


# ------------------------------------------------------------------------------------------ pooling


def _pool_geometry(x: torch.Tensor, a: Attrs) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    begin, end = _pads(x, a, kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _max_pool(x: list[Any], a: Attrs) -> torch.Tensor:
    check(a.get("storage_order", 0) == 0, "MaxPool with storage_order = 1 cannot be converted")
    kernel, strides, dilations, begin, end = _pool_geometry(x[0], a)
    inp = _pad_spatial(x[0], begin, end, value=-math.inf)
    return _MAXPOOL[len(kernel)](inp, kernel, strides, 0, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))


@_op("AveragePool")
def _avg_pool(x: list[Any], a: Attrs) -> torch.Tensor:
    kernel, strides, dilations, begin, end = _pool_geometry(x[0], a)
    check(all(d == 1 for d in dilations), "AveragePool with dilations cannot be converted")
    pool = _AVGPOOL[len(kernel)]
    ceil = bool(a.get("ceil_mode", 0))
    total = pool(_pad_spatial(x[0], begin, end), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if a.get("count_include_pad", 0) or not any(begin + end):
        return total
    # average over the real pixels only: divide by the share of each window that is not padding
    ones = _pad_spatial(torch.ones_like(x[0][:1, :1]), begin, end)
    share = pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / share


@_op("GlobalAveragePool")
def _global_avg(x: list[Any], a: Attrs) -> torch.Tensor:
    return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max(x: list[Any], a: Attrs) -> torch.Tensor:
    return x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)


# ------------------------------------------------------------------------------------------- Resize

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


@_op("Resize")
def _resize(x: list[Any], a: Attrs) -> torch.Tensor:
    inp = x[0]
    scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    spatial = inp.dim() - 2
    what = f"Resize (mode={mode}, coordinate_transformation_mode={coord}, nearest_mode={a.get('nearest_mode', 'round_prefer_floor')})"
    if scales is not None:
        s = [float(v) for v in scales.reshape(-1).tolist()]
        check(s[:2] == [1.0, 1.0], f"{what} that scales the batch or channel axis cannot be converted")
        kw: dict[str, Any] = {"scale_factor": tuple(s[2:]), "recompute_scale_factor": False}
    else:
        check(sizes is not None, f"{what} without scales or sizes cannot be converted")
        size = _ints(sizes)
        check(size[:2] == list(inp.shape[:2]), f"{what} that resizes the batch or channel axis cannot be converted")
        kw = {"size": tuple(size[2:])}
    if mode == "nearest" and coord == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor":
        return F.interpolate(inp, mode="nearest", **kw)  # out[i] = in[floor(i / scale)]
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel") and spatial in _LINEAR:
        return F.interpolate(inp, mode=_LINEAR[spatial], align_corners=False, **kw)
    if mode == "linear" and coord == "align_corners" and spatial in _LINEAR:
        return F.interpolate(inp, mode=_LINEAR[spatial], align_corners=True, **kw)
    raise QuantlabError(f"{what} cannot be converted: nearest/asymmetric/floor and linear resizes are supported")


# ----------------------------------------------------------------------------------- normalizations


@_op("LayerNormalization")
def _layer_norm(x: list[Any], a: Attrs) -> torch.Tensor:
    inp = x[0]
    axis = _axis(a.get("axis", -1), inp.dim())
    bias = x[2] if len(x) > 2 else None
    return F.layer_norm(inp, tuple(inp.shape[axis:]), x[1], bias, eps=a.get("epsilon", 1e-5))


@_op("BatchNormalization")
def _batch_norm(x: list[Any], a: Attrs) -> torch.Tensor:
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=a.get("epsilon", 1e-5))


@_op("InstanceNormalization")
def _instance_norm(x: list[Any], a: Attrs) -> torch.Tensor:
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


@_op("Softmax")
def _softmax(x: list[Any], a: Attrs) -> torch.Tensor:
    return torch.softmax(x[0], dim=a.get("axis", -1))


@_op("LogSoftmax")
def _log_softmax(x: list[Any], a: Attrs) -> torch.Tensor:
    return torch.log_softmax(x[0], dim=a.get("axis", -1))


# ------------------------------------------------------------------------------------- activations

for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus,
    "Not": torch.logical_not, "Sign": torch.sign,
}.items():
    _op(_name)(lambda x, a, fn=_fn: fn(x[0]))

_op("Identity")(lambda x, a: x[0])
_op("LeakyRelu")(lambda x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)))
_op("Elu")(lambda x, a: F.elu(x[0], a.get("alpha", 1.0)))
_op("HardSigmoid")(lambda x, a: torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0.0, 1.0))
_op("HardSwish")(lambda x, a: x[0] * torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0))
_op("Gelu")(lambda x, a: F.gelu(x[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none"))


@_op("Clip")
def _clip(x: list[Any], a: Attrs) -> torch.Tensor:
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    if isinstance(low, torch.Tensor):
        low = low.to(x[0].dtype)
    if isinstance(high, torch.Tensor):
        high = high.to(x[0].dtype)
    return torch.clamp(x[0], low, high)


@_op("Dropout")
def _dropout(x: list[Any], a: Attrs) -> Any:
    return x[0], torch.ones_like(x[0], dtype=torch.bool)  # inference: identity, mask all kept


# -------------------------------------------------------------------------------------- arithmetic


@_op("Div")
def _div(x: list[Any], a: Attrs) -> torch.Tensor:
    if x[0].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")  # ONNX integer division truncates


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "Mod": torch.remainder,
}.items():
    _op(_name)(lambda x, a, fn=_fn: fn(x[0], x[1]))


def _variadic_op(fn: Callable[[Any, Any], Any], mean: bool = False) -> OpFn:
    def run(x: list[Any], a: Attrs) -> torch.Tensor:
        y = x[0]
        for t in x[1:]:
            y = fn(y, t)
        return y / len(x) if mean else y

    return run


_OPS["Max"], _OPS["Min"] = _variadic_op(torch.maximum), _variadic_op(torch.minimum)
_OPS["Sum"], _OPS["Mean"] = _variadic_op(torch.add), _variadic_op(torch.add, mean=True)


@_op("Where")
def _where(x: list[Any], a: Attrs) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


@_op("Cast")
def _cast(x: list[Any], a: Attrs) -> torch.Tensor:
    return x[0].to(_torch_dtype(a["to"]))


# -------------------------------------------------------------------------------------- reductions


def _reduce_axes(x: list[Any], a: Attrs) -> list[int] | None:
    if len(x) > 1 and x[1] is not None and x[1].numel():
        return _ints(x[1])
    return list(a["axes"]) if "axes" in a else None


def _reduction(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(x: list[Any], a: Attrs) -> torch.Tensor:
        axes = _reduce_axes(x, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None:
            if a.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return fn(x[0], dim=tuple(axes), keepdim=keep)

    return run


_OPS["ReduceMean"] = _reduction(torch.mean)
_OPS["ReduceSum"] = _reduction(torch.sum)
_OPS["ReduceMax"] = _reduction(torch.amax)
_OPS["ReduceMin"] = _reduction(torch.amin)
_OPS["ReduceL2"] = _reduction(lambda t, dim, keepdim: torch.linalg.vector_norm(t, 2, dim=dim, keepdim=keepdim))
_OPS["ReduceL1"] = _reduction(lambda t, dim, keepdim: torch.linalg.vector_norm(t, 1, dim=dim, keepdim=keepdim))
_OPS["ReduceSumSquare"] = _reduction(lambda t, dim, keepdim: (t * t).sum(dim=dim, keepdim=keepdim))


# ------------------------------------------------------------------------------------ shape and data


@_op("Shape")
def _shape(x: list[Any], a: Attrs) -> torch.Tensor:
    dims = list(x[0].shape)
    rank = len(dims)
    start = _axis(a.get("start", 0), rank)
    end = _axis(a["end"], rank) if "end" in a else rank
    return torch.tensor(dims[max(start, 0):min(end, rank)], dtype=torch.int64, device=x[0].device)


@_op("Size")
def _size(x: list[Any], a: Attrs) -> torch.Tensor:
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


@_op("Reshape")
def _reshape(x: list[Any], a: Attrs) -> torch.Tensor:
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


@_op("Flatten")
def _flatten(x: list[Any], a: Attrs) -> torch.Tensor:
    axis = _axis(a.get("axis", 1), x[0].dim())
    return x[0].reshape(int(np.prod(x[0].shape[:axis], dtype=np.int64)), -1)


@_op("Transpose")
def _transpose(x: list[Any], a: Attrs) -> torch.Tensor:
    perm = a.get("perm") or list(range(x[0].dim()))[::-1]
    return x[0].permute(*perm)


@_op("Squeeze")
def _squeeze(x: list[Any], a: Attrs) -> torch.Tensor:
    axes = _reduce_axes(x, a)
    if axes is None:
        return x[0].squeeze()
    rank = x[0].dim()
    keep = [d for i, d in enumerate(x[0].shape) if i not in {_axis(ax, rank) for ax in axes}]
    return x[0].reshape(keep)


@_op("Unsqueeze")
def _unsqueeze(x: list[Any], a: Attrs) -> torch.Tensor:
    axes = _reduce_axes(x, a) or []
    rank = x[0].dim() + len(axes)
    y = x[0]
    for ax in sorted(_axis(v, rank) for v in axes):
        y = y.unsqueeze(ax)
    return y


@_op("Concat")
def _concat(x: list[Any], a: Attrs) -> torch.Tensor:
    parts = [t for t in x if t is not None]
    dtype = parts[0].dtype
    return torch.cat([t.to(dtype) for t in parts], dim=a["axis"])


@_op("Split")
def _split(x: list[Any], a: Attrs, outputs: int = 0) -> tuple[torch.Tensor, ...]:
    inp = x[0]
    axis = _axis(a.get("axis", 0), inp.dim())
    if len(x) > 1 and x[1] is not None and x[1].numel():
        sizes = _ints(x[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = a.get("num_outputs") or a["_outputs"]
        step = -(-inp.shape[axis] // n)
        sizes = [min(step, inp.shape[axis] - i * step) for i in range(n)]
    return tuple(torch.split(inp, sizes, dim=axis))


@_op("Slice")
def _slice(x: list[Any], a: Attrs) -> torch.Tensor:
    inp = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    y = inp
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, inp.dim())
        # ONNX clamps out-of-range bounds (INT64_MAX: to the end) exactly as Python's slice.indices does
        idx = range(*slice(start, end, step).indices(y.shape[axis]))
        if step == 1:
            y = y.narrow(axis, idx.start, len(idx))
        else:
            y = y.index_select(axis, torch.tensor(list(idx), dtype=torch.int64, device=y.device))
    return y


@_op("Gather")
def _gather(x: list[Any], a: Attrs) -> torch.Tensor:
    data, idx = x[0], x[1].to(torch.int64)
    axis = _axis(a.get("axis", 0), data.dim())
    n = data.shape[axis]
    idx = torch.where(idx < 0, idx + n, idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


@_op("GatherElements")
def _gather_elements(x: list[Any], a: Attrs) -> torch.Tensor:
    axis = _axis(a.get("axis", 0), x[0].dim())
    idx = x[1].to(torch.int64)
    return torch.gather(x[0], axis, torch.where(idx < 0, idx + x[0].shape[axis], idx))


@_op("Expand")
def _expand(x: list[Any], a: Attrs) -> torch.Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return x[0].expand(shape)


@_op("Tile")
def _tile(x: list[Any], a: Attrs) -> torch.Tensor:
    return x[0].repeat(*_ints(x[1]))


@_op("Range")
def _range(x: list[Any], a: Attrs) -> torch.Tensor:
    start, limit, delta = (t.item() for t in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)


@_op("ConstantOfShape")
def _constant_of_shape(x: list[Any], a: Attrs) -> torch.Tensor:
    value = a.get("value")
    fill = torch.zeros(1, dtype=torch.float32) if value is None else value.reshape(-1)
    return torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype, device=x[0].device)


@_op("Pad")
def _pad(x: list[Any], a: Attrs) -> torch.Tensor:
    inp = x[0]
    rank = inp.dim()
    pads = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("pads", []))
    value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else float(a.get("value", 0.0))
    axes = [_axis(v, rank) for v in _ints(x[3])] if len(x) > 3 and x[3] is not None else list(range(rank))
    mode = a.get("mode", "constant")
    check(mode in ("constant", "reflect", "edge"), f"Pad with mode={mode} cannot be converted")
    begin = dict(zip(axes, pads[:len(axes)]))
    end = dict(zip(axes, pads[len(axes):]))
    flat: list[int] = []
    for ax in reversed(range(rank)):
        flat += [begin.get(ax, 0), end.get(ax, 0)]
    while len(flat) > 2 and flat[-2:] == [0, 0]:  # F.pad's reflect/replicate modes take spatial axes only
        flat = flat[:-2]
    if mode == "constant":
        return F.pad(inp, flat, value=value)
    return F.pad(inp, flat, mode="reflect" if mode == "reflect" else "replicate")


# -------------------------------------------------------------------------------------------- module


def _attributes(node: onnx.NodeProto) -> Attrs:
    out: Attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = _array(value)
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out


def _constant_value(node: onnx.NodeProto) -> torch.Tensor:
    a = _attributes(node)
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64), ("value_floats", torch.float32),
                       ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise QuantlabError(f"Constant node '{node.name or node.output[0]}' holds a sparse or string value: "
                        "fold it before quantizing")


def default_trainable(model: onnx.ModelProto) -> set[str]:
    """The initializers QAT fine-tunes: weights and biases of weighted layers, normalization scales
    and offsets, and the constant operand of an ``Add`` after a weighted layer (a bias the exporter
    kept apart).  Shapes, indices, clip bounds and other constants stay fixed."""
    graph = model.graph
    floats = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    producer = {o: n for n in graph.node for o in n.output}
    chosen: set[str] = set()
    for node in graph.node:
        if node.op_type in WEIGHTED:
            chosen.update(node.input[1:3])
        elif node.op_type in ("LayerNormalization", "InstanceNormalization"):
            chosen.update(node.input[1:3])
        elif node.op_type == "BatchNormalization":
            chosen.update(node.input[1:3])
        elif node.op_type == "Add" and len(node.input) == 2:
            for k in (0, 1):
                other = producer.get(node.input[1 - k])
                if node.input[k] in floats and other is not None and other.op_type in WEIGHTED:
                    chosen.add(node.input[k])
    return chosen & floats


class OnnxModule(torch.nn.Module):
    """An ONNX graph run by PyTorch (see the module docstring).

    ``forward(*inputs)`` takes the graph inputs in order (initializers excluded) and returns a tuple
    of the graph outputs.  ``trainable`` names the initializers that become ``nn.Parameter``
    (default :func:`default_trainable`); :meth:`initializer` reads any initializer's current value
    by its ONNX name.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] | None = None) -> None:
        super().__init__()
        bad = unsupported_ops(model)
        check(not bad, f"cannot convert the ONNX model to PyTorch: op(s) {', '.join(bad)} not supported "
              f"(quantlab converts {len(supported_ops())} ops): give [model] pytorch = 'module:factory' for QAT of this model")
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        wanted = default_trainable(model) if trainable is None else set(trainable)
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self.output_names = [o.name for o in graph.output]
        self.params = torch.nn.ParameterDict()
        self.consts = torch.nn.Module()
        self._slots: dict[str, tuple[str, str]] = {}  # ONNX name -> ("p" | "b", attribute key)

        def keep(name: str, value: torch.Tensor) -> None:
            key = f"t{len(self._slots)}"
            if name in wanted and value.is_floating_point():
                self.params[key] = torch.nn.Parameter(value)
                self._slots[name] = ("p", key)
            else:
                self.consts.register_buffer(key, value)
                self._slots[name] = ("b", key)

        for name, init in inits.items():
            keep(name, _array(init))
        self._nodes: list[tuple[str, list[str], list[str], Attrs]] = []
        self.node_keys: list[str] = []  # a node's name, or its first output when it has none
        for node in graph.node:
            if node.op_type == "Constant":
                keep(node.output[0], _constant_value(node))
                continue
            attrs = _attributes(node)
            attrs["_outputs"] = len(node.output)
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
            self.node_keys.append(node.name or node.output[0])
        self.quantizers = torch.nn.ModuleDict()
        self._edges: dict[tuple[int, int], str] = {}  # (node position, input position) -> quantizer key
        self._index = {k: i for i, k in enumerate(self.node_keys)}

    # ------------------------------------------------------------------------------- values

    def initializer(self, name: str) -> torch.Tensor:
        """The current value of the initializer (or folded Constant) ``name``."""
        check(name in self._slots, f"'{name}' is not an initializer of the converted model")
        kind, key = self._slots[name]
        return self.params[key] if kind == "p" else getattr(self.consts, key)

    def is_trainable(self, name: str) -> bool:
        return self._slots.get(name, ("b", ""))[0] == "p"

    def node(self, key: str) -> tuple[str, list[str], list[str], Attrs]:
        """``(op_type, inputs, outputs, attributes)`` of the node named ``key``."""
        check(key in self._index, f"node '{key}' is not in the converted model")
        return self._nodes[self._index[key]]

    def set_quantizer(self, node: str, index: int, name: str, quantizer: torch.nn.Module) -> None:
        """Put ``quantizer`` (registered as ``name``; one module may serve several edges) on input ``index`` of ``node``."""
        check(node in self._index, f"node '{node}' is not in the converted model")
        position = self._index[node]
        check(index < len(self._nodes[position][1]), f"node '{node}' has no input {index}")
        if name not in self.quantizers:
            self.quantizers[name] = quantizer
        self._edges[(position, index)] = name

    def edges(self) -> dict[tuple[str, int], str]:
        """``(node key, input position) -> quantizer name`` for every quantized edge."""
        return {(self.node_keys[i], k): q for (i, k), q in sorted(self._edges.items())}

    # ------------------------------------------------------------------------------- forward

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check(len(inputs) == len(self.input_names),
              f"the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        env: dict[str, Any] = dict(zip(self.input_names, inputs))
        quantized: dict[tuple[str, str], Any] = {}  # (tensor, quantizer) -> fake-quantized value
        for position, (op, names, outputs, attrs) in enumerate(self._nodes):
            args: list[Any] = []
            for k, name in enumerate(names):
                if not name:
                    args.append(None)
                    continue
                value = env[name] if name in env else self.initializer(name)
                q = self._edges.get((position, k))
                if q is not None:
                    if (name, q) not in quantized:
                        quantized[(name, q)] = self.quantizers[q](value)
                    value = quantized[(name, q)]
                args.append(value)
            result = _OPS[op](args, attrs)
            if not isinstance(result, tuple):
                result = (result,)
            for name, value in zip(outputs, result):
                if name:
                    env[name] = value
        return tuple(env[name] if name in env else self.initializer(name) for name in self.output_names)


def convert(model: onnx.ModelProto, trainable: Iterable[str] | None = None) -> OnnxModule:
    """``model`` as an :class:`OnnxModule` (QuantlabError naming every op it cannot convert)."""
    return OnnxModule(model, trainable)


def run_onnx_module(module: OnnxModule, feed: Mapping[str, np.ndarray], device: Any = "cpu") -> list[np.ndarray]:
    """Run ``module`` on a quantlab feed (``input name -> array``), outputs as NumPy arrays."""
    missing = [n for n in module.input_names if n not in feed]
    check(not missing, f"the feed lacks input(s) {missing}: it holds {sorted(feed)}")
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in module.input_names))
    return [o.detach().cpu().numpy() for o in out]
