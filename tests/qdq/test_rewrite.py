"""Rewriting one quantize_static model for other ranges gives, byte for byte, what quantize_static writes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrators import get_calibrator
from quantlab.collect import collect_stats
from quantlab.config import load_config
from quantlab.model import prepare_model
from quantlab.ptq import gather_stats, resolve_model
from quantlab.qdq.targets import TARGETS, TensorRange, compute_ranges, plan_rewrite, write_qdq_model

from conftest import ROOT, save_model

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def _direct(model_path, ranges, target, tmp_path) -> bytes:
    out = tmp_path / "direct.onnx"
    write_qdq_model(model_path, ranges, target, out)
    return out.read_bytes()


def _plan(model_path, ranges, target, tmp_path):
    base = onnx.load_model_from_string(_direct(model_path, ranges, target, tmp_path))
    return base, plan_rewrite(onnx.load(str(model_path)), base, ranges, target)


@pytest.fixture
def calibrated(tiny_model):
    pm = prepare_model(tiny_model)
    g = np.random.default_rng(0)
    return pm, collect_stats(pm, [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(5)])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_calibrator_rewrites_to_the_quantize_static_bytes(calibrated, tmp_path, target):
    pm, stats = calibrated
    t = TARGETS[target]
    _, rewrite = _plan(pm.path, compute_ranges(stats, get_calibrator("minmax"), t), t, tmp_path)
    assert rewrite is not None
    for name in CALIBRATORS:
        ranges = compute_ranges(stats, get_calibrator(name), t)
        model = rewrite.apply(ranges)
        assert model is not None, name
        assert model.SerializeToString() == _direct(pm.path, ranges, t, tmp_path), name


def _extreme_ranges(stats, seed: int) -> dict[str, TensorRange]:
    """Ranges ONNX Runtime must widen, symmetrize or guard: zero, one-sided, huge, tiny."""
    g = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(sorted(stats.tensors)):
        kind = (i + seed) % 5
        if kind == 0:
            lo, hi = 0.0, 0.0
        elif kind == 1:
            lo, hi = 0.5 + g.random(), 2.0 + g.random()  # strictly positive: widened to hold 0
        elif kind == 2:
            lo, hi = -3.0 - g.random(), -1.0  # strictly negative
        elif kind == 3:
            lo, hi = -1e-12, 3e-12  # tiny: the INT32 bias forces larger weight scales
        else:
            lo, hi = -1e4 * g.random(), 1e5 * g.random()
        out[name] = TensorRange(max(abs(lo), abs(hi)), lo, hi)
    for name, source in stats.folded.items():
        out[name] = out[source]
    return out


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_extreme_ranges_rewrite_exactly(calibrated, tmp_path, target):
    pm, stats = calibrated
    t = TARGETS[target]
    base = _extreme_ranges(stats, 0)
    _, rewrite = _plan(pm.path, base, t, tmp_path)
    assert rewrite is not None
    for seed in range(1, 6):
        ranges = _extreme_ranges(stats, seed)
        model = rewrite.apply(ranges)
        assert model is not None and model.SerializeToString() == _direct(pm.path, ranges, t, tmp_path), seed
    # and back from an extreme model to ordinary ranges
    ranges = compute_ranges(stats, get_calibrator("entropy"), t)
    assert rewrite.apply(ranges).SerializeToString() == _direct(pm.path, ranges, t, tmp_path)


def test_tiny_input_scale_enlarges_weight_scales_as_onnx_runtime_does(calibrated, tmp_path):
    pm, stats = calibrated
    t = TARGETS["ort-cpu"]
    ranges = compute_ranges(stats, get_calibrator("minmax"), t)
    base, rewrite = _plan(pm.path, ranges, t, tmp_path)
    tiny = dict(ranges, input=TensorRange(1e-12, -1e-12, 1e-12))
    model = rewrite.apply(tiny)
    assert model.SerializeToString() == _direct(pm.path, tiny, t, tmp_path)
    scales = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer}["w1_scale"] for m in (base, model)]
    assert (scales[1] > scales[0]).all()  # w1's scale grew to keep b1 within INT32


def _softmax_clip_net() -> onnx.GraphProto:
    """input -> Conv -> Clip(0, 6) -> Conv -> Relu -> MaxPool -> Flatten -> Gemm -> Softmax."""
    g = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(g.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(g.standard_normal(4).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(g.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(g.standard_normal(4).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(g.standard_normal((5, 64)).astype(np.float32) * 0.2, "w3"),
        numpy_helper.from_array(g.standard_normal(5).astype(np.float32) * 0.1, "b3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["k1"], name="clip1"),
        helper.make_node("Conv", ["k1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1, beta=0.5),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])
    return helper.make_graph(nodes, "softmax_clip_net", [x], [y], inits)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_clip_softmax_pooling_and_gemm_beta(tmp_path, target):
    pm = prepare_model(save_model(_softmax_clip_net(), tmp_path / "net.onnx"))
    g = np.random.default_rng(4)
    stats = collect_stats(pm, [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)])
    t = TARGETS[target]
    _, rewrite = _plan(pm.path, compute_ranges(stats, get_calibrator("minmax"), t), t, tmp_path)
    assert rewrite is not None
    for name in CALIBRATORS[1:]:
        ranges = compute_ranges(stats, get_calibrator(name), t)
        assert rewrite.apply(ranges).SerializeToString() == _direct(pm.path, ranges, t, tmp_path), name


def test_unmapped_initializers_mean_no_rewrite(calibrated, tmp_path):
    pm, stats = calibrated
    fp32 = onnx.load(str(pm.path))
    t = TARGETS["ort-cpu"]
    ranges = compute_ranges(stats, get_calibrator("minmax"), t)
    base, rewrite = _plan(pm.path, ranges, t, tmp_path)
    assert rewrite is not None

    renamed = onnx.ModelProto()
    renamed.CopyFrom(base)
    for init in renamed.graph.initializer:
        if init.name == "c2_scale":
            init.name = "c2_step"
    for node in renamed.graph.node:
        node.input[:] = ["c2_step" if i == "c2_scale" else i for i in node.input]
    assert plan_rewrite(fp32, renamed, ranges, t) is None  # a name outside ONNX Runtime's pattern

    shared = onnx.ModelProto()
    shared.CopyFrom(base)
    mul = helper.make_node("Mul", ["logits", "a1_scale"], ["scaled"], name="extra")
    shared.graph.node.append(mul)
    assert plan_rewrite(fp32, shared, ranges, t) is None  # a scale read by something else than Q/DQ

    tampered = onnx.ModelProto()
    tampered.CopyFrom(base)
    for init in tampered.graph.initializer:
        if init.name == "r1_scale":
            init.float_data[0] *= 1.5
    assert plan_rewrite(fp32, tampered, ranges, t) is None  # its own ranges do not give it back

    other = compute_ranges(stats, get_calibrator("mse"), t)
    assert rewrite.apply({k: v for k, v in other.items() if k != "a1"}) is None  # other tensors: other graph


@pytest.mark.slow
def test_efficientnet_rewrites_to_the_quantize_static_bytes(tmp_path):
    config = load_config(ROOT / "quantlab.toml")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_samples=8))
    pm = prepare_model(resolve_model(config), config.model.input_shapes)
    stats = gather_stats(config, pm)
    for target in TARGETS.values():
        _, rewrite = _plan(pm.path, compute_ranges(stats, get_calibrator("minmax"), target), target, tmp_path)
        assert rewrite is not None, target.name
        for name in CALIBRATORS[1:]:
            ranges = compute_ranges(stats, get_calibrator(name), target)
            assert rewrite.apply(ranges).SerializeToString() == _direct(pm.path, ranges, target, tmp_path), (target.name, name)
