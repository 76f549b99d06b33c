"""Bias correction: the INT8 model's mean output shift, measured before and after."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantlab.collect import ort_session
from quantlab.config import TransformConfig, load_config, override
from quantlab.transforms.biascorrect import bias_correction, output_shifts
from quantlab.transforms.graph import Graph, fake_quantize_weight

from conftest import save_model


def shifted_net(seed: int = 0, bias: bool = True) -> onnx.GraphProto:
    """x[N,8,6,6] (positive, mean about 3) -> Conv(16, 3x3) -> Relu -> Conv(4, 1x1) -> y.

    One large weight per output channel sets its INT8 step, so the other weights round coarsely;
    with inputs far from zero mean, those rounding errors shift every output channel.
    """
    g = np.random.default_rng(seed)
    w1 = (g.standard_normal((16, 8, 3, 3)) * 0.05).astype(np.float32)
    w1[:, 0, 0, 0] = 2.0
    w2 = (g.standard_normal((4, 16, 1, 1)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    conv1 = ["x", "w1"]
    if bias:
        inits.append(numpy_helper.from_array((g.standard_normal(16) * 0.1).astype(np.float32), "b1"))
        conv1.append("b1")
    nodes = [helper.make_node("Conv", conv1, ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])
    return helper.make_graph(nodes, "shifted", [x], [y], inits)


def _samples(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (np.abs(g.standard_normal((n, 8, 6, 6))) + 2.5).astype(np.float32)


def _write_calib(folder, seed=1):
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"b{i}.npy", _samples(8, seed + i))
    return folder


def _mean_shift(fp32_path, int8_path, x) -> float:
    """RMS over channels of the mean (over samples and positions) of INT8 minus FP32 outputs."""
    ref = ort_session(str(fp32_path)).run(None, {"x": x})[0]
    out = ort_session(str(int8_path)).run(None, {"x": x})[0]
    return float(np.sqrt(np.mean((out - ref).mean(axis=(0, 2, 3)) ** 2)))


def test_the_measured_shift_is_the_mean_of_dw_x():
    model = onnx.helper.make_model(shifted_net(), opset_imports=[onnx.helper.make_opsetid("", 17)])
    g = Graph(model)
    conv1 = g.layer(g.producer["c1"])
    data = [{"x": _samples(8, 3)}, {"x": _samples(4, 4)}]
    shift = output_shifts(model, [conv1], data)["conv1"]
    x = np.concatenate([d["x"] for d in data])
    delta = fake_quantize_weight(g.array("w1"), 0) - g.array("w1")
    import torch

    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(delta), padding=1).mean((0, 2, 3))
    np.testing.assert_allclose(shift, expected.numpy(), rtol=1e-4, atol=1e-7)


def test_bias_correction_removes_the_mean_shift_of_the_int8_model(tmp_path):
    from quantlab.ptq import run_ptq

    model = save_model(shifted_net(), tmp_path / "shifted.onnx")
    calib = _write_calib(tmp_path / "calib")
    (tmp_path / "quantlab.toml").write_text(
        f'[model]\nonnx = "{model}"\n[data]\ncalib = "{calib}"\nbatch_size = 8\n'
        f'[ptq]\nout = "{tmp_path / "reports"}"\nlatency_runs = 0\nreport = false\ncalibrators = ["minmax"]\n'
        'targets = ["tensorrt", "ort-cpu"]\n')
    config = load_config(tmp_path / "quantlab.toml")
    plain = run_ptq(override(config, "ptq", run_name="plain")).run_dir
    corrected = run_ptq(override(config, "ptq", run_name="corrected", transforms=("bias-correction",))).run_dir
    x = _samples(32, 100)  # not calibration data
    for target in ("tensorrt", "ort-cpu"):
        before = _mean_shift(plain / "model_fp32.onnx", plain / "int8" / f"minmax.{target}.onnx", x)
        after = _mean_shift(corrected / "model_fp32.onnx", corrected / "int8" / f"minmax.{target}.onnx", x)
        assert before > 1e-3, before  # a real shift to correct
        assert after < before / 5, (target, before, after)


def test_layers_without_bias_get_one_and_matmuls_without_add_are_named():
    model = onnx.helper.make_model(shifted_net(bias=False), opset_imports=[onnx.helper.make_opsetid("", 17)])
    out, result = bias_correction(model, [{"x": _samples(8, 1)}], TransformConfig())
    assert result.applied and "2 given a bias they lacked" in result.detail
    assert [len(n.input) for n in out.graph.node if n.op_type == "Conv"] == [3, 3]

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    out, result = bias_correction(model, [{"x": np.ones((2, 5), np.float32)}], TransformConfig())
    assert out is model and not result.applied
    assert result.detail == "no layer with a bias to correct (1 MatMul(s) without a bias Add)"
