"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.1).

Two layers joined by a positive-homogeneous activation ``f`` (``f(s x) = s f(x)`` for ``s > 0``)
compute the same function after their channels are rescaled::

    y = W2 f(W1 x + b1)   ==   (W2 S) f(S^-1 W1 x + S^-1 b1),     S = diag(s), s > 0.

Output channel ``i`` of the first layer is divided by ``s_i`` and input channel ``i`` of the second
multiplied by it.  Choosing ``s_i = sqrt(r1_i / r2_i)`` (``r1_i`` the largest ``|w|`` of output
channel ``i`` of ``W1``, ``r2_i`` that of input channel ``i`` of ``W2``) makes both ranges equal to
``sqrt(r1_i r2_i)``: the channels of a depthwise layer whose BatchNorm left them with ranges a
thousand times apart come out balanced.  Chains of layers are swept until the scales settle.

Which activations allow it:

* none (one layer straight into the next), ``Relu``, ``LeakyRelu``: exact for any ``s``;
* ``Clip(0, c)`` (ReLU6 is ``c = 6``): ``clip(x / s, 0, c) = clip(x, 0, c s) / s``, so the clip stays
  exact only where the pre-activation can never exceed ``c`` after the rescaling.  The bound is
  computed, not measured: with the first layer's input in ``[a, b]`` (known when it comes from a
  ``Clip``/``Relu``), channel ``i`` is at most ``U_i = b1_i + b sum(w+) + a sum(w-)``.  A channel
  with ``U_i <= c`` may be rescaled with any ``s_i >= U_i / c``; any other keeps ``s_i = 1``.
  A pair where no channel qualifies is skipped and the run says why;
* anything else (HardSwish, GELU, Sigmoid, SiLU, ...) is not positive-homogeneous: pairs joined by
  it are skipped with the operators named.

The transformed model computes the same outputs as the original up to float rounding.  With the
per-channel weight quantization both targets use, scaling an output channel of ``W1`` does not
change its quantization; what equalization changes is the spread of the second layer's input
channels and of the activation between the two (quantized per tensor).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from quantlab.config import TransformConfig
from quantlab.transforms.graph import Feed, Graph, Layer
from quantlab.transforms.result import TransformResult, rounded

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
# element-wise operators that make up activations such as HardSwish, GELU and SiLU
ELEMENTWISE = ("Mul", "Add", "Div", "Sub", "Erf", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Gelu",
               "Softplus", "Elu", "Selu", "Pow", "Sqrt", "Exp", "Clip", "Relu", "LeakyRelu", "PRelu")
SWEEPS = 30
TOLERANCE = 1e-4  # stop sweeping once no scale moves by more than this (relative)


@dataclass
class _Pair:
    first: Layer
    second: Layer
    act: onnx.NodeProto | None
    clip: float | None  # the upper bound of a Clip(0, c) between the layers


def _clip_bounds(g: Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """``(lo, hi)`` of a Clip with constant (or absent) bounds; ``None`` when a bound is not constant."""
    bounds = []
    for k, default in ((1, -math.inf), (2, math.inf)):
        if len(node.input) > k and node.input[k]:
            if node.input[k] not in g.inits:
                return None
            bounds.append(float(g.array(node.input[k]).reshape(-1)[0]))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


def _input_interval(g: Graph, tensor: str) -> tuple[float, float]:
    """What is known of a tensor's range from the node writing it: a Clip's bounds, Relu's ``[0, inf)``."""
    p = g.producer.get(tensor)
    if p is not None and p.op_type == "Relu":
        return 0.0, math.inf
    if p is not None and p.op_type == "Clip":
        bounds = _clip_bounds(g, p)
        if bounds is not None:
            return bounds
    return -math.inf, math.inf


def _sum_other(w: np.ndarray, axis: int) -> np.ndarray:
    return w.sum(axis=tuple(d for d in range(w.ndim) if d != axis), dtype=np.float64)


def upper_bound(g: Graph, layer: Layer) -> np.ndarray:
    """Per output channel, the largest value the layer can produce given what bounds its input.

    With the input in ``[a, b]`` (widened to hold the 0 of zero padding) each weight contributes at
    most ``max(w a, w b) = w+ b + w- a``; the bias adds itself.  Infinite where an unbounded input
    meets a weight of the matching sign.
    """
    a, b = _input_interval(g, layer.node.input[0])
    a, b = min(a, 0.0), max(b, 0.0)
    w = g.array(layer.weight).astype(np.float64)
    pos, neg = _sum_other(np.maximum(w, 0.0), layer.out_axis), _sum_other(np.minimum(w, 0.0), layer.out_axis)
    with np.errstate(invalid="ignore"):
        up = np.where(pos > 0, pos * b, 0.0) + np.where(neg < 0, neg * a, 0.0)
    if layer.bias is not None:
        up = up + g.array(layer.bias).astype(np.float64)
    return up


def output_ranges(w: np.ndarray, layer: Layer) -> np.ndarray:
    """``r1``: the largest ``|w|`` of each output channel."""
    return np.abs(w).max(axis=tuple(d for d in range(w.ndim) if d != layer.out_axis))


def _input_index(w: np.ndarray, layer: Layer) -> np.ndarray:
    """For a weight viewed as ``[out, in_per_group]``, the global input channel of each entry."""
    n_out, n_in = w.shape[layer.out_axis], w.shape[layer.in_axis]
    per_group = n_out // layer.groups
    return (np.arange(n_out) // per_group)[:, None] * n_in + np.arange(n_in)[None, :]


def _as_out_in(w: np.ndarray, layer: Layer) -> np.ndarray:
    """The weight with axes ``[out, in, rest...]``."""
    rest = [d for d in range(w.ndim) if d not in (layer.out_axis, layer.in_axis)]
    return np.transpose(w, (layer.out_axis, layer.in_axis, *rest))


def input_ranges(w: np.ndarray, layer: Layer) -> np.ndarray:
    """``r2``: the largest ``|w|`` reading each input channel (all groups' channels, in order)."""
    m = np.abs(_as_out_in(w, layer))
    m = m.reshape(m.shape[0], m.shape[1], -1).max(axis=2)
    index = _input_index(w, layer)
    r = np.zeros(w.shape[layer.in_axis] * layer.groups, dtype=w.dtype)
    np.maximum.at(r, index.ravel(), m.ravel())
    return r


def scale_outputs(g: Graph, layer: Layer, s: np.ndarray) -> None:
    """Divide output channel ``i`` of the layer (weights and bias) by ``s_i``."""
    w = g.array(layer.weight)
    shape = [1] * w.ndim
    shape[layer.out_axis] = -1
    g.set_array(layer.weight, w / s.reshape(shape).astype(w.dtype))
    if layer.bias is not None:
        g.set_array(layer.bias, g.array(layer.bias) / s.astype(np.float32))


def scale_inputs(g: Graph, layer: Layer, s: np.ndarray) -> None:
    """Multiply every weight reading input channel ``i`` by ``s_i`` (grouped convolutions included)."""
    w = g.array(layer.weight)
    factor = s[_input_index(w, layer)].astype(w.dtype)  # [out, in_per_group]
    view = _as_out_in(w, layer)
    scaled = view * factor.reshape(*factor.shape, *([1] * (view.ndim - 2)))
    order = np.argsort([layer.out_axis, layer.in_axis, *[d for d in range(w.ndim) if d not in (layer.out_axis, layer.in_axis)]])
    g.set_array(layer.weight, np.transpose(scaled, order))


def _channels(g: Graph, layer: Layer, side: str) -> int:
    w = g.inits[layer.weight].dims
    return w[layer.out_axis] if side == "out" else w[layer.in_axis] * layer.groups


def _trace_activation(g: Graph, tensor: str, depth: int = 6) -> tuple[Layer | None, list[str]]:
    """Walk back from ``tensor`` through element-wise nodes to a weighted layer: ``(layer, ops)``."""
    ops: list[str] = []
    frontier = [tensor]
    seen: set[int] = set()
    found: Layer | None = None
    for _ in range(depth):
        nxt = []
        for t in frontier:
            p = g.producer.get(t)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            layer = g.layer(p)
            if layer is not None:
                found = found or layer
                continue
            if p.op_type not in ELEMENTWISE:
                return None, ops
            ops.append(p.op_type)
            nxt.extend(i for i in p.input if i and i not in g.inits)
        frontier = nxt
    return found, ops


def find_pairs(g: Graph) -> tuple[list[_Pair], Counter[str]]:
    """Equalizable layer pairs, and a count of the pairs passed over, by reason."""
    pairs: list[_Pair] = []
    skipped: Counter[str] = Counter()
    for node in g.model.graph.node:
        second = g.layer(node)
        if second is None or node.op_type == "ConvTranspose":
            continue
        x = node.input[0]
        p = g.producer.get(x)
        if p is None:
            continue
        act: onnx.NodeProto | None = None
        first = g.layer(p)
        clip = None
        if first is None and p.op_type in (*HOMOGENEOUS, "Clip"):
            act = p
            q = g.producer.get(p.input[0])
            first = g.layer(q) if q is not None else None
            if first is None:
                continue
            if p.op_type == "Clip":
                bounds = _clip_bounds(g, p)
                if bounds is None or bounds[0] != 0.0:
                    skipped["Clip with a lower bound other than 0 (not positive-homogeneous)"] += 1
                    continue
                clip = None if math.isinf(bounds[1]) else bounds[1]
            if p.op_type == "PRelu" and p.input[1] not in g.inits:
                continue
        elif first is None:
            layer, ops = _trace_activation(g, x)
            if layer is not None and ops:
                if set(ops) <= {"Add", "Sub"}:
                    skipped["joined by an Add with another branch"] += 1
                else:
                    skipped[f"joined by {'/'.join(sorted(set(ops)))} (not positive-homogeneous)"] += 1
            continue
        if first.node.op_type == "ConvTranspose" or (first.node.op_type == "Conv") != (node.op_type == "Conv"):
            continue
        mid = first.node.output[0]
        if g.sole_reader(mid) is not (act if act is not None else node) or (
            act is not None and g.sole_reader(act.output[0]) is not node
        ):
            skipped["an intermediate tensor has other readers"] += 1
            continue
        if not (g.owns(first) and g.owns(second)):
            skipped["a weight is shared with another node"] += 1
            continue
        if _channels(g, first, "out") != _channels(g, second, "in"):
            continue
        pairs.append(_Pair(first, second, act, clip))
    return pairs, skipped


def _pair_scales(g: Graph, pair: _Pair) -> tuple[np.ndarray, int]:
    """The scales of one equalization step and how many channels the clip held at 1."""
    w1, w2 = g.array(pair.first.weight), g.array(pair.second.weight)
    r1 = output_ranges(w1, pair.first).astype(np.float64)
    r2 = input_ranges(w2, pair.second).astype(np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
    held = 0
    if pair.clip is not None:
        up = upper_bound(g, pair.first)
        free = up <= pair.clip
        s = np.where(free, np.maximum(s, np.where(up > 0, up / pair.clip, 0.0)), 1.0)
        s = np.where(s > 0, s, 1.0)
        held = int((~free).sum())
    return s, held


def equalize(model: onnx.ModelProto, data: Sequence[Feed], config: TransformConfig,
             keep: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, TransformResult]:
    """Cross-layer equalization of every eligible layer pair (see the module docstring).

    Needs no data (``data`` and ``keep`` are accepted for a uniform signature: the transform is
    exact, so layers kept in float may take part).
    """
    g = Graph(model)
    pairs, skipped = find_pairs(g)
    before = {id(p): _spread(g, p) for p in pairs}
    held: dict[int, int] = {}
    active = []
    for pair in pairs:
        s, h = _pair_scales(g, pair)
        held[id(pair)] = h
        if h < len(s):
            active.append(pair)
        else:
            skipped[f"Clip(0, {pair.clip:g}) would stop being exact in every channel"] += 1
    for _ in range(SWEEPS):
        moved = 0.0
        for pair in active:
            s, h = _pair_scales(g, pair)
            held[id(pair)] = h
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
            scale_outputs(g, pair.first, s)
            scale_inputs(g, pair.second, s)
        if moved < TOLERANCE:
            break
    records = []
    for pair in active:
        records.append({
            "first": pair.first.name, "second": pair.second.name,
            "activation": "none" if pair.act is None else pair.act.op_type,
            "channels": int(_channels(g, pair.first, "out")), "channels_held_by_clip": held[id(pair)],
            "range_spread_before": rounded(before[id(pair)], 4), "range_spread_after": rounded(_spread(g, pair), 4),
        })
    why = "; ".join(f"{n} pair(s) {reason}" for reason, n in sorted(skipped.items()))
    if not active:
        return model, TransformResult("equalize", False, "no layer pair to equalize" + (f": {why}" if why else
                                      " (no two weighted layers joined directly or by ReLU/ReLU6)"))
    detail = f"equalized {len(active)} layer pair(s)"
    if why:
        detail += f"; skipped {why}"
    return g.model, TransformResult("equalize", True, detail, records)


def _spread(g: Graph, pair: _Pair) -> float:
    """How far apart the second layer's input-channel ranges are: ``log10(max r2 / median r2)``."""
    r2 = input_ranges(g.array(pair.second.weight), pair.second).astype(np.float64)
    r2 = r2[r2 > 0]
    return float(np.log10(r2.max() / np.median(r2))) if r2.size else 0.0
