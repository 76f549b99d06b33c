"""Models written the ways exporters write them: each rewrite keeps the function, and each comes out quantized."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters as E
from conftest import conv_net, save_model
from quantlab import normalize
from quantlab.collect import ort_session
from quantlab.config import load_config
from quantlab.errors import QuantlabError
from quantlab.model import prepare_model
from quantlab.ptq import run_ptq


def _feed(m: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input of ``m`` (``n`` samples on a dynamic batch axis)."""
    g = np.random.default_rng(seed)
    inits = {i.name for i in m.graph.initializer}
    feed = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [n] + [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else n for d in tt.shape.dim[1:]]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feed[i.name] = g.integers(0, 20, shape).astype(dtype)
        elif dtype == np.bool_:
            feed[i.name] = g.random(shape) > 0.3
        else:
            feed[i.name] = g.standard_normal(shape).astype(dtype)
    return feed


def _run(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(m).run(None, feed)


def test_constant_subgraphs_fold_into_initializers():
    m = E.constant_weights()
    feed = _feed(m, 3)
    before = _run(m, feed)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert normalize.fold_constants(folded) == 6
    ops = [n.op_type for n in folded.graph.node]
    assert not {"Constant", "ConstantOfShape", "Identity", "Transpose", "Reshape", "Cast"} & set(ops)
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    # the Linear written as Transpose + MatMul now reads the transposed weight directly
    w4 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w4"))
    assert np.array_equal(inits["w4_t"], w4.T) and "w4" not in inits
    np.testing.assert_array_equal(_run(folded, feed)[0], before[0])
    again = onnx.ModelProto()
    again.CopyFrom(m)
    normalize.fold_constants(again)
    assert again.SerializeToString() == folded.SerializeToString()  # deterministic


def test_weight_on_the_left_moves_to_the_right():
    m = E.gemm_and_matmul_layouts()
    feed = _feed(m, 3)
    before = _run(m, feed)[0]
    moved = onnx.ModelProto()
    moved.CopyFrom(m)
    assert normalize.weight_to_the_right(moved) == ["left_weight"]
    matmul = next(n for n in moved.graph.node if n.op_type == "MatMul")
    inits = {i.name: numpy_helper.to_array(i) for i in moved.graph.initializer}
    assert matmul.input[1] in inits and inits[matmul.input[1]].shape == (6, 5)
    np.testing.assert_allclose(_run(moved, feed)[0], before, rtol=1e-5, atol=1e-6)


def test_grouped_deconv_bias_moves_into_an_add():
    m = E.convolutions()
    feed = _feed(m, 2)
    before = _run(m, feed)[0]
    split = onnx.ModelProto()
    split.CopyFrom(m)
    assert normalize.split_grouped_deconv_bias(split) == ["deconv_grouped"]
    deconv = next(n for n in split.graph.node if n.op_type == "ConvTranspose")
    assert len(deconv.input) == 2
    np.testing.assert_allclose(_run(split, feed)[0], before, rtol=1e-5, atol=1e-5)


def test_fp16_upcast_computes_the_same_function():
    m16 = E.to_fp16(E.constant_weights())
    m32 = onnx.ModelProto()
    m32.CopyFrom(m16)
    assert normalize.upcast_fp16(m32) > 0
    assert not normalize.uses_dtype(m32, TensorProto.FLOAT16)
    feed = _feed(m32, 3)
    ref = _run(m16, {k: v.astype(np.float16) for k, v in feed.items()})[0].astype(np.float32)
    np.testing.assert_allclose(_run(m32, feed)[0], ref, rtol=0.02, atol=0.02)


def _ptq(tmp_path, m: onnx.ModelProto, name: str, *, samples: int = 8, shapes: str = "", save=onnx.save) -> object:
    """Save ``m``, write seeded .npz data for it, quantize for every target (minmax) and return the result."""
    model = tmp_path / f"{name}.onnx"
    save(m, str(model))
    calib = tmp_path / f"{name}-calib"
    calib.mkdir()
    np.savez(calib / "data.npz", **_feed(m, samples, seed=1))
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[model]\nonnx = "{model}"\n{shapes}\n[data]\ncalib = "{calib}"\nbatch_size = 4\n'
        f'[ptq]\nout = "{tmp_path / "reports"}"\nlatency_runs = 1\ncalibrators = ["minmax"]\nreport = false\n'
    )
    return run_ptq(load_config(config))


def _all_targets_valid(result, min_cosine: float = 0.99) -> None:
    assert result and sorted(e.target for e in result.engines) == ["ort-cpu", "tensorrt"]
    for e in result.engines:
        assert e.quantize_nodes > 0 and e.cosine >= min_cosine, (e.target, e.quantize_nodes, e.cosine)
        if e.target == "tensorrt":
            assert e.tensorrt_rules == "pass"


CASES = {
    "constant-weights": (E.constant_weights, "constant node(s) folded"),
    "ir3-initializers-in-inputs": (E.shadowed_initializers, "removed from the graph inputs"),
    "gemm-transB0-matmul-weight-left": (E.gemm_and_matmul_layouts, "weight on the left"),
    "conv1d-2d-3d-grouped-depthwise-deconv": (E.convolutions, "grouped ConvTranspose bias"),
    "mixed-input-types": (E.mixed_inputs, None),
    "fp16": (lambda: E.to_fp16(E.constant_weights()), "FP16 model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_exporter_shape_is_quantized_for_every_target(tmp_path, case):
    build, note = CASES[case]
    result = _ptq(tmp_path, build(), case)
    _all_targets_valid(result)
    if note:
        assert any(note in n for n in result.notes), result.notes
    assert json.loads((result.run_dir / "summary.json").read_text())["preparation"] == result.notes


def test_fixed_batch_two_is_honoured_everywhere(tmp_path):
    """Batches of exactly 2 for statistics, the checks and the latency runs; 7 samples give 3 batches."""
    result = _ptq(tmp_path, E.convolutions(batch=2), "fixed2", samples=7)
    _all_targets_valid(result)
    assert result.samples == 6 and result.latency_batch == 2 and result.fp32_latency_ms is not None
    assert json.loads((result.run_dir / "timing.json").read_text())["latency_batch"] == 2


def test_fixed_batch_larger_than_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(QuantlabError, match=r"fixed batch dimension of 4, so it takes exactly 4 samples per batch.*add samples"):
        _ptq(tmp_path, E.convolutions(batch=4), "fixed4", samples=3)


def test_external_data_model(tmp_path):
    def save(m, path):
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)

    result = _ptq(tmp_path, E.constant_weights(), "external", save=save)
    _all_targets_valid(result)
    assert (tmp_path / "weights.bin").stat().st_size > 1000
    (tmp_path / "weights.bin").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(QuantlabError, match=r"external data file\(s\) \['weights.bin'\].*copy them next to the model"):
        prepare_model(tmp_path / "external.onnx")


@pytest.mark.parametrize("opset", [7, 9, 11, 12, 21, 23])
def test_opsets_from_7(tmp_path, opset):
    graph = conv_net()
    if opset < 9:  # IR 3: initializers are graph inputs too
        graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, i.dims) for i in graph.initializer])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
    pm = prepare_model(save_model_raw(m, tmp_path / f"opset{opset}.onnx"))
    prepared = onnx.load(str(pm.path))
    assert normalize.default_opset(prepared) == max(opset, 13)
    assert not {i.name for i in prepared.graph.input} & {i.name for i in prepared.graph.initializer}


def save_model_raw(m: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return str(path)


def test_already_quantized_and_bfloat16_models_are_refused_with_the_reason(tmp_path):
    path = save_model_raw(E.already_quantized(), tmp_path / "q.onnx")
    with pytest.raises(QuantlabError, match=r"^prepare: model 'q.onnx' is already quantized .*MatMulInteger.*pass the FP32 model"):
        prepare_model(path)
    m = helper.make_model(conv_net(), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    for init in m.graph.initializer:
        init.CopyFrom(helper.make_tensor(init.name, TensorProto.BFLOAT16, init.dims, numpy_helper.to_array(init).ravel().tolist()))
    m.graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_bf16"], to=TensorProto.BFLOAT16))
    for n in m.graph.node[1:]:
        n.input[:] = ["input_bf16" if i == "input" else i for i in n.input]
    m.graph.node.append(helper.make_node("Cast", ["logits_bf16"], ["logits"], to=TensorProto.FLOAT))
    m.graph.node[-2].output[0] = "logits_bf16"
    path = save_model_raw(m, tmp_path / "bf16.onnx")
    with pytest.raises(QuantlabError, match="bfloat16"):
        prepare_model(path)


def test_symbolic_dims_are_named_with_the_fix(tmp_path):
    path = save_model(conv_net(hw=("height", "width")), tmp_path / "dyn.onnx")
    with pytest.raises(QuantlabError) as info:
        prepare_model(path)
    message = str(info.value)
    assert message.startswith("prepare: model 'dyn.onnx' input 'input' has dynamic dimension 'height' at axis 2, 'width' at axis 3")
    assert "[model.input_shapes] input = [1, 3, <height>, <width>]" in message and "--input-shape input=1,3," in message
    # a -1 written by an exporter is a dynamic dimension too
    m = onnx.load(str(path))
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_value = -1
    onnx.save(m, str(tmp_path / "minus.onnx"))
    with pytest.raises(QuantlabError, match="dynamic dimension '\\?' at axis 2"):
        prepare_model(tmp_path / "minus.onnx")
    assert prepare_model(tmp_path / "minus.onnx", {"input": (1, 3, 8, 8)}).inputs[0].shape == (None, 3, 8, 8)
