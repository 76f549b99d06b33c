"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models").

A few input channels of a transformer's MatMuls carry activations a hundred times larger than
the rest; one INT8 scale per tensor then leaves the others a handful of levels.  The weights have
no such outliers.  SmoothQuant moves the difficulty from the activation to the weight with a
per-channel scale ``s`` that leaves the product unchanged::

    Y = X W = (X diag(s)^-1) (diag(s) W),        s_j = max|X_j|^a / max|W_j|^(1-a)

``max|X_j|`` is input channel ``j``'s largest magnitude on the calibration data and ``max|W_j|`` the
largest weight of row ``j`` (over every MatMul/Gemm reading ``X``: query, key and value share one
``s``).  ``a = 0.5`` gives both sides the range ``sqrt(max|X_j| max|W_j|)``.

Where ``1/s`` goes:

* ``X`` written by a ``LayerNormalization`` (``gamma * xhat + beta``): into ``gamma`` and ``beta``,
  which costs nothing at run time.  Readers of ``X`` other than the smoothed layers (a residual
  ``Add``) get ``X`` back through a ``Mul`` by ``s``;
* anywhere else (a GELU's output, an attention context): an explicit ``Mul`` by ``1/s`` in front of
  the smoothed layers.

The inserted ``Mul`` nodes stay in float (their per-channel constant would not survive INT8); the
quantized tensor is their output, the smoothed MatMul input.

**Choosing a**: ``"auto"`` tries each ``a`` of the grid (and no smoothing at all) per group of
layers sharing an input and keeps the one with the smallest relative output error
``sum ||X W - Q(X / s) Q(s W)||^2 / sum ||X W||^2``, where ``Q`` is the INT8 quantization of the
targets: per tensor (``amax`` the largest ``max|X_j| / s_j``) for activations, per output channel
for weights.  The error is cross-validated: the calibration samples are split in two (even and odd
samples); ``max|X_j|`` and ``amax`` come from one half and the error is measured on ``rows`` rows
of the other, both ways round.  Per-channel maxima from few samples do not hold on new data (on
EfficientNet-Lite0's 19 calibration images, the evaluation images exceed a classifier input
channel's calibration maximum by 1.6x at the median and 6x at the 90th percentile); smoothing by them
then clips, which the held-out half shows and the in-sample error hides.  A group where smoothing
does not lower the error is left as it is.  The final ``s`` uses the maxima of all samples.  The
smoothed FP32 model computes the original outputs up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantlab.config import TransformConfig
from quantlab.transforms.graph import Feed, Graph, Layer, attr, fake_quantize_weight, run_batches, samples_of
from quantlab.transforms.result import TransformResult, rounded

S_MIN, S_MAX = 1e-5, 1e5


@dataclass
class _Group:
    tensor: str
    layers: list[Layer]
    ln: onnx.NodeProto | None
    channels: int
    cmax: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), np.float32))  # per half: even, odd samples
    rows: tuple[list[np.ndarray], list[np.ndarray]] = field(default_factory=lambda: ([], []))


def _row_matrix(g: Graph, layer: Layer) -> np.ndarray:
    """The layer's weight as ``[K, N]``: row ``j`` multiplies input channel ``j``."""
    w = g.array(layer.weight)
    return w.T if layer.in_axis == 1 else w


def _foldable_ln(g: Graph, tensor: str, channels: int) -> onnx.NodeProto | None:
    """The LayerNormalization writing ``tensor`` when its gamma/beta can take ``1/s``."""
    p = g.producer.get(tensor)
    if p is None or p.op_type != "LayerNormalization" or p.output[0] != tensor:
        return None
    axis = int(attr(p, "axis", -1))
    if axis != -1:
        return None  # gamma would not be per channel of the last axis
    params = [n for n in p.input[1:3] if n]
    for name in params:
        if name not in g.inits or g.readers_of(name) != 1 or g.inits[name].dims != [channels]:
            return None
    return p


def find_groups(g: Graph, keep: frozenset[str]) -> list[_Group]:
    """Tensors read by at least one MatMul/Gemm with a constant weight, with those readers."""
    groups: dict[str, _Group] = {}
    for node in g.model.graph.node:
        layer = g.layer(node)
        if layer is None or node.op_type not in ("MatMul", "Gemm") or layer.name in keep or not g.owns(layer):
            continue
        x = node.input[0]
        if x in g.inits:
            continue
        k = g.inits[layer.weight].dims[layer.in_axis]
        group = groups.setdefault(x, _Group(x, [], None, k))
        if group.channels == k:
            group.layers.append(layer)
    out = []
    for group in groups.values():
        group.ln = _foldable_ln(g, group.tensor, group.channels)
        out.append(group)
    return out


def collect(model: onnx.ModelProto, groups: list[_Group], data: Sequence[Feed], rows: int) -> None:
    """Per group and half of the samples (even, odd): ``max|X_j|`` over all their rows, and every
    ``stride``-th row, so that each half keeps about ``rows`` rows (deterministic)."""
    names = [gr.tensor for gr in groups]
    total = samples_of(data)
    strides: dict[str, int] = {}
    first = 0  # index of the batch's first sample
    for feed, values in zip(data, run_batches(model, data, names)):
        n = next(iter(feed.values())).shape[0]
        parity = (first + np.arange(n)) % 2
        for gr, x in zip(groups, values):
            x3 = np.asarray(x, np.float32).reshape(n, -1, gr.channels)  # [sample, row, channel]
            if gr.tensor not in strides:
                strides[gr.tensor] = max(1, math.ceil(total * x3.shape[1] / 2 / rows))
                gr.cmax = np.zeros((2, gr.channels), np.float32)
            for half in (0, 1):
                part = x3[parity == half].reshape(-1, gr.channels)
                if part.size:
                    gr.cmax[half] = np.maximum(gr.cmax[half], np.abs(part).max(axis=0))
                    gr.rows[half].append(part[:: strides[gr.tensor]].copy())
        first += n


def smoothing_scale(cmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^a / max|W_j|^(1-a)`` (float32), 1 where either maximum is 0.

    Example: ``max|X_j| = 64``, ``max|W_j| = 0.25``, ``a = 0.5``: ``s = 8 / 0.5 = 16``; the channel's
    activations shrink to at most 4 and its weights grow to at most 4.
    """
    ok = (cmax > 0) & (wmax > 0)
    c = np.where(ok, cmax, 1.0).astype(np.float64)
    w = np.where(ok, wmax, 1.0).astype(np.float64)
    s = np.where(ok, c**alpha / w ** (1.0 - alpha), 1.0)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def _fake_quantize_activation(x: np.ndarray, amax: float) -> np.ndarray:
    step = np.float32(amax / 127.0) if amax > 0 else np.float32(1.0)
    return (np.clip(np.round(x / step), -127, 127) * step).astype(np.float32)


def output_error(rows: np.ndarray, cmax: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                 reference: list[np.ndarray] | None = None) -> float:
    """Relative squared error of the group's outputs after INT8 quantization with smoothing ``s``.

    ``reference`` may hold the FP32 outputs ``rows @ w`` of each weight, computed once per group.
    """
    xs = rows / s
    xq = _fake_quantize_activation(xs, float(np.max(cmax / s)))
    num = den = 0.0
    for k, w in enumerate(weights):
        ref = rows @ w if reference is None else reference[k]
        diff = ref - xq @ fake_quantize_weight(w * s[:, None], 1)
        num += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        den += float(np.einsum("ij,ij->", ref, ref, dtype=np.float64))
    return num / den if den > 0 else 0.0


def _folds(group: _Group, weights: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """Per fold: the held-out rows, ``max|X_j|`` of the other half, and the FP32 outputs of those
    rows; one in-sample fold when a half has no sample (a single calibration sample)."""
    halves = [np.concatenate(r) if r else np.zeros((0, group.channels), np.float32) for r in group.rows]
    if len(halves[0]) and len(halves[1]):
        pairs = [(halves[1], group.cmax[0]), (halves[0], group.cmax[1])]
    else:
        pairs = [(np.concatenate(halves), group.cmax.max(axis=0))]
    return [(rows, cmax, [rows @ w for w in weights]) for rows, cmax in pairs]


def _apply(g: Graph, group: _Group, s: np.ndarray) -> list[str]:
    """Rewrite the graph for smoothing ``s``; returns the names of the ``Mul`` nodes it added."""
    added: list[str] = []
    for layer in group.layers:
        w = g.array(layer.weight)
        g.set_array(layer.weight, w * (s[None, :] if layer.in_axis == 1 else s[:, None]))
    x = group.tensor
    smoothed = {id(layer.node) for layer in group.layers}
    if group.ln is not None:
        for name in [n for n in group.ln.input[1:3] if n]:
            g.set_array(name, g.array(name) / s)
        others = [n for n in g.readers.get(x, []) if id(n) not in smoothed]
        if not others and x not in g.outputs:
            return added
        # the LN now writes X / s; everyone but the smoothed layers reads X = (X / s) * s
        new = g.unique(f"{x}_smoothed")
        g.copy_value_info(x, new)
        group.ln.output[0] = new
        for layer in group.layers:
            _rename_input(layer.node, x, new)
        g.refresh()
        const = g.add_initializer(f"{x}_smoothquant_scale", s.astype(np.float32))
        name = g.unique(f"{group.ln.name or x}_smoothquant_restore")
        g.insert_after(new, onnx.helper.make_node("Mul", [new, const], [x], name=name))
        added.append(name)
        return added
    new = g.unique(f"{x}_smoothed")
    g.copy_value_info(x, new)
    const = g.add_initializer(f"{x}_smoothquant_inverse", (1.0 / s).astype(np.float32))
    name = g.unique(f"{x}_smoothquant")
    for layer in group.layers:
        _rename_input(layer.node, x, new)
    g.insert_after(x, onnx.helper.make_node("Mul", [x, const], [new], name=name))
    added.append(name)
    return added


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def smoothquant(model: onnx.ModelProto, data: Sequence[Feed], config: TransformConfig,
                keep: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, TransformResult]:
    """Smooth every group of MatMul/Gemm layers sharing an input (see the module docstring).

    ``keep`` names nodes that stay in float: they are not smoothed.
    """
    g = Graph(model)
    groups = find_groups(g, keep)
    if not groups:
        return model, TransformResult("smoothquant", False, "no MatMul or Gemm with a constant weight to smooth")
    collect(model, groups, data, config.smoothquant_rows)
    alphas = list(config.smoothquant_grid) if config.smoothquant_alpha == "auto" else [float(config.smoothquant_alpha)]
    records = []
    added: list[str] = []
    folded = explicit = 0
    for group in groups:
        weights = [_row_matrix(g, layer) for layer in group.layers]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        folds = _folds(group, weights)
        ones = np.ones(group.channels, np.float32)

        def error(alpha: float | None) -> float:
            """Mean over the two folds of the held-out error with maxima from the other half."""
            errs = [output_error(rows, cmax, weights, ones if alpha is None else smoothing_scale(cmax, wmax, alpha), ref)
                    for rows, cmax, ref in folds]
            return float(np.mean(errs))

        base = error(None)
        best, best_err = None, base
        for a in alphas:
            err = error(a)
            if err < best_err or config.smoothquant_alpha != "auto":
                best, best_err = a, err
        record = {"input": group.tensor, "layers": [layer.name for layer in group.layers],
                  "error_before": rounded(base, 8), "error_after": rounded(best_err, 8),
                  "alpha": best, "fold": "none"}
        if best is not None:
            record["fold"] = "layernorm" if group.ln is not None else "mul"
            folded += group.ln is not None
            explicit += group.ln is None
            added += _apply(g, group, smoothing_scale(group.cmax.max(axis=0), wmax, best))
        records.append(record)
    smoothed = folded + explicit
    if not smoothed:
        return model, TransformResult("smoothquant", False, f"no group of the {len(groups)} MatMul/Gemm input(s) "
                                      "had a lower INT8 error with smoothing: model left as it is", records)
    ln = sum(1 for gr in groups if gr.ln is not None)
    detail = (f"smoothed {smoothed} of {len(groups)} MatMul/Gemm input(s): {folded} folded into a LayerNormalization"
              f"{'' if ln else ' (none writes one)'}, {explicit} by an explicit Mul; "
              f"{len(added)} Mul node(s) kept in float")
    return g.model, TransformResult("smoothquant", True, detail, records, added)
