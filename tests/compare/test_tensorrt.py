"""The TensorRT backend: a one-line error without the package; a real engine where TensorRT exists."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.cli import main
from quantlab.compare.runners import OrtRunner, TensorRTRunner, tensorrt_available


@pytest.mark.skipif(tensorrt_available(), reason="tensorrt is installed: the missing-package error cannot occur")
def test_missing_tensorrt_is_a_one_line_error(tiny_run, capsys) -> None:
    run_dir, config = tiny_run
    assert main(["compare", "--config", str(config), "--run", str(run_dir), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'tensorrt' package" in err and err.count("\n") == 1


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnx_runtime(tiny_run) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on these machines (README: TensorRT)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    run_dir, _ = tiny_run
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    for rel in ("model_fp32.onnx", "model_fp16.onnx", "int8/minmax.tensorrt.onnx"):
        trt_out = TensorRTRunner(run_dir / rel, max_batch=4).run({"input": x})[0]
        ort_out = OrtRunner(run_dir / rel).run({"input": x})[0]
        cos = float(np.sum(trt_out * ort_out) / (np.linalg.norm(trt_out) * np.linalg.norm(ort_out)))
        assert cos > 0.99, rel
