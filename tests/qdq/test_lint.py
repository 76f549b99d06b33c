"""TensorRT Q/DQ rules: a clean Conv graph, one broken rule at a time, then ORT's own output."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.errors import QuantlabError
from quantlab.qdq.lint import RULES, LintIssue, LintReport, lint_onnx_file, lint_tensorrt

OPSET = 17
X_SHAPE = [1, 3, 8, 8]


def _weights(seed: int = 0, shape: tuple[int, ...] = (4, 3, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-127, 128, size=shape, dtype=np.int8)


def _init(name: str, value: np.ndarray | float | int, dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def clean_conv_model(opset: int = OPSET) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(W: int8 per-channel DQ on axis 0, float bias) -> Relu -> y."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node(
            "DequantizeLinear", ["W", "W_scale", "W_zp"], ["W_dq"], name="w_dq", axis=0
        ),
        helper.make_node("Conv", ["x_dq", "W_dq", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    initializers = [
        _init("x_scale", 0.05),
        _init("x_zp", 0, np.int8),
        _init("W", _weights(), np.int8),
        _init("W_scale", [0.01, 0.02, 0.03, 0.04]),
        _init("W_zp", [0, 0, 0, 0], np.int8),
        _init("B", [0.1, -0.1, 0.2, 0.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "clean_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializers,
    )
    return _model(graph, opset)


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # the newest IR that ONNX Runtime 1.31 loads
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: object, dtype: type = np.float32) -> None:
    """Replace (or add) initializer ``name``."""
    tensor = _init(name, value, dtype)  # type: ignore[arg-type]
    for existing in model.graph.initializer:
        if existing.name == name:
            existing.CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, value))


def found(report: LintReport) -> list[tuple[str, str]]:
    """(rule, node) of every issue; also checks each issue is well formed."""
    for issue in report.issues:
        assert issue.rule in RULES
        assert issue.message and "\n" not in issue.message
        assert not report
    return [(issue.rule, issue.node) for issue in report.issues]


# --- the clean graph -------------------------------------------------------------------------


def test_clean_conv_passes() -> None:
    model = clean_conv_model()
    onnx.checker.check_model(model, full_check=True)
    report = lint_tensorrt(model)
    assert report
    assert report.issues == ()
    assert report.qdq_nodes == 3
    assert report.summary() == (
        "TensorRT Q/DQ lint: passed (3 QuantizeLinear/DequantizeLinear nodes checked)"
    )


def test_clean_conv_runs_in_onnxruntime() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(
        clean_conv_model().SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (1, 4, 8, 8)


def test_model_can_be_given_as_a_path(tmp_path: Path) -> None:
    path = tmp_path / "clean.onnx"
    onnx.save(clean_conv_model(), str(path))
    assert lint_tensorrt(path)
    assert lint_tensorrt(str(path))


def test_bad_model_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantlabError, match="does not exist"):
        lint_tensorrt(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 4)
    with pytest.raises(QuantlabError, match="ONNX model"):
        lint_tensorrt(junk)
    with pytest.raises(QuantlabError, match="ModelProto or a path"):
        lint_tensorrt(42)  # type: ignore[arg-type]


def test_scale_from_a_constant_node_is_accepted() -> None:
    model = clean_conv_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "x_scale"))
    constant = helper.make_node("Constant", [], ["x_scale"], name="scale_const", value_float=0.05)
    model.graph.node.insert(0, constant)
    assert lint_tensorrt(model)


def test_q_with_int8_output_dtype_needs_no_zero_point() -> None:
    model = clean_conv_model(opset=21)
    for name in ("x_q", "x_dq"):
        del _node(model, name).input[2]
    _set_attr(_node(model, "x_q"), "output_dtype", TensorProto.INT8)
    onnx.checker.check_model(model)
    assert lint_tensorrt(model)


# --- one rule broken at a time ---------------------------------------------------------------


def test_old_opset() -> None:
    model = clean_conv_model()
    model.opset_import[0].version = 12
    assert found(lint_tensorrt(model)) == [("opset", "")]


def test_old_opset_file_is_reported_by_the_rule_not_by_onnx_checker(tmp_path: Path) -> None:
    # below opset 13 onnx.checker rejects the per-channel DequantizeLinear ("Unrecognized attribute: axis")
    model = clean_conv_model()
    model.opset_import[0].version = 12
    with pytest.raises(onnx.checker.ValidationError, match="axis"):
        onnx.checker.check_model(model)
    path = tmp_path / "opset12.onnx"
    onnx.save(model, str(path))
    report = lint_onnx_file(path)
    assert found(report) == [("opset", "")]


def test_file_failing_onnx_checker_otherwise_is_a_user_error(tmp_path: Path) -> None:
    model = clean_conv_model()
    model.graph.node[3].input[1] = "nowhere"  # the Conv reads a tensor nothing writes
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(QuantlabError, match="fails onnx.checker"):
        lint_onnx_file(path)
    assert lint_onnx_file(_saved(clean_conv_model(), tmp_path / "clean.onnx"))


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_nothing_quantized() -> None:
    model = clean_conv_model()
    del model.graph.node[:3]
    conv = _node(model, "conv")
    conv.input[0], conv.input[1] = "x", "W_float"
    _set_init(model, "W_float", np.ones((4, 3, 3, 3)))
    assert found(lint_tensorrt(model)) == [("no-qdq", "")]


def test_weight_only_dq_is_not_a_quantized_graph() -> None:
    model = clean_conv_model()
    del model.graph.node[:2]
    _node(model, "conv").input[0] = "x"
    assert found(lint_tensorrt(model)) == [("no-qdq", "")]


def test_uint8_zero_point() -> None:
    model = clean_conv_model()
    _set_init(model, "x_zp", 128, np.uint8)
    report = lint_tensorrt(model)
    assert found(report) == [("zero-point-type", "x_q"), ("zero-point-type", "x_dq")]
    assert report.issues[0].tensor == "x_zp"
    assert "UINT8" in report.issues[0].message


def test_int32_zero_point_on_activation() -> None:
    model = clean_conv_model()
    _set_init(model, "x_zp", 0, np.int32)
    assert found(lint_tensorrt(model)) == [("zero-point-type", "x_q"), ("zero-point-type", "x_dq")]


def test_nonzero_zero_point() -> None:
    model = clean_conv_model()
    _set_init(model, "W_zp", [0, 0, 3, 0], np.int8)
    report = lint_tensorrt(model)
    assert found(report) == [("zero-point-value", "w_dq")]
    assert "holds 3" in report.issues[0].message


def test_missing_zero_point_means_uint8() -> None:
    model = clean_conv_model()
    for name in ("x_q", "x_dq"):
        del _node(model, name).input[2]
    report = lint_tensorrt(model)
    assert found(report) == [("zero-point-type", "x_q"), ("zero-point-type", "x_dq")]
    assert report.issues[0].tensor == "x_q"


def test_zero_point_computed_at_run_time() -> None:
    model = clean_conv_model()
    model.graph.node.insert(0, helper.make_node("Identity", ["x_zp"], ["x_zp_rt"], name="zp_id"))
    _node(model, "x_q").input[2] = "x_zp_rt"
    model.graph.value_info.append(helper.make_tensor_value_info("x_zp_rt", TensorProto.INT8, []))
    assert found(lint_tensorrt(model)) == [("zero-point-constant", "x_q")]


def test_scale_computed_at_run_time() -> None:
    model = clean_conv_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "x_scale"))
    model.graph.input.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []))
    report = lint_tensorrt(model)
    assert found(report) == [("scale-constant", "x_q"), ("scale-constant", "x_dq")]
    assert report.issues[0].tensor == "x_scale"


@pytest.mark.parametrize(("value", "shown"), [(0.0, "0.0"), (-0.0078125, "-0.0078125"), (np.nan, "nan"), (np.inf, "inf")])
def test_activation_scale_not_positive_finite(value: float, shown: str) -> None:
    model = clean_conv_model()
    _set_init(model, "x_scale", value)
    report = lint_tensorrt(model)
    assert found(report) == [("scale-value", "x_q"), ("scale-value", "x_dq")]
    assert f"holds {shown}; scales must be finite" in report.issues[0].message  # a plain number, no np.float64(...)


def test_one_weight_scale_is_zero() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", [0.01, 0.0, 0.03, 0.04])
    assert found(lint_tensorrt(model)) == [("scale-value", "w_dq")]


def test_per_tensor_scale_of_shape_one() -> None:
    model = clean_conv_model()
    _set_init(model, "x_scale", [0.05])
    report = lint_tensorrt(model)
    assert found(report) == [("scale-shape", "x_q"), ("scale-shape", "x_dq")]
    assert "shape [1]" in report.issues[0].message


def test_weight_scale_of_shape_one_over_four_channels() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", [0.02])
    _set_init(model, "W_zp", [0], np.int8)
    assert found(lint_tensorrt(model)) == [("scale-shape", "w_dq")]


def test_single_output_channel_may_have_a_scale_of_shape_one() -> None:
    model = clean_conv_model()
    _set_init(model, "W", _weights(shape=(1, 3, 3, 3)), np.int8)
    _set_init(model, "W_scale", [0.02])
    _set_init(model, "W_zp", [0], np.int8)
    _set_init(model, "B", [0.0])
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    assert lint_tensorrt(model)


def test_block_wise_scale() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", np.full((4, 3, 1, 1), 0.01))
    _set_init(model, "W_zp", np.zeros((4, 3, 1, 1)), np.int8)
    assert found(lint_tensorrt(model)) == [("scale-shape", "w_dq")]


def test_int32_bias_dq() -> None:
    model = clean_conv_model()
    _set_init(model, "B_q", [10, -10, 20, 0], np.int32)
    _set_init(model, "B_scale", [0.0005, 0.001, 0.0015, 0.002])
    _set_init(model, "B_zp", [0, 0, 0, 0], np.int32)
    bias_dq = helper.make_node(
        "DequantizeLinear", ["B_q", "B_scale", "B_zp"], ["B_dq"], name="b_dq", axis=0
    )
    model.graph.node.insert(3, bias_dq)
    _node(model, "conv").input[2] = "B_dq"
    report = lint_tensorrt(model)
    assert found(report) == [("int32-bias", "b_dq")]
    assert report.issues[0].tensor == "B_q"
    assert "QuantizeBias=False" in report.issues[0].message


def test_per_tensor_conv_weight() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", 0.02)
    _set_init(model, "W_zp", 0, np.int8)
    report = lint_tensorrt(model)
    assert found(report) == [("weight-per-channel", "w_dq")]
    assert report.issues[0].tensor == "W"


def test_weight_on_wrong_axis() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", [0.01, 0.02, 0.03])
    _set_init(model, "W_zp", [0, 0, 0], np.int8)
    _set_attr(_node(model, "w_dq"), "axis", 1)
    report = lint_tensorrt(model)
    assert found(report) == [("weight-axis", "w_dq")]
    assert "axis=0" in report.issues[0].message


def test_weight_scale_count_differs_from_channels() -> None:
    model = clean_conv_model()
    _set_init(model, "W_scale", [0.01, 0.02, 0.03])
    _set_init(model, "W_zp", [0, 0, 0], np.int8)
    assert found(lint_tensorrt(model)) == [("weight-channels", "w_dq")]


def test_weight_holds_minus_128() -> None:
    model = clean_conv_model()
    weights = _weights()
    weights[0, 0, 0, 0] = weights[3, 2, 2, 2] = -128
    _set_init(model, "W", weights, np.int8)
    report = lint_tensorrt(model)
    assert found(report) == [("weight-range", "w_dq")]
    assert "2 places" in report.issues[0].message


def test_per_channel_activation() -> None:
    model = clean_conv_model()
    _set_init(model, "x_scale", [0.05, 0.04, 0.03])
    _set_init(model, "x_zp", [0, 0, 0], np.int8)
    for name in ("x_q", "x_dq"):
        _set_attr(_node(model, name), "axis", 1)
    assert found(lint_tensorrt(model)) == [
        ("activation-per-tensor", "x_q"),
        ("activation-per-tensor", "x_dq"),
    ]


def test_q_feeding_another_op() -> None:
    model = clean_conv_model()
    model.graph.node.append(helper.make_node("Cast", ["x_q"], ["z"], name="tap", to=1))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, X_SHAPE))
    report = lint_tensorrt(model)
    assert found(report) == [("q-feeds-dq", "x_q")]
    assert "Cast 'tap'" in report.issues[0].message


def test_q_output_as_graph_output() -> None:
    model = clean_conv_model()
    model.graph.output.append(helper.make_tensor_value_info("x_q", TensorProto.INT8, X_SHAPE))
    assert found(lint_tensorrt(model)) == [("q-feeds-dq", "x_q")]


def test_contrib_domain_qdq() -> None:
    model = clean_conv_model()
    for name in ("x_q", "x_dq"):
        _node(model, name).domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert found(lint_tensorrt(model)) == [("qdq-domain", "x_q"), ("qdq-domain", "x_dq")]


def test_unnamed_nodes_are_labelled_by_position() -> None:
    model = clean_conv_model()
    _set_init(model, "x_scale", 0.0)
    for node in model.graph.node:
        node.name = ""
    assert found(lint_tensorrt(model)) == [
        ("scale-value", "QuantizeLinear[0]"),
        ("scale-value", "DequantizeLinear[1]"),
    ]


# --- fake-quantized weights and the other weight ops -----------------------------------------


def test_fake_quantized_float_weight() -> None:
    model = clean_conv_model()
    _set_init(model, "W", np.random.default_rng(0).standard_normal((4, 3, 3, 3)))
    model.graph.node.insert(
        2,
        helper.make_node("QuantizeLinear", ["W", "W_scale", "W_zp"], ["W_q"], name="w_q", axis=0),
    )
    _node(model, "w_dq").input[0] = "W_q"
    assert lint_tensorrt(model)
    for name in ("w_q", "w_dq"):
        _set_attr(_node(model, name), "axis", 1)
    _set_init(model, "W_scale", [0.01, 0.02, 0.03])
    _set_init(model, "W_zp", [0, 0, 0], np.int8)
    assert found(lint_tensorrt(model)) == [("weight-axis", "w_dq")]


def weight_op_model(
    op: str, weight_shape: tuple[int, ...], axis: int | None, **attrs: int
) -> onnx.ModelProto:
    """x[2, 6] -> Q/DQ -> op(x, DQ(W)); axis None means a per-tensor weight scale."""
    channels = weight_shape[axis] if axis is not None else None
    scale = np.full(channels, 0.01) if channels else np.float32(0.01)
    zero = np.zeros(channels) if channels else 0
    dq_attrs = {"axis": axis} if axis is not None else {}
    inputs = ["x_dq", "W_dq"]
    matrix = op in ("Gemm", "MatMul")
    x_shape, y_shape = ([2, 6], [2, 5]) if matrix else ([1, 6, 4, 4], [1, 3, 6, 6])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["W", "W_scale", "W_zp"], ["W_dq"], name="w_dq",
                         **dq_attrs),
        helper.make_node(op, inputs, ["y"], name="op", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [
            _init("x_scale", 0.05),
            _init("x_zp", 0, np.int8),
            _init("W", _weights(shape=weight_shape), np.int8),
            _init("W_scale", scale),
            _init("W_zp", zero, np.int8),
        ],
    )
    return _model(graph, OPSET)


@pytest.mark.parametrize(
    ("op", "weight_shape", "axis", "attrs"),
    [
        ("Gemm", (5, 6), 0, {"transB": 1}),
        ("Gemm", (6, 5), 1, {}),
        ("Gemm", (6, 5), None, {}),
        ("MatMul", (6, 5), 1, {}),
        ("MatMul", (6, 5), -1, {}),
        ("MatMul", (6, 5), None, {}),
        ("ConvTranspose", (6, 3, 3, 3), 1, {}),
    ],
)
def test_weight_ops_on_their_output_channel_axis_pass(
    op: str, weight_shape: tuple[int, ...], axis: int | None, attrs: dict[str, int]
) -> None:
    model = weight_op_model(op, weight_shape, axis, **attrs)
    onnx.checker.check_model(model)
    assert lint_tensorrt(model)


@pytest.mark.parametrize(
    ("op", "weight_shape", "axis", "attrs", "rule"),
    [
        ("Gemm", (5, 6), 1, {"transB": 1}, "weight-axis"),
        ("Gemm", (6, 5), 0, {}, "weight-axis"),
        ("MatMul", (6, 5), 0, {}, "weight-axis"),
        ("ConvTranspose", (6, 3, 3, 3), 0, {}, "weight-axis"),
        ("ConvTranspose", (6, 3, 3, 3), None, {}, "weight-per-channel"),
    ],
)
def test_weight_ops_break_the_weight_rules(
    op: str, weight_shape: tuple[int, ...], axis: int | None, attrs: dict[str, int], rule: str
) -> None:
    report = lint_tensorrt(weight_op_model(op, weight_shape, axis, **attrs))
    assert found(report) == [(rule, "w_dq")]
    assert f"{op} 'op'" in report.issues[0].message


# --- the report as a value -------------------------------------------------------------------


def test_report_text_and_json() -> None:
    model = clean_conv_model()
    model.opset_import[0].version = 12
    _set_init(model, "x_zp", 1, np.int8)
    report = lint_tensorrt(model)
    assert not report
    assert report.rules == ("opset", "zero-point-value")
    lines = str(report).splitlines()
    assert lines[0] == "TensorRT Q/DQ lint: 3 issues (3 QuantizeLinear/DequantizeLinear nodes)"
    assert lines[1].startswith("  [opset] the model uses opset 12")
    assert str(report) == report.summary()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["qdq_nodes"] == 3
    assert data["issues"][1] == {
        "rule": "zero-point-value",
        "node": "x_q",
        "tensor": "x_zp",
        "message": report.issues[1].message,
    }
    assert LintReport().to_dict() == {"passed": True, "qdq_nodes": 0, "issues": [], "advice": []}
    assert str(LintIssue("opset", "", "", "m")) == "[opset] m"


# --- ONNX Runtime's quantize_static ----------------------------------------------------------


def conv_relu_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    initializers = [
        _init("W1", rng.standard_normal((4, 3, 3, 3)) * 0.3),
        _init("B1", rng.standard_normal(4) * 0.1),
        _init("W2", rng.standard_normal((2, 4, 3, 3)) * 0.3),
        _init("B2", rng.standard_normal(2) * 0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        initializers,
    )
    return _model(graph, OPSET)


Quantize = Callable[..., onnx.ModelProto]


@pytest.fixture
def ort_quantize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Quantize:
    """Run ORT's quantize_static on the Conv->Relu->Conv model, keeping its files in tmp_path."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = tmp_path / "fp32.onnx"
    onnx.save(conv_relu_conv_model(), str(source))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(3)
            feeds = [{"x": rng.standard_normal(X_SHAPE).astype(np.float32)} for _ in range(4)]
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    def run(name: str, **options: object) -> onnx.ModelProto:
        target = tmp_path / f"{name}.onnx"
        quantize_static(str(source), str(target), Reader(), **options)
        return onnx.load(str(target))

    return run


def test_onnxruntime_tensorrt_style_quantization_passes(ort_quantize: Quantize) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType

    model = ort_quantize(
        "trt",
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
        },
    )
    report = lint_tensorrt(model)
    assert report, report.summary()
    assert report.qdq_nodes >= 6


@pytest.mark.parametrize(
    ("activation_type", "zero_point_rule"),
    [("QInt8", "zero-point-value"), ("QUInt8", "zero-point-type")],
)
def test_onnxruntime_default_quantization_fails(
    ort_quantize: Quantize, activation_type: str, zero_point_rule: str
) -> None:
    from onnxruntime.quantization import QuantType

    # ORT 1.31's defaults: QDQ, asymmetric QInt8 activations, per-tensor weights, INT32 biases.
    # The classic U8 activations are asked for explicitly.
    model = ort_quantize("default", activation_type=QuantType[activation_type])
    report = lint_tensorrt(model)
    assert not report
    assert report.rules == tuple(sorted({"int32-bias", zero_point_rule, "weight-per-channel"}))
    biases = [(issue.node, issue.tensor) for issue in report.issues if issue.rule == "int32-bias"]
    assert biases == [
        ("B1_DequantizeLinear", "B1_quantized"),
        ("B2_DequantizeLinear", "B2_quantized"),
    ]
