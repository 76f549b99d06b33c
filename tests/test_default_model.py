"""The bundled default end to end: real EfficientNet-Lite0 weights, real photographs, real labels.

The 20 labelled ImageNet images shipped in foolbox's data folder are the evaluation set (they are
not in calib_data/); FP32 top-1 on them is 0.85.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantlab.collect import ort_session
from quantlab.config import load_config, override
from quantlab.data import InputSpec, make_reader
from quantlab.ptq import run_ptq
from quantlab.qdq.lint import lint_tensorrt

from conftest import ROOT

pytestmark = pytest.mark.slow


def _imagenet_folder(tmp: Path) -> tuple[Path, list[int]]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the labelled ImageNet images come with the foolbox package: run .ci/setup")
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    for f in files:
        shutil.copy(f, tmp / f.name)
    return tmp, [int(f.stem.rsplit("_", 1)[1]) for f in files]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    config = override(load_config(ROOT / "quantlab.toml"), "ptq", out=str(tmp_path_factory.mktemp("reports")), latency_runs=5)
    result = run_ptq(config)
    folder, labels = _imagenet_folder(tmp_path_factory.mktemp("imagenet"))
    return config, result, folder, labels


def _top1(model: Path, config, folder: Path, labels: list[int]) -> float:
    session = ort_session(str(model), level="all")
    spec = InputSpec(session.get_inputs()[0].name, (None, 3, 224, 224), np.dtype("float32"))
    x = np.concatenate([b[spec.name] for b in make_reader(config.data, folder, [spec])])
    return float(np.mean(session.run(None, {spec.name: x})[0].argmax(1) == np.array(labels)))


def test_default_run_is_complete(default_run):
    _, result, _, _ = default_run
    assert result and result.samples == 19 and len(result.engines) == 8
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["model"]["name"] == "efficientnet-lite0"
    for e in result.engines:
        assert e.cosine > 0.95, e
        if e.target == "tensorrt":
            assert lint_tensorrt(result.run_dir / e.path)


def test_int8_accuracy_on_labelled_imagenet_images(default_run):
    config, result, folder, labels = default_run
    fp32 = _top1(result.run_dir / "model_fp32.onnx", config, folder, labels)
    fp16 = _top1(result.run_dir / "model_fp16.onnx", config, folder, labels)
    int8 = {e.path: _top1(result.run_dir / e.path, config, folder, labels) for e in result.engines}
    assert fp32 == pytest.approx(0.85) and fp16 == fp32
    assert max(int8.values()) >= fp32 - 1e-9, int8  # the best INT8 engine loses nothing on these 20
    assert min(int8.values()) >= fp32 - 0.10, int8  # and none loses more than two images
