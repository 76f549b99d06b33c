"""Quantizers on a converted graph and its Q/DQ export; QAT of a converted tiny model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from quantlab.collect import ort_session
from quantlab.config import load_config, override
from quantlab.qdq.lint import lint_tensorrt

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")

from quantlab.qat import run_qat  # noqa: E402
from quantlab.qat.convert import convert, run_onnx_module  # noqa: E402
from quantlab.qat.graph import attach_quantizers, export_qdq, plan_from_qdq, plan_weighted  # noqa: E402


def _feed(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _scales(model: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor -> amax (scale * 127) of every QuantizeLinear of a quantlab Q/DQ model."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) * 127 for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_untrained_export_is_the_ptq_model(tiny_run):
    """Quantizers placed and ranged as the run's tensorrt model, exported without training, give
    that model back: same Q/DQ edges, same scales, same INT8 weights, the same outputs."""
    run, _ = tiny_run
    fp32 = onnx.load(str(run / "model_fp32.onnx"))
    ptq = onnx.load(str(run / "int8" / "mse.tensorrt.onnx"))
    plan = plan_from_qdq(fp32, ptq)
    assert set(plan.tensors) == set(_scales(ptq))
    assert sorted(w for w, _ in plan.weights.values()) == ["w1", "w2", "w3"]
    module = convert(fp32)
    quantizers = attach_quantizers(module, plan, _scales(ptq))
    assert quantizers.fallback == [] and sorted(quantizers.mapped) == sorted(_scales(ptq))
    exported = export_qdq(module, fp32, plan, quantizers)
    onnx.checker.check_model(exported)
    assert lint_tensorrt(exported)
    feed = _feed()
    expected = ort_session(ptq).run(None, feed)[0]
    got = ort_session(exported).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # the fake-quantized module computes what the exported Q/DQ model computes
    np.testing.assert_allclose(run_onnx_module(module, feed)[0], got, rtol=1e-4, atol=1e-4)


def test_plan_weighted_quantizes_every_weighted_layer():
    from conftest import conv_net

    model = onnx.helper.make_model(conv_net(), opset_imports=[onnx.helper.make_opsetid("", 17)])
    plan = plan_weighted(model)
    assert plan.activations == {("conv1", 0): "input", ("conv2", 0): "r1", ("fc", 0): "flat"}
    assert plan.weights == {("conv1", 1): ("w1", 0), ("conv2", 1): ("w2", 0), ("fc", 1): ("w3", 0)}


def test_qat_of_a_converted_tiny_model_exports_lint_clean_qdq(tiny_run, tmp_path):
    """The ONNX-only path end to end: train the converted graph, export, check; deterministic."""
    run, config_path = tiny_run
    config = override(load_config(config_path), "qat", epochs=2, lr=1e-3, optimizer="adam", calib_batches=1)
    fp32 = run / "model_fp32.onnx"
    placement = run / "int8" / "minmax.tensorrt.onnx"
    train = [_feed(4, seed) for seed in range(3)]
    amax = _scales(onnx.load(str(placement)))
    del amax["input"]  # one tensor without a quantlab range: modelopt's max calibration takes it
    scores = []

    def evaluate(path):
        ref = ort_session(str(fp32)).run(None, _feed(8, 9))[0]
        out = ort_session(str(path)).run(None, _feed(8, 9))[0]
        scores.append(float(-np.mean((ref - out) ** 2)))
        return scores[-1]

    a = run_qat(config, amax=amax, out=tmp_path / "a.onnx", train=train, model=fp32, placement=placement,
                evaluate=evaluate)
    b = run_qat(config, amax=amax, out=tmp_path / "b.onnx", train=train, model=fp32, placement=placement)
    assert a.source == "onnx" and a.loss == "distill" and a.epochs == 2 and a.steps == 6
    assert a.tensorrt_rules == "pass" and lint_tensorrt(str(a.path))
    assert a.conversion["cosine"] > 0.9999
    assert a.fallback == ["input"] and a.mapped == a.quantizers - 1
    assert a.metrics == scores and a.best_epoch == 1 + int(np.argmax(scores))
    c = run_qat(config, amax=amax, out=tmp_path / "c.onnx", train=train, model=fp32, placement=placement)
    assert a.losses == b.losses == c.losses and b.metrics == []
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()  # same inputs, same bytes
    model = onnx.load(str(a.path))
    assert [n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")] == [
        n.name for n in onnx.load(str(fp32)).graph.node
    ]  # a Q/DQ copy of the FP32 graph: compare's per-layer analysis reads it
    assert not list(tmp_path.glob(".*"))


def test_qat_result_json_is_ready(tiny_run, tmp_path):
    run, config_path = tiny_run
    config = override(load_config(config_path), "qat", epochs=1, calib_batches=1)
    r = run_qat(config, amax={}, out=tmp_path / "m.onnx", train=[_feed()], model=run / "model_fp32.onnx")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["source"] == "onnx" and d["stop"] == "epochs" and d["mapped"] == 0 and d["tensorrt_rules"] == "pass"
    assert dataclasses.asdict(r)["quantizers"] == 3  # the activation inputs of the three weighted layers
