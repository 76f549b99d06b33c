"""Q/DQ structure of both targets on a small graph, numeric closeness, and zero ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantlab.calibrators import get_calibrator
from quantlab.collect import collect_stats, ort_session
from quantlab.model import prepare_model
from quantlab.qdq.lint import lint_tensorrt
from quantlab.qdq.targets import TARGETS, compute_ranges, read_quant_params, write_qdq_model
from quantlab.stats import StatsSet, TensorStats


@pytest.fixture
def calibrated(tiny_model):
    pm = prepare_model(tiny_model)
    g = np.random.default_rng(0)
    batches = [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    return pm, collect_stats(pm, batches), batches


def _quantize(pm, stats, target, tmp_path):
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS[target])
    out = tmp_path / f"{target}.onnx"
    write_qdq_model(pm.path, ranges, TARGETS[target], out)
    return ranges, onnx.load(str(out)), out


def test_tensorrt_target_structure(calibrated, tmp_path):
    pm, stats, _ = calibrated
    ranges, model, _ = _quantize(pm, stats, "tensorrt", tmp_path)
    assert lint_tensorrt(model), lint_tensorrt(model).summary()
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # Q/DQ on the inputs of Conv and Gemm (input, r1, flat) and on the skip input of the residual Add (r1):
    # conv2's output c2 stays float (TensorRT fuses the Add into conv2), and so does the pooling, whose
    # output goes to a Flatten
    assert sorted(n.input[0] for n in qs) == sorted(["input", "r1", "flat"])
    producer = {o: n for n in model.graph.node for o in n.output}
    add = next(n for n in model.graph.node if n.name == "add1")
    assert add.input[0] == "c2" and producer[add.input[1]].op_type == "DequantizeLinear"
    for q in qs:
        assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0
        assert inits[q.input[1]] == pytest.approx(ranges[q.input[0]].amax / 127, rel=1e-6)
    assert not any(n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(1)).dtype == np.int32 for n in model.graph.node)


def test_ort_cpu_target_structure(calibrated, tmp_path):
    pm, stats, _ = calibrated
    ranges, model, _ = _quantize(pm, stats, "ort-cpu", tmp_path)
    params = read_quant_params(model)
    acts = {p.tensor: p for p in params if p.kind == "activation"}
    weights = {p.tensor: p for p in params if p.kind == "weight"}
    assert all(p.dtype == "uint8" for p in acts.values())
    assert {w: (p.dtype, p.axis, len(p.scale)) for w, p in weights.items()} == {
        "w1": ("int8", 0, 8), "w2": ("int8", 0, 8), "w3": ("int8", 0, 4)
    }
    # r = s (q - z): the post-ReLU tensor uses all 256 levels on [0, max]
    r1 = acts["r1"]
    assert r1.zero_point == (0,) and r1.scale[0] == pytest.approx(stats.tensors["r1"].max / 255, rel=1e-6)
    assert not lint_tensorrt(model)  # U8 zero-points and INT32 biases are not TensorRT's rules


def test_quantized_graph_output_keeps_its_name(tmp_path):
    # ONNX Runtime renames the float tensor in front of a quantized graph output
    # "<output>_QuantizeLinear_Input"; its scale and zero-point are still the output's.  ort-cpu quantizes a
    # convolution's output (U8 flows on), so a Conv that writes the graph output shows it.
    from conftest import one_conv_net, save_model

    g = np.random.default_rng(3)
    graph = one_conv_net()
    pm = prepare_model(save_model(graph, tmp_path / "conv.onnx"))
    stats = collect_stats(pm, [{"x": g.standard_normal((4, 3, 8, 8)).astype(np.float32)}])
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS["ort-cpu"])
    write_qdq_model(pm.path, ranges, TARGETS["ort-cpu"], tmp_path / "q.onnx")
    model = onnx.load(str(tmp_path / "q.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("y"))
    assert q.input[0] == "y_QuantizeLinear_Input"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y = next(p for p in read_quant_params(model) if p.tensor == "y")
    assert y.kind == "activation" and y.dtype == "uint8"
    assert y.scale == (float(inits[q.input[1]]),) and y.zero_point == (int(inits[q.input[2]]),)
    assert y.scale[0] == pytest.approx((ranges["y"].hi - ranges["y"].lo) / 255, rel=1e-6)
    assert not any(p.tensor.endswith("_QuantizeLinear_Input") for p in read_quant_params(model))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_int8_outputs_close_to_fp32(calibrated, tmp_path, target):
    pm, stats, batches = calibrated
    _, _, path = _quantize(pm, stats, target, tmp_path)
    x = batches[0]
    ref = ort_session(str(pm.path)).run(None, x)[0]
    out = ort_session(str(path)).run(None, x)[0]
    cos = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.995
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.75


def test_zero_range_tensor_never_gets_scale_zero():
    zero = TensorStats.from_array("z", np.zeros(50))
    const = TensorStats.from_array("c", np.full(50, 3.0))
    stats = StatsSet({"z": zero, "c": const})
    for name in ("minmax", "percentile", "entropy", "mse"):
        for target in TARGETS.values():
            r = compute_ranges(stats, get_calibrator(name), target)
            assert r["z"].hi - r["z"].lo > 0 and r["z"].amax > 0
            assert r["c"].hi == pytest.approx(3.0) and r["c"].lo == (-3.0 if target.symmetric else 0.0)


def test_concurrent_writers_of_one_model_do_not_collide(calibrated, tmp_path):
    """Two runs quantizing the same (cached) prepared model at once: ONNX Runtime's quantizer writes
    and deletes a ``-inferred.onnx`` file beside the model it reads, so each run hands it a private path."""
    from concurrent.futures import ThreadPoolExecutor

    pm, stats, _ = calibrated
    target = TARGETS["ort-cpu"]
    ranges = compute_ranges(stats, get_calibrator("minmax"), target)

    def write(i: int) -> bytes:
        out = tmp_path / f"m{i}.onnx"
        write_qdq_model(pm.path, ranges, target, out)
        return out.read_bytes()

    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(write, range(16)))
    assert len(set(models)) == 1
    assert not list(pm.path.parent.glob("*-inferred*"))
