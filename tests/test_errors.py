"""User errors and bugs: onnx/ONNX Runtime failures on a model become one line naming the stage; bugs keep their traceback."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from quantlab.errors import QuantlabError, node_in_traceback, stage


def _bad_model() -> bytes:
    """A graph ONNX Runtime refuses to load: a Conv whose weight has the wrong rank."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="broken_conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m.SerializeToString()


def test_onnx_runtime_error_becomes_one_line_naming_the_stage():
    import onnxruntime as ort

    with pytest.raises(QuantlabError) as info:
        with stage("check", "loading the model in ONNX Runtime", "re-export it"):
            ort.InferenceSession(_bad_model(), providers=["CPUExecutionProvider"])
    message = str(info.value)
    assert message.startswith("check: loading the model in ONNX Runtime failed (") and message.endswith("): re-export it")
    assert "broken_conv" in message and "\n" not in message and "[ONNXRuntimeError]" not in message
    assert info.value.__cause__ is not None  # the library's error stays attached for a debugger


def test_onnx_checker_error_is_a_user_error():
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [], []))
    with pytest.raises(QuantlabError, match=r"^prepare: checking failed \(ValidationError"):
        with stage("prepare", "checking", "fix it"):
            onnx.checker.check_model(m)


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        with stage("quantize", "quantizing", "fix it"):
            1 / 0  # noqa: B018


def test_the_node_a_library_was_working_on_is_found_in_its_frames():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv7")

    def quantize(node):  # a library frame holding the node it works on
        raise ValueError("operands could not be broadcast")

    with pytest.raises(ValueError) as info:
        quantize(node)
    assert node_in_traceback(info.value) == "conv7"
