"""Loading, checking and preparing models; choosing what to calibrate."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from quantlab.errors import QuantlabError
from quantlab.model import prepare_model

from conftest import conv_net, save_model


def test_prepare_selects_and_folds(tiny_model):
    pm = prepare_model(tiny_model)
    assert pm.inputs[0].name == "input" and pm.inputs[0].shape == (None, 3, 8, 8)
    assert pm.folded == {"c1": "r1"}  # the Conv output read only by the Relu takes the Relu's range
    assert {"input", "r1", "c2", "a1", "gap", "logits"} <= set(pm.tensors)
    assert prepare_model(tiny_model).path == pm.path  # cached by content


def test_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("hello, I am a text file")
    with pytest.raises(QuantlabError, match="is not an ONNX model"):
        prepare_model(bad)
    with pytest.raises(QuantlabError, match="does not exist"):
        prepare_model(tmp_path / "missing.onnx")


def test_nothing_to_quantize(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    path = save_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), tmp_path / "relu.onnx")
    with pytest.raises(QuantlabError, match="nothing to quantize"):
        prepare_model(path)


def test_dynamic_spatial_dims_need_a_shape(tmp_path):
    path = save_model(conv_net(hw=("H", "W")), tmp_path / "dyn.onnx")
    with pytest.raises(QuantlabError, match=r"dynamic dimension 'H' at axis 2.*input_shapes"):
        prepare_model(path)
    pm = prepare_model(path, {"input": (1, 3, 8, 8)})
    assert pm.inputs[0].shape == (None, 3, 8, 8)  # the batch axis stays dynamic
    with pytest.raises(QuantlabError, match="the model's inputs are"):
        prepare_model(path, {"image": (1, 3, 8, 8)})


def test_old_opset_is_upgraded(tmp_path):
    path = save_model(conv_net(), tmp_path / "old.onnx", opset=11)
    pm = prepare_model(path)
    import onnx

    assert next(o.version for o in onnx.load(str(pm.path)).opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert np.dtype("float32") == pm.inputs[0].dtype
