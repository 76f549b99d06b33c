"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding every weight to its nearest INT8 level minimises each weight's own error, not the layer's:
the errors of one output add up over its inputs, and rounding some weights the other way can cancel
them.  AdaRound learns, per weight, whether to round down or up, to minimise the layer's output
error on calibration activations.  Per output channel ``c`` with the targets' scale
``s_c = max|W_c| / 127``::

    W~ = s * clip(floor(W / s) + h(V), -127, 127),     h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with ``zeta = 1.1``, ``gamma = -0.1`` (the rectified sigmoid, whose ends are reachable) and ``V``
initialised so that ``h(V)`` equals the fractional part of ``W / s`` (``W~ = W`` at the start).  The
loss, on mini-batches of the layer's cached FP32 input ``X``::

    || f(W X + b) - f(W~ X + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

``f`` is the ReLU/ReLU6 that follows the layer, if any; the second term (lambda = 0.01) pushes each
``h`` to 0 or 1, with ``beta`` annealed from 20 to 2 after a warm-up of 20% of the iterations
without it.  At the end ``h >= 0.5`` rounds up.  PyTorch serves only as the optimiser (Adam on
``V``) over arrays extracted from the ONNX graph; each layer is optimised on its own FP32 inputs.

The weights written back are exactly ``s * q``.  The largest weight of each channel keeps its
nearest level (+-127), so the channel's maximum, hence its scale, is unchanged: quantizing the new
weight again, as ONNX Runtime does when it writes the Q/DQ model for either target, gives ``q``
exactly (a test checks this).  The FP32 model changes (its weights are the rounded ones), so a PTQ
run keeps the untransformed model as its reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from quantlab.config import TransformConfig
from quantlab.transforms.graph import Feed, Graph, Layer, attr, quantize_weight, run_batches, samples_of
from quantlab.transforms.result import TransformResult, rounded

ZETA, GAMMA = 1.1, -0.1
LAMBDA = 0.01
WARMUP = 0.2
BETA = (20.0, 2.0)
LR = 1e-2
BATCH_ELEMENTS = 1 << 17  # input values per optimisation step (a crop of a large feature map)
CHECK_ELEMENTS = 1 << 22  # input values the before/after error is measured on
ROWS_PER_STEP = 256  # rows (tokens) per step for MatMul/Gemm
MAX_CACHED_ROWS = 16384  # rows of a MatMul/Gemm input kept per layer
CAPTURE_BYTES = 512 << 20  # activations held at once while capturing layer inputs


@dataclass
class _Op:
    """How to apply the layer in PyTorch: kind and attributes, and the activation after it."""

    kind: str  # "conv", "gemm" or "matmul"
    pads: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    groups: int = 1
    trans_b: bool = False
    alpha: float = 1.0
    act: tuple[float, float] | None = None  # clamp bounds of a following Relu/Clip
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER: pads follow the input size
    kernel: tuple[int, ...] = ()


def _activation(g: Graph, layer: Layer) -> tuple[float, float] | None:
    nxt = g.sole_reader(layer.node.output[0])
    if nxt is None:
        return None
    if nxt.op_type == "Relu":
        return 0.0, math.inf
    if nxt.op_type == "Clip":
        bounds = []
        for k, default in ((1, -math.inf), (2, math.inf)):
            name = nxt.input[k] if len(nxt.input) > k else ""
            if name and name not in g.inits:
                return None
            bounds.append(float(g.array(name).reshape(-1)[0]) if name else default)
        return bounds[0], bounds[1]
    return None


def _op(g: Graph, layer: Layer) -> _Op | None:
    """The layer as a PyTorch operation, or ``None`` when AdaRound does not handle it."""
    node = layer.node
    act = _activation(g, layer)
    if node.op_type == "MatMul":
        return _Op("matmul", act=act)
    if node.op_type == "Gemm":
        return _Op("gemm", trans_b=bool(attr(node, "transB", 0)), alpha=float(attr(node, "alpha", 1.0)), act=act)
    if node.op_type != "Conv":
        return None
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    dims = g.inits[layer.weight].dims
    spatial = len(dims) - 2
    if spatial not in (1, 2, 3) or auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    pads = tuple(attr(node, "pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else (0,) * 2 * spatial
    return _Op("conv", pads, tuple(attr(node, "strides", [1] * spatial)), tuple(attr(node, "dilations", [1] * spatial)),
               layer.groups, act=act, auto_pad=auto_pad, kernel=tuple(dims[2:]))


def _pads(op: _Op, size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(begin, end)`` padding per spatial axis; ONNX's SAME_* rule for an input of ``size``."""
    spatial = len(op.strides)
    if not op.auto_pad.startswith("SAME"):
        return op.pads[:spatial], op.pads[spatial:]
    begin, end = [], []
    for n, k, s, d in zip(size, op.kernel, op.strides, op.dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begin.append(small if op.auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return tuple(begin), tuple(end)


def _forward(torch, op: _Op, x, w, b):
    """``f(W x + b)`` for one layer (``x`` a torch tensor of its input)."""
    F = torch.nn.functional
    if op.kind == "conv":
        spatial = len(op.strides)
        begin, end = _pads(op, tuple(x.shape[2:]))
        pad = [p for d in reversed(range(spatial)) for p in (begin[d], end[d])]  # F.pad: last axis first
        if any(pad):
            x = F.pad(x, pad)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
        y = conv(x, w, b, stride=op.strides, dilation=op.dilations, groups=op.groups)
    else:
        y = x @ (w.t() if op.trans_b else w)
        if op.alpha != 1.0:
            y = y * op.alpha
        if b is not None:
            y = y + b
    if op.act is not None:
        lo, hi = op.act
        y = torch.clamp(y, min=None if math.isinf(lo) else lo, max=None if math.isinf(hi) else hi)
    return y


def _reconstruction_loss(torch, d, kind: str):
    """Squared error summed over the output channels, averaged over everything else (BRECQ's norm)."""
    return d.pow(2).sum(1 if kind == "conv" else -1).mean()


def _elements_per_sample(g: Graph, name: str) -> int | None:
    for v in (*g.model.graph.value_info, *g.model.graph.input, *g.model.graph.output):
        if v.name == name and v.type.HasField("tensor_type"):
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim][1:]
            return int(np.prod(dims)) if dims and all(dims) else None
    return None


def _capture_groups(g: Graph, layers: list[Layer], samples: int) -> list[list[Layer]]:
    """Layers in groups whose cached inputs fit :data:`CAPTURE_BYTES` together."""
    groups: list[list[Layer]] = [[]]
    used = 0
    for layer in layers:
        per = _elements_per_sample(g, layer.node.input[0])
        size = 4 * samples * (per if per is not None else 1 << 22)
        if groups[-1] and used + size > CAPTURE_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    return [gr for gr in groups if gr]


def capture_inputs(g: Graph, model: onnx.ModelProto, layers: list[Layer], data: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Each layer's FP32 input on all calibration data (MatMul/Gemm inputs as at most
    :data:`MAX_CACHED_ROWS` evenly spaced rows)."""
    graph_inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(layer.node.input[0] for layer in layers))
    inner = [n for n in names if n not in graph_inputs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    outputs = run_batches(model, data, inner) if inner else iter([[] for _ in data])
    for feed, values in zip(data, outputs):
        got = dict(zip(inner, values))
        for n in names:
            parts[n].append(np.asarray(feed[n] if n in graph_inputs else got[n], np.float32))
    out = {}
    for layer in layers:
        n = layer.node.input[0]
        if n in out:
            continue
        x = np.concatenate(parts[n])
        if layer.node.op_type != "Conv":
            x = x.reshape(-1, x.shape[-1])
            stride = max(1, math.ceil(x.shape[0] / MAX_CACHED_ROWS))
            x = np.ascontiguousarray(x[::stride])
        out[n] = x
    return out


def _rectified_sigmoid(torch, v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def round_layer(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, op: _Op, axis: int, iterations: int,
                seed: int, device: str) -> tuple[np.ndarray, dict[str, float]]:
    """AdaRound one layer: the INT8 values ``q`` (int32, shaped like ``w``) and the errors before/after.

    ``x`` is the layer's cached input (``[N, C, ...]`` for a convolution, ``[rows, K]`` otherwise);
    ``axis`` the weight's output-channel axis.
    """
    import torch

    # Each step is a dozen small operations: on the CPU one thread beats two that wait for each
    # other (8x on a busy 2-core machine); the thread count is restored afterwards.
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _round_layer(torch, x, w, b, op, axis, iterations, seed, device)
    finally:
        torch.set_num_threads(threads)


def _round_layer(torch, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, op: _Op, axis: int, iterations: int,
                 seed: int, device: str) -> tuple[np.ndarray, dict[str, float]]:
    q_near, s = quantize_weight(w, axis)
    scaled = w.astype(np.float32) / s
    floor = np.floor(scaled)
    rest = scaled - floor
    pinned = np.abs(q_near) == 127  # each channel's largest weight keeps its level: the scale stays
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    w_t, s_t, floor_t = t(w.astype(np.float32)), t(s), t(floor.astype(np.float32))
    pinned_t, near_t = t(pinned), t(q_near.astype(np.float32))
    b_t = None if b is None else t(b.astype(np.float32))
    ratio = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    v = t(np.log(ratio / (1 - ratio)).astype(np.float32)).requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=LR)

    def weight(h):
        q = torch.clamp(floor_t + h, -127.0, 127.0)
        return torch.where(pinned_t, near_t, q) * s_t

    def batch():
        if op.kind != "conv":
            idx = torch.randint(0, x.shape[0], (min(ROWS_PER_STEP, x.shape[0]),), generator=gen)
            return t(x[idx.numpy()])
        per_sample = int(np.prod(x.shape[1:]))
        n = max(1, min(x.shape[0], BATCH_ELEMENTS // per_sample))
        idx = torch.randperm(x.shape[0], generator=gen)[:n].numpy()
        xb = x[np.sort(idx)]
        if per_sample > BATCH_ELEMENTS:  # one sample is too large: a random spatial crop of it
            side = max(8, int((BATCH_ELEMENTS / x.shape[1]) ** (1 / (x.ndim - 2))))
            slices = [slice(None), slice(None)]
            for d, size in enumerate(x.shape[2:]):
                crop = min(size, side)
                start = int(torch.randint(0, size - crop + 1, (1,), generator=gen)) if size > crop else 0
                start -= start % op.strides[d]
                slices.append(slice(start, start + crop))
            xb = xb[tuple(slices)]
        return t(xb)

    warm = int(WARMUP * iterations)
    for it in range(iterations):
        xb = batch()
        with torch.no_grad():
            target = _forward(torch, op, xb, w_t, b_t)
        h = _rectified_sigmoid(torch, v)
        loss = _reconstruction_loss(torch, _forward(torch, op, xb, weight(h), b_t) - target, op.kind)
        if it >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (it - warm) / max(iterations - warm, 1))
            loss = loss + LAMBDA * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        up = (_rectified_sigmoid(torch, v) >= 0.5).to(torch.float32)
        q = torch.where(pinned_t, near_t, torch.clamp(floor_t + up, -127.0, 127.0)).cpu().numpy().astype(np.int32)
        errors = _errors(torch, x, w_t, b_t, op, s_t, {"nearest": near_t, "adaround": t(q.astype(np.float32))}, t)
    return q, errors


def _errors(torch, x, w_t, b_t, op: _Op, s_t, levels: dict[str, object], t) -> dict[str, float]:
    """Relative output error ``||f(Wx) - f(s q x)||^2 / ||f(Wx)||^2`` for each set of INT8 ``levels``,
    on the first cached samples (at most :data:`CHECK_ELEMENTS` input values, at least one sample)."""
    per_sample = int(np.prod(x.shape[1:]))
    xb = t(x[: max(1, CHECK_ELEMENTS // per_sample)])
    ref = _forward(torch, op, xb, w_t, b_t)
    den = float(ref.double().pow(2).sum()) or 1.0
    return {key: float((_forward(torch, op, xb, q * s_t, b_t) - ref).double().pow(2).sum()) / den
            for key, q in levels.items()}


def adaround(model: onnx.ModelProto, data: Sequence[Feed], config: TransformConfig,
             keep: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, TransformResult]:
    """AdaRound every Conv, Gemm and MatMul with a constant weight (see the module docstring).

    Layers in ``keep`` stay in float and are left alone; ``config.adaround_iterations`` steps per
    layer on ``config.adaround_device``.
    """
    import torch

    g = Graph(model)
    layers, shared, unsupported = [], [], []
    for layer in g.layers():
        if layer.name in keep:
            continue
        if not g.owns(layer):
            shared.append(layer.name)
        elif _op(g, layer) is None:
            unsupported.append(f"{layer.node.op_type} {layer.name}")
        else:
            layers.append(layer)
    if not layers:
        return model, TransformResult("adaround", False, "no Conv, Gemm or MatMul with a constant weight to round")
    device = config.adaround_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    samples = samples_of(data)
    records, better = _round_all(g, model, layers, data, samples, config, device)
    detail = (f"rounded {len(records)} layer(s) ({config.adaround_iterations} steps each, {device}); "
              f"layer output error below nearest rounding in {better}")
    if shared:
        detail += f"; {len(shared)} layer(s) sharing a weight left as they are"
    if unsupported:
        detail += f"; not rounded (not handled): {', '.join(unsupported)}"
    return g.model, TransformResult("adaround", True, detail, records)


def _round_all(g: Graph, model: onnx.ModelProto, layers: list[Layer], data: Sequence[Feed], samples: int,
               config: TransformConfig, device: str) -> tuple[list[dict], int]:
    records: list[dict] = []
    better = 0
    for group in _capture_groups(g, layers, samples):
        inputs = capture_inputs(g, model, group, data)
        for layer in group:
            op = _op(g, layer)
            w = g.array(layer.weight)
            b = g.array(layer.bias) if layer.bias is not None else None
            seed = config.seed * 100003 + len(records)
            q, err = round_layer(inputs[layer.node.input[0]], w, b, op, layer.out_axis, config.adaround_iterations,
                                 seed, device)
            _, s = quantize_weight(w, layer.out_axis)
            g.set_array(layer.weight, q.astype(np.float32) * s)
            flipped = float(np.mean(q != quantize_weight(w, layer.out_axis)[0]))
            better += err["adaround"] < err["nearest"]
            records.append({"layer": layer.name, "error_nearest": rounded(err["nearest"], 8),
                            "error_adaround": rounded(err["adaround"], 8), "flipped": rounded(flipped, 6)})
        del inputs
    return records, better
