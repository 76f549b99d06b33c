"""Per-layer errors and sensitivity on the tiny conv model (both targets) and EfficientNet-Lite0."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantlab.collect import ort_session
from quantlab.compare.layers import SQNR_CAP_DB, layer_errors, sensitivity, sqnr_db
from quantlab.errors import QuantlabError
from quantlab.qdq.keep import keep_float
from quantlab.qdq.targets import TARGETS

from conftest import ROOT


def _run(model, feeds):
    session = ort_session(model)
    return [np.concatenate(x) for x in zip(*(session.run(None, f) for f in feeds))]


def _conv_nchw(x, w, b, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    k = w.shape[-1]
    ho, wo = h - k + 1, wd - k + 1
    cols = np.stack([x[:, :, i:i + ho, j:j + wo] for i in range(k) for j in range(k)], axis=2)  # n c kk ho wo
    cols = cols.reshape(n, c * k * k, ho, wo)
    return np.einsum("nphw,op->nohw", cols, w.reshape(w.shape[0], -1)) + b[None, :, None, None]


def _qdq(x, scale, zp, dtype):
    info = np.iinfo(dtype)
    q = np.clip(np.rint(x / scale) + zp, info.min, info.max)
    return (q - zp) * scale


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_own_error_of_a_conv_matches_numpy(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    q = models[target]
    rows = {r.node: r for r in layer_errors(fp32, q, feeds)}
    conv2 = rows["conv2"]
    assert conv2.op_type == "Conv" and conv2.output == "c2" and conv2.activations == ("r1",) and conv2.weights[0] == "w2"
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in q.graph.initializer}
    raw = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    f_inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in fp32.graph.initializer}
    x = np.concatenate([np.maximum(_conv_nchw(f["input"].astype(np.float64), f_inits["w1"], f_inits["b1"], 1), 0) for f in feeds])
    # the activation: per tensor, the INT8 model's own scale, zero-point and dtype
    xq = _qdq(x, inits["r1_scale"], inits["r1_zero_point"], raw["r1_zero_point"].dtype)
    # the weight: per output channel (axis 0) from the stored INT8 values
    (dq,) = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w2_quantized"]
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0 and inits["w2_scale"].shape == (8,)
    wq = inits["w2_quantized"] * inits["w2_scale"][:, None, None, None]
    bq = inits["b2_quantized"] * inits["b2_quantized_scale"] if "b2_quantized" in inits else f_inits["b2"]
    y = _conv_nchw(x, f_inits["w2"], f_inits["b2"], 1)
    yq = _conv_nchw(xq, wq, bq, 1)
    expected = 20 * math.log10(np.linalg.norm(y) / np.linalg.norm(y - yq))
    assert conv2.own_sqnr_db == pytest.approx(expected, abs=1e-3)
    assert 20 < conv2.own_sqnr_db < 80


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_rows_accumulation_and_determinism(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    rows = layer_errors(fp32, models[target], feeds)
    expected = ["conv1", "conv2", "add1", "fc"] if target == "tensorrt" else ["conv1", "conv2", "add1", "gap", "flatten", "fc"]
    assert [r.node for r in rows] == expected
    first = rows[0]
    assert first.accumulated_sqnr_db == pytest.approx(first.own_sqnr_db, abs=1e-9)
    add = next(r for r in rows if r.node == "add1")
    # tensorrt quantizes only the skip input of the residual Add; ort-cpu both
    assert add.activations == (("r1",) if target == "tensorrt" else ("c2", "r1")) and add.weights == ()
    # error accumulates: downstream layers are worse in the full INT8 model than on their own
    assert all(r.accumulated_sqnr_db < r.own_sqnr_db for r in rows[1:])
    assert [r.to_dict() for r in layer_errors(fp32, models[target], feeds)] == [r.to_dict() for r in rows]
    assert set(rows[0].to_dict()) == {"node", "op_type", "output", "activations", "weights", "own_sqnr_db", "accumulated_sqnr_db"}


def _score_against(reference):
    def score(outputs):
        d = outputs[0].astype(np.float64) - reference
        return -float(np.sqrt(np.mean(d * d)))

    return score


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_sensitivity_subgraphs_equal_full_reruns(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    score = _score_against(_run(fp32, feeds)[0])
    fast = sensitivity(fp32, models[target], feeds, score)
    full = sensitivity(fp32, models[target], feeds, score, method="full")
    assert [r.to_dict() for r in fast] == [r.to_dict() for r in full]
    assert [r.score for r in fast] == sorted(r.score for r in fast)  # worst (lowest) first
    assert all(r.score < 0 for r in fast)
    # one layer quantized alone equals the INT8 model with every other layer kept in float
    names = [r.node for r in layer_errors(fp32, models[target], feeds)]
    only = {r.node: r.score for r in sensitivity(fp32, models[target], feeds, score, layers=["conv2", "add1"])}
    assert set(only) == {"conv2", "add1"}
    for name in only:
        partial = keep_float(models[target], fp32, [n for n in names if n != name])
        assert only[name] == pytest.approx(score(_run(partial, feeds)), rel=1e-6)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_memory_bound_changes_grouping_not_numbers(tiny_pair, target, monkeypatch):
    """A small memory bound splits sensitivity into several FP32 runs and errors into smaller batches."""
    from quantlab.compare import layers as L

    fp32, models, feeds = tiny_pair
    score = _score_against(_run(fp32, feeds)[0])
    runs = []
    real = L._Exposed

    class Counting(real):
        def __call__(self, feed):
            runs.append((len(self.names), next(iter(feed.values())).shape[0]))
            return super().__call__(feed)

    monkeypatch.setattr(L, "_Exposed", Counting)
    roomy = sensitivity(fp32, models[target], feeds, score)
    roomy_runs, runs[:] = list(runs), []
    tight = sensitivity(fp32, models[target], feeds, score, memory_bytes=1)
    assert [r.to_dict() for r in tight] == [r.to_dict() for r in roomy]
    # roomy: one probe on one sample, then one FP32 run per batch; tight: one FP32 run per layer and batch
    assert len(roomy_runs) == 1 + len(feeds)
    assert len(runs) == 1 + len(roomy) * len(feeds)
    runs[:] = []
    errors = layer_errors(fp32, models[target], feeds)
    whole_batches = list(runs)
    runs[:] = []
    small = layer_errors(fp32, models[target], feeds, memory_bytes=1)
    assert all(n == 4 for _, n in whole_batches[2:])  # after the two one-sample probes
    assert runs[2:] and all(n == 1 for _, n in runs[2:])  # one sample at a time
    for a, b in zip(errors, small):
        assert (a.node, a.activations, a.weights) == (b.node, b.activations, b.weights)
        assert a.own_sqnr_db == pytest.approx(b.own_sqnr_db, abs=1e-4)  # kernels round per batch size
        assert a.accumulated_sqnr_db == pytest.approx(b.accumulated_sqnr_db, abs=1e-4)


def test_sqnr_edge_cases():
    assert sqnr_db(0.0, 0.0) == SQNR_CAP_DB  # zero output, no error
    assert sqnr_db(4.0, 0.0) == SQNR_CAP_DB  # no error
    assert sqnr_db(0.0, 1.0) == -SQNR_CAP_DB  # zero output, some error
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1e83, math.inf) == -SQNR_CAP_DB  # an infinite error (a -FLT_MAX mask became -inf)
    assert sqnr_db(1e-300, 1e300) == -SQNR_CAP_DB  # below float range
    assert math.isnan(sqnr_db(math.nan, 1.0)) and math.isnan(sqnr_db(math.inf, math.inf))


def test_layer_without_error_gets_the_cap(tiny_pair):
    fp32, models, _ = tiny_pair
    zeros = [{"input": np.zeros((2, 3, 8, 8), np.float32)}]
    rows = {r.node: r for r in layer_errors(fp32, models["tensorrt"], zeros)}
    assert rows["conv1"].own_sqnr_db == SQNR_CAP_DB  # 0 is exact in every symmetric grid; bias is float


def test_bad_arguments(tiny_pair):
    fp32, models, feeds = tiny_pair
    with pytest.raises(QuantlabError, match="no array for model input"):
        layer_errors(fp32, models["tensorrt"], {"x": feeds[0]["input"]})
    with pytest.raises(QuantlabError, match="unknown sensitivity method"):
        sensitivity(fp32, models["tensorrt"], feeds, lambda o: 0.0, method="fast")


@pytest.mark.slow
def test_efficientnet_lite0_subgraphs_equal_full_reruns(tmp_path_factory):
    from quantlab.config import load_config, override
    from quantlab.ptq import run_ptq

    config = override(
        load_config(ROOT / "quantlab.toml"), "ptq", out=str(tmp_path_factory.mktemp("reports")),
        calibrators=("minmax",), targets=("tensorrt", "ort-cpu"), latency_runs=0,
    )
    run = run_ptq(config).run_dir
    fp32 = onnx.load(str(run / "model_fp32.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    feeds = [{"input": x[:2]}, {"input": x[2:]}]
    score = _score_against(_run(fp32, feeds)[0])
    for target in ("tensorrt", "ort-cpu"):
        q = onnx.load(str(run / f"int8/minmax.{target}.onnx"))
        names = [r.node for r in layer_errors(fp32, q, feeds)]
        assert len(names) >= 59  # 49 convolutions, the classifier and 9 residual adds
        few = [names[0], names[len(names) // 2], names[-1]]
        fast = sensitivity(fp32, q, feeds, score, layers=few)
        full = sensitivity(fp32, q, feeds, score, layers=few, method="full")
        assert [r.to_dict() for r in fast] == [r.to_dict() for r in full]
        model = keep_float(q, fp32, names)
        onnx.checker.check_model(model)
        assert np.array_equal(_run(model, feeds)[0], _run(fp32, feeds)[0])
