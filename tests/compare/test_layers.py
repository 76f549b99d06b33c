"""Per-layer errors, sensitivity and keep_float on the tiny conv model (both targets) and EfficientNet-Lite0."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantlab.calibrators import get_calibrator
from quantlab.collect import collect_stats, ort_session
from quantlab.compare.layers import SQNR_CAP_DB, keep_float, keep_fp16, layer_errors, sensitivity, sqnr_db
from quantlab.errors import QuantlabError
from quantlab.model import prepare_model
from quantlab.qdq.targets import TARGETS, compute_ranges, write_qdq_model

from conftest import ROOT, conv_net, save_model


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The prepared tiny conv net and its minmax Q/DQ model for each target, plus three seeded batches."""
    folder = tmp_path_factory.mktemp("layers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_CACHE", str(folder / "cache"))
        pm = prepare_model(save_model(conv_net(), folder / "tiny.onnx"))
    g = np.random.default_rng(0)
    calib = [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    stats = collect_stats(pm, calib)
    models = {}
    for name, target in TARGETS.items():
        out = folder / f"{name}.onnx"
        write_qdq_model(pm.path, compute_ranges(stats, get_calibrator("minmax"), target), target, out)
        models[name] = onnx.load(str(out))
    fp32 = onnx.load(str(pm.path))
    g = np.random.default_rng(7)
    feeds = [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    return fp32, models, feeds


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


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_keep_float_everything_is_fp32(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    names = [r.node for r in layer_errors(fp32, models[target], feeds)]
    model = keep_float(models[target], fp32, names)
    onnx.checker.check_model(model)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert sorted(n.op_type for n in model.graph.node) == sorted(n.op_type for n in fp32.graph.node)
    for a, b in zip(_run(model, feeds), _run(fp32, feeds)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_keep_float_one_node(tiny_pair, target):
    fp32, models, feeds = tiny_pair
    q = models[target]
    model = keep_float(q, fp32, ["conv2"])
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    originals = {n.name: n for n in q.graph.node}
    conv2 = nodes["conv2"]
    assert conv2.input[1] == "w2" and conv2.input[2] == "b2"  # FP32 weights and bias
    assert conv2.input[0] in ("r1", "r1::float")  # the float activation, before the Q/DQ pair
    # the shared Q/DQ of r1 still feeds the residual Add; w2's DQ and its initializers are gone
    assert nodes["add1"].input[1] == "r1_DequantizeLinear_Output"
    assert "r1_QuantizeLinear" in nodes and "w2_DequantizeLinear" not in nodes
    inits = {i.name for i in model.graph.initializer}
    assert "w2_quantized" not in inits and "w2_scale" not in inits and "w2" in inits
    for name, node in originals.items():  # every other node as it was
        if name not in ("conv2", "w2_DequantizeLinear", "b2_DequantizeLinear"):
            assert nodes[name] == node, name
    # numerically: INT8 everywhere but conv2, which matches FP32 conv2 on the same (INT8-upstream) input
    (out,) = _run(model, feeds)
    (ref,) = _run(fp32, feeds)
    (int8,) = _run(q, feeds)
    assert not np.array_equal(out, int8) and not np.array_equal(out, ref)


def test_keep_fp16_structure_and_values(tiny_pair):
    fp32, models, feeds = tiny_pair
    q = models["tensorrt"]
    model = keep_fp16(q, fp32, ["conv2", "add1", "fc"])
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    conv2, add1 = nodes["conv2"], nodes["add1"]
    # conv2 reads its activation through a Cast to float16 and float16 copies of w2 and b2
    assert inits[conv2.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert inits[conv2.input[2]].data_type == onnx.TensorProto.FLOAT16
    assert "w2" not in inits and "w2_quantized" not in inits
    cast_in = next(n for n in model.graph.node if n.output[0] == conv2.input[0])
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT16
    # two FP16 layers in a row pass float16 directly; add1's output is cast back for the pooling
    assert add1.input[0] == conv2.output[0]
    cast_out = next(n for n in model.graph.node if add1.output[0] in n.input)
    assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "Cast" and conv2.output[0] in n.input for n in model.graph.node)
    assert inits[nodes["fc"].input[1]].data_type == onnx.TensorProto.FLOAT16
    logits = next(n for n in model.graph.node if n.output[0] == "logits")  # the graph output, cast back
    assert logits.op_type == "Cast" and logits.input[0] == nodes["fc"].output[0]
    # every other layer keeps its Q/DQ: only those of the three kept layers are gone
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) < sum(
        n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert nodes["conv1"] == next(n for n in q.graph.node if n.name == "conv1")
    # it evaluates: close to the FP32 partial model (float16 rounding only), different from it
    (half,) = _run(model, feeds)
    (full,) = _run(keep_float(q, fp32, ["conv2", "add1", "fc"]), feeds)
    assert half.dtype == np.float32
    assert not np.array_equal(half, full)
    assert np.abs(half - full).max() <= 1e-2 * np.abs(full).max()
    assert keep_fp16(q, fp32, ["conv2", "add1", "fc"]).SerializeToString() == model.SerializeToString()


def test_keep_fp16_of_every_layer_is_the_fp16_model(tiny_pair):
    fp32, models, feeds = tiny_pair
    q = models["tensorrt"]
    names = [r.node for r in layer_errors(fp32, q, feeds)]
    model = keep_fp16(q, fp32, names)
    onnx.checker.check_model(model)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    # every quantized layer reads float16 only; the float nodes between them (Relu, pooling) stay float32
    halves = {o for n in model.graph.node for o in n.output if o.endswith("::fp16")}
    for n in model.graph.node:
        if n.name in names:
            assert all(x in halves or x.endswith("::fp16") for x in n.input), n.name
    casts = [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "Cast"]
    assert casts == [("input", "input::fp16"), ("c1::fp16", "c1"), ("r1", "r1::fp16"), ("a1::fp16", "a1"),
                     ("flat", "flat::fp16"), ("logits::fp16", "logits")]
    (half,) = _run(model, feeds)
    (ref,) = _run(fp32, feeds)
    assert np.abs(half - ref).max() <= 1e-2 * np.abs(ref).max()


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
    with pytest.raises(QuantlabError, match="not a quantized layer"):
        keep_float(models["tensorrt"], fp32, ["relu1"])
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
