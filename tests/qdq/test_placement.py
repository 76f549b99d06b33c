"""Placement rules per target: which node inputs get Q/DQ (quantlab.qdq.placement)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrators import get_calibrator
from quantlab.cli import main
from quantlab.collect import collect_stats, ort_session
from quantlab.errors import QuantlabError
from quantlab.model import prepare_model
from quantlab.qdq.lint import lint_tensorrt
from quantlab.qdq.placement import plan_placement
from quantlab.qdq.targets import TARGETS, compute_ranges, plan_rewrite, write_qdq_model

from conftest import prepared_with_stats, save_model, tiny_config_text, write_tiny_calib


def encoder_block(seed: int = 0, d: int = 16) -> onnx.GraphProto:
    """x[N,6,d] -> LayerNorm -> Q, K, V projections (MatMul + bias Add) -> softmax(Q Kᵀ) V -> out proj
    (+bias) -> residual Add -> LayerNorm -> MatMul + bias -> GELU (Div, Erf, Add 1, Mul, Mul 0.5) -> MatMul
    + bias -> residual Add -> LayerNorm: one transformer encoder layer as PyTorch exports it."""
    g = np.random.default_rng(seed)
    w = {n: (g.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in
         [("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d)), ("w1", (d, 2 * d)), ("w2", (2 * d, d))]}
    b = {f"b{n[1:]}": g.standard_normal(s[1]).astype(np.float32) * 0.1 for n, s in
         [("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d)), ("w1", (d, 2 * d)), ("w2", (2 * d, d))]}
    consts = {
        "gamma": np.ones(d, np.float32), "beta": np.zeros(d, np.float32), "sqrt2": np.array(1.4142135, np.float32),
        "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32), "scale": np.array(0.25, np.float32),
    }
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln0", axis=-1),
        n("MatMul", ["h", "wq"], ["q0"], name="q_proj"), n("Add", ["bq", "q0"], ["q"], name="q_bias"),
        n("MatMul", ["h", "wk"], ["k0"], name="k_proj"), n("Add", ["bk", "k0"], ["k"], name="k_bias"),
        n("MatMul", ["h", "wv"], ["v0"], name="v_proj"), n("Add", ["bv", "v0"], ["v"], name="v_bias"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"], name="qk"), n("Mul", ["s0", "scale"], ["s"], name="qk_scale"),
        n("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        n("MatMul", ["p", "v"], ["c"], name="pv"),
        n("MatMul", ["c", "wo"], ["o0"], name="o_proj"), n("Add", ["bo", "o0"], ["o"], name="o_bias"),
        n("Add", ["o", "h"], ["r1"], name="residual1"),
        n("LayerNormalization", ["r1", "gamma", "beta"], ["h1"], name="ln1", axis=-1),
        n("MatMul", ["h1", "w1"], ["f0"], name="ffn1"), n("Add", ["b1", "f0"], ["f"], name="ffn1_bias"),
        n("Div", ["f", "sqrt2"], ["g0"], name="gelu_div"), n("Erf", ["g0"], ["g1"], name="gelu_erf"),
        n("Add", ["g1", "one"], ["g2"], name="gelu_add"), n("Mul", ["f", "g2"], ["g3"], name="gelu_mul"),
        n("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        n("MatMul", ["g4", "w2"], ["e0"], name="ffn2"), n("Add", ["b2", "e0"], ["e"], name="ffn2_bias"),
        n("Add", ["e", "h1"], ["r2"], name="residual2"),
        n("LayerNormalization", ["r2", "gamma", "beta"], ["y"], name="ln2", axis=-1),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in {**w, **b, **consts}.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, d])
    return helper.make_graph(nodes, "encoder", [x], [y], inits)


def two_conv_add() -> onnx.GraphProto:
    """An FPN-style Add of two convolutions' outputs: TensorRT fuses the Add into the later one."""
    g = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("MaxPool", ["s"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m", "wc"], ["y"], name="conv_c"),
    ]
    inits = [numpy_helper.from_array(g.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in [("wa", (4, 3, 3, 3)), ("wb", (4, 3, 3, 3)), ("wc", (2, 4, 1, 1))]]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])
    return helper.make_graph(nodes, "fpn", [x], [y], inits)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    pm, stats, g = prepared_with_stats(folder, encoder_block(), "encoder.onnx", "x", (4, 6, 16), 4, 4)
    return folder, pm, stats, {"x": g.standard_normal((8, 6, 16)).astype(np.float32)}


def _quantized_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Per node that is not Q/DQ: the inputs it reads through a DequantizeLinear of an activation."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for x in node.input:
            dq = producer.get(x)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits:
                out.setdefault(node.name, []).append(producer[dq.input[0]].input[0])
    return out


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_transformer_block_quantizes_the_matmuls_only(encoder, target):
    folder, pm, stats, feed = encoder
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS[target])
    out = folder / f"{target}.onnx"
    write_qdq_model(pm.path, ranges, TARGETS[target], out)
    model = onnx.load(str(out))
    readers = _quantized_inputs(model)
    # the six weighted MatMuls and the two attention MatMuls (Q·Kᵀ, P·V); nothing else: no LayerNorm, no
    # residual or bias Add, no Softmax, no GELU
    assert set(readers) == {"q_proj", "k_proj", "v_proj", "qk", "pv", "o_proj", "ffn1", "ffn2"}
    assert sorted(readers["qk"]) == ["kt", "q"] and sorted(readers["pv"]) == ["p", "v"]
    # biases stay float: no DequantizeLinear of a bias vector, whatever its dtype
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert not {f"b{k}" for k in ("q", "k", "v", "o", "1", "2")} & {x.removesuffix("_quantized") for x in dq_inputs}
    # MatMul outputs stay float (ONNX Runtime fuses the float output; TensorRT fuses the epilogue)
    qs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not qs & {"q0", "k0", "v0", "s0", "o0", "f0", "e0"}
    if target == "tensorrt":
        assert lint_tensorrt(model), lint_tensorrt(model).summary()
    ref = ort_session(str(pm.path)).run(None, feed)[0].ravel()
    y = ort_session(str(out)).run(None, feed)[0].ravel()
    assert float(ref @ y / np.linalg.norm(ref) / np.linalg.norm(y)) > 0.99


def test_rewrite_reproduces_quantize_static_under_the_placement(encoder):
    folder, pm, stats, _ = encoder
    fp32 = onnx.load(str(pm.path))
    for tname in ("tensorrt", "ort-cpu"):
        target = TARGETS[tname]
        base_ranges = compute_ranges(stats, get_calibrator("minmax"), target)
        write_qdq_model(pm.path, base_ranges, target, folder / "base.onnx")
        rewrite = plan_rewrite(fp32, onnx.load(str(folder / "base.onnx")), base_ranges, target)
        assert rewrite is not None
        other = compute_ranges(stats, get_calibrator("percentile", percentile=99.0), target)
        write_qdq_model(pm.path, other, target, folder / "direct.onnx")
        assert rewrite.apply(other).SerializeToString() == (folder / "direct.onnx").read_bytes()


def test_residual_add_of_two_convolutions_keeps_the_later_one_float(tmp_path):
    model = onnx.load(str(save_model(two_conv_add(), tmp_path / "fpn.onnx")))
    placement = plan_placement(model, "tensorrt")
    assert placement.nodes == ("conv_a", "conv_b", "add", "pool", "conv_c")
    assert placement.float_inputs == (("add", 1),)  # conv_b runs last: the Add fuses into it
    # ort-cpu: U8 flows conv -> Add -> MaxPool -> conv
    assert plan_placement(model, "ort-cpu").nodes == ("conv_a", "conv_b", "add", "pool", "conv_c")


def test_cnn_placement_on_ort_cpu_follows_int8(tmp_path):
    from conftest import conv_net

    model = onnx.load(str(save_model(conv_net(), tmp_path / "tiny.onnx")))
    # U8 reaches every node: the Relu (fused), the residual Add, the pooling and Flatten, then the Gemm
    assert plan_placement(model, "ort-cpu").nodes == ("conv1", "relu1", "conv2", "add1", "gap", "flatten", "fc")
    trt = plan_placement(model, "tensorrt")
    assert trt.nodes == ("conv1", "conv2", "add1", "fc") and trt.float_inputs == (("add1", 0),)


@pytest.mark.parametrize("target", ["tensorrt", "ort-dynamic"])
def test_everything_excluded_is_one_line(tmp_path, capsys, target):
    from conftest import conv_net

    config = tmp_path / "quantlab.toml"
    model = save_model(conv_net(), tmp_path / "tiny.onnx")
    text = tiny_config_text(model, write_tiny_calib(tmp_path / "calib"), tmp_path / "reports")
    config.write_text(text.replace("latency_runs = 0", 'latency_runs = 0\nexclude = ["conv1", "conv2", "fc"]'))
    assert main(["ptq", "--config", str(config), "--target", target, "--calibrator", "minmax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # before the statistics pass: no progress bar
    assert len(err) == 1 and f"target {target} quantizes" in err[0] and "[ptq] exclude" in err[0]
    assert not (tmp_path / "reports").exists()


def test_ort_dynamic_target(tmp_path, capsys):
    from conftest import conv_net

    config = tmp_path / "quantlab.toml"
    model = save_model(conv_net(), tmp_path / "tiny.onnx")
    config.write_text(tiny_config_text(model, write_tiny_calib(tmp_path / "calib"), tmp_path / "reports"))
    code = main(["ptq", "--config", str(config), "--target", "ort-dynamic,ort-cpu", "--calibrator", "minmax,mse",
                 "--no-report"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("make no difference") == 1  # said once, not per calibrator
    run = tmp_path / "reports" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    dynamic = [a for a in manifest["artefacts"] if a.get("target") == "ort-dynamic"]
    assert [a["path"] for a in dynamic] == ["int8/dynamic.ort-dynamic.onnx"] and dynamic[0]["kind"] == "model-int8-dynamic"
    qmodel = onnx.load(str(run / "int8/dynamic.ort-dynamic.onnx"))
    ops = {n.op_type for n in qmodel.graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    summary = json.loads((run / "summary.json").read_text())
    engine = next(e for e in summary["engines"] if e["target"] == "ort-dynamic")
    assert engine["calibrator"] == "dynamic" and engine["cosine"] > 0.99


def _ort_placement(path, out, op_types, stats_feed):
    """ONNX Runtime's own placement (quantize_static over whole op types), TensorRT-style S8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([stats_feed])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    return onnx.load(str(out))


def test_lint_gives_fusion_advice_on_ort_placement_and_none_on_ours(encoder, tmp_path):
    from conftest import conv_net

    folder, pm, stats, feed = encoder
    # a transformer quantized over MatMul and Add: bias Adds, GELU's +1 and the residual stream get Q/DQ
    model = _ort_placement(pm.path, tmp_path / "enc.onnx", ["MatMul", "Add"], feed)
    report = lint_tensorrt(model)
    assert report and report.advice  # valid, but it will not fuse
    rules = {a.rule for a in report.advice}
    assert "constant-add" in rules
    assert {a.node for a in report.advice if a.rule == "constant-add"} >= {"q_bias", "k_bias", "gelu_add"}
    assert "fusion advice" in report.summary() and report.to_dict()["advice"]
    # a CNN quantized over Conv, Add and Gemm: the residual Add has both inputs quantized
    cnn = save_model(conv_net(), tmp_path / "tiny.onnx")
    x = {"input": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    report = lint_tensorrt(_ort_placement(cnn, tmp_path / "cnn.onnx", ["Conv", "Add", "Gemm"], x))
    found = {(a.rule, a.node, a.tensor) for a in report.advice}
    # ... and ONNX Runtime quantized conv1's output, which only the (float) Relu reads, and the logits
    assert ("residual-both-inputs", "add1", "c2") in found and ("weighted-output", "conv1", "c1") in found
    assert {a.rule for a in report.advice} == {"residual-both-inputs", "weighted-output"}
    # quantlab's tensorrt target: no advice on either
    for path, name in ((pm.path, "ours-enc.onnx"), (cnn, "ours-cnn.onnx")):
        prepared = prepare_model(path)
        ranges = compute_ranges(
            collect_stats(prepared, [feed if "enc" in name else x]), get_calibrator("minmax"), TARGETS["tensorrt"]
        )
        write_qdq_model(prepared.path, ranges, TARGETS["tensorrt"], tmp_path / name)
        report = lint_tensorrt(tmp_path / name)
        assert report and not report.advice, report.summary()


def test_ort_dynamic_goes_through_compare_and_the_report(tmp_path):
    from conftest import COMPARE_SECTION, _labelled_eval_folder, conv_net

    model = save_model(conv_net(), tmp_path / "tiny.onnx")
    folder = _labelled_eval_folder(tmp_path / "eval", model)
    config = tmp_path / "quantlab.toml"
    config.write_text(tiny_config_text(model, write_tiny_calib(tmp_path / "calib"), tmp_path / "reports")
                      + COMPARE_SECTION.format(eval=folder, root=tmp_path))
    assert main(["ptq", "--config", str(config), "--target", "all", "--calibrator", "minmax", "--no-report"]) == 0
    assert main(["compare", "--config", str(config), "--latency-runs", "1"]) == 0
    run = tmp_path / "reports" / "tiny"
    engines = {e["name"]: e for e in json.loads((run / "compare.json").read_text())["engines"]}
    assert engines["int8:dynamic.ort-dynamic"]["target"] == "ort-dynamic"
    assert engines["int8:dynamic.ort-dynamic"]["metrics"]["top1_agreement"] >= 0.9
    assert "int8:dynamic.ort-dynamic" in (run / "index.html").read_text()
