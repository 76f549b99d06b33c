"""The weight quantization transforms assume is the one ONNX Runtime writes into Q/DQ models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantlab.transforms.graph import quantize_weight


@pytest.mark.parametrize("shape,axis", [((16, 3, 3, 3), 0), ((24, 10), 1), ((4, 6, 2, 2), 1)])
def test_quantize_weight_matches_onnx_runtime(shape, axis):
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer

    g = np.random.default_rng(0)
    w = (g.standard_normal(shape) * 10.0 ** g.uniform(-3, 1, shape[axis]).reshape(
        [-1 if d == axis else 1 for d in range(len(shape))])).astype(np.float32)
    w.take(indices=0, axis=axis)[...] = 0.0  # an all-zero channel
    q, s = quantize_weight(w, axis)
    for c in range(shape[axis]):  # the scale ONNX Runtime computes, channel by channel
        _, ort_scale = compute_data_quant_params(w.take(c, axis).ravel(), onnx.TensorProto.INT8, True)
        assert s.ravel()[c] == ort_scale
    init = numpy_helper.from_array(w, "w")
    ort_q = quantize_onnx_initializer(init, onnx.TensorProto.INT8, np.zeros(shape[axis], np.int8), s.ravel(), axis)
    np.testing.assert_array_equal(q, numpy_helper.to_array(ort_q).astype(np.int32))
    assert np.abs(q).max() == 127 and s.dtype == np.float32


def test_scale_example():
    q, s = quantize_weight(np.array([[0.5, -1.27, 0.013]], np.float32), 0)
    np.testing.assert_allclose(s.ravel(), [0.01], rtol=1e-6)
    np.testing.assert_array_equal(q, [[50, -127, 1]])
