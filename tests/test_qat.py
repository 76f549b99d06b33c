"""Quantization-aware training: ranges from quantlab's calibration, fine-tuning, Q/DQ export, checks.

The real EfficientNet-Lite0 runs a very short QAT (two steps of two images); a tiny network built
here covers the labelled path, determinism and the scope mapping in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantlab.calibrators import get_calibrator
from quantlab.collect import ort_session
from quantlab.config import Config, ModelConfig, QatConfig, load_config, override
from quantlab.data import make_reader
from quantlab.errors import QuantlabError
from quantlab.model import export_pytorch, prepare_model
from quantlab.ptq import gather_stats, resolve_model
from quantlab.qat import activation_amax, run_qat, scope_inputs

from conftest import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the real default model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_qat(tmp_path_factory):
    config = load_config(ROOT / "quantlab.toml")
    config = override(config, "qat", epochs=2, max_steps=3, batch_size=2, calib_batches=1)
    prepared = prepare_model(resolve_model(config), config.model.input_shapes)
    amax = activation_amax(gather_stats(config, prepared), get_calibrator("entropy"))
    data = dataclasses.replace(config.data, batch_size=2, max_samples=4)
    train = list(make_reader(data, config.resolve(config.data.calib), prepared.inputs))
    fp32 = ort_session(str(prepared.path))
    evaluated: list[Path] = []

    def evaluate(path: Path) -> float:  # agreement with FP32 on the first batch, as a harness would
        evaluated.append(path)
        return _cosine(fp32.run(None, train[0])[0], ort_session(str(path)).run(None, train[0])[0])

    out = tmp_path_factory.mktemp("qat") / "lite0.qat.onnx"
    result = run_qat(config, amax=amax, train=train, evaluate=evaluate, good_enough=lambda m: m > 0.5, out=out)
    return result, prepared, train, evaluated


@pytest.mark.slow
def test_lite0_qat_starts_from_quantlab_ranges(lite0_qat):
    result, _, _, _ = lite0_qat
    assert result.quantizers >= 50  # 49 convolutions, the pooling and the classifier
    assert result.mapped / result.quantizers >= 0.95, result.fallback
    assert result.mapped + len(result.fallback) == result.quantizers
    assert result.loss == "distill" and result.device in ("cpu", "cuda")
    assert all(np.isfinite(result.losses))


@pytest.mark.slow
def test_lite0_qat_stops_early_when_good_enough(lite0_qat):
    result, _, _, evaluated = lite0_qat
    assert result.stopped_early and result.epochs == 1 and len(result.metrics) == 1
    assert result.steps == 2  # one epoch of two batches, below max_steps = 3
    assert len(evaluated) == 1 and result.metrics[0] > 0.9


@pytest.mark.slow
def test_lite0_qat_model_is_valid_qdq_onnx(lite0_qat):
    result, prepared, train, _ = lite0_qat
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10 and result.ir_version == model.ir_version
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= result.quantizers and ops.count("DequantizeLinear") >= result.quantizers
    ref = ort_session(str(prepared.path)).run(None, train[1])[0]
    out = ort_session(str(result.path)).run(None, train[1])[0]  # the second batch: not the one checked inside
    assert _cosine(ref, out) > 0.9
    assert result.cosine > 0.9
    assert result.lint["passed"] == (result.tensorrt_rules == "pass")
    assert result.tensorrt_rules == "pass", result.lint["issues"][:3]
    d = result.to_dict()
    assert d["mapped"] == result.mapped and d["lint"]["qdq_nodes"] > 0 and "train_step" in d["seconds"]


# --- a tiny network -------------------------------------------------------------------------------


class _SamePadConv(torch.nn.Conv2d):
    """A Conv2d subclass with its own forward (pads, then convolves), like EfficientNet's."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, bias=True)
        self.pad = torch.nn.ZeroPad2d(1)

    def forward(self, x):
        return torch.nn.functional.conv2d(self.pad(x), self.weight, self.bias)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.body = _SamePadConv(8, 8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        return self.fc(self.pool(self.act(self.body(x))).flatten(1))


def tiny_factory():
    torch.manual_seed(0)
    return _Tiny().eval()


def _tiny_config(**qat) -> Config:
    model = ModelConfig(
        pytorch="test_qat:tiny_factory", input_names=("input",), output_names=("logits",),
        input_shapes={"input": (1, 3, 8, 8)},
    )
    return Config(model=model, qat=QatConfig(**qat))


def _tiny_data(n: int = 3, labels: bool = True):
    g = np.random.default_rng(0)
    feeds = [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    return [(f, g.integers(0, 4, 4)) for f in feeds] if labels else feeds


def _tiny_amax(config: Config) -> dict[str, float]:
    m = config.model
    prepared = prepare_model(export_pytorch(m.pytorch, m.input_shapes, m.input_names, m.output_names, m.opset))
    return {name: 3.0 for name in prepared.tensors + list(prepared.folded)}


@pytest.mark.slow  # the first QAT of a session pays modelopt's import (about 10 s)
def test_tiny_qat_with_labels_is_deterministic(tmp_path):
    config = _tiny_config(epochs=2, lr=1e-3, seed=3)
    amax = _tiny_amax(config)
    a = run_qat(config, amax=amax, train=_tiny_data(), out=tmp_path / "a.onnx", evaluate=None, good_enough=None)
    b = run_qat(config, amax=amax, train=_tiny_data(), out=tmp_path / "b.onnx", evaluate=None, good_enough=None)
    assert a.loss == "labels" and a.epochs == 2 and a.steps == 6 and not a.stopped_early
    assert a.losses == b.losses
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # stem, body (a Conv2d subclass with its own forward), pooling and classifier, all mapped
    assert a.quantizers == 4 and a.mapped == 4 and a.fallback == []
    assert a.tensorrt_rules == "pass"
    assert not list(tmp_path.glob(".*"))  # no temporary files left beside the model


@pytest.mark.slow  # the first QAT of a session pays modelopt's import (about 10 s)
def test_tiny_qat_falls_back_and_honours_max_steps(tmp_path):
    config = _tiny_config(epochs=3, max_steps=2)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.desc = total, 0, ""
            bars.append(self)

        def set_description(self, d):
            self.desc = d

        def update(self, n):
            self.n += n

        def close(self):
            pass

    r = run_qat(config, amax={}, train=_tiny_data(labels=False), out=tmp_path / "m.onnx", progress=Bar)
    assert r.loss == "distill" and r.steps == 2 and r.epochs == 1
    assert r.mapped == 0 and len(r.fallback) == r.quantizers == 4  # modelopt's max calibration
    assert [(b.total, b.n) for b in bars] == [(2, 2)] and bars[0].desc == "QAT epoch 1/3"
    assert ort_session(str(r.path)).run(None, _tiny_data(1, labels=False)[0])[0].shape == (4, 4)


def test_labels_loss_needs_labels(tmp_path):
    with pytest.raises(QuantlabError, match="carry no labels"):
        run_qat(_tiny_config(loss="labels"), amax={}, train=_tiny_data(labels=False), out=tmp_path / "m.onnx")


def test_qat_needs_a_pytorch_model(tmp_path, tiny_model):
    config = Config(model=ModelConfig(onnx=str(tiny_model)), qat=QatConfig(source="pytorch"))
    with pytest.raises(QuantlabError) as info:
        run_qat(config, amax={}, train=[], evaluate=None, good_enough=None, out=tmp_path / "m.onnx")
    assert str(info.value) == "QAT needs the PyTorch model: set [model] pytorch = 'module:factory'"
    assert "\n" not in str(info.value)


def test_qat_config_section(tmp_path):
    path = tmp_path / "quantlab.toml"
    path.write_text('[qat]\nepochs = 2\nlr = 0.001\ndevice = "cpu"\ndata = "train"\n')
    c = load_config(path)
    assert c.qat.epochs == 2 and c.qat.device == "cpu" and c.resolve(c.qat.data) == tmp_path / "train"
    for bad in ({"device": "tpu"}, {"loss": "kl"}, {"epochs": 0}, {"lr": 0.0}, {"max_steps": -1}, {"source": "tf"},
                {"optimizer": "lamb"}, {"patience": -1}):
        with pytest.raises(QuantlabError):
            QatConfig(**bad)
    path.write_text("[qat]\nepoch = 2\n")
    with pytest.raises(QuantlabError, match="unknown key"):
        load_config(path)


def test_scope_inputs_finds_the_tensor_entering_each_module():
    nodes = [
        helper.make_node("Clip", ["x"], ["/act/Clip_output_0"], name="/act/Clip"),
        helper.make_node("Constant", [], ["/b.0/conv/pad/Constant_output_0"], name="/b.0/conv/pad/Constant",
                         value=helper.make_tensor("p", TensorProto.INT64, [8], [0] * 8)),
        helper.make_node("Pad", ["/act/Clip_output_0", "/b.0/conv/pad/Constant_output_0"], ["/b.0/conv/pad/Pad_output_0"],
                         name="/b.0/conv/pad/Pad"),
        helper.make_node("Conv", ["/b.0/conv/pad/Pad_output_0", "w"], ["/b.0/conv/Conv_output_0"], name="/b.0/conv/Conv"),
        helper.make_node("Add", ["/b.0/conv/Conv_output_0", "/act/Clip_output_0"], ["y"], name="/b.0/Add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])],
    )
    entering = scope_inputs(helper.make_model(graph))
    assert entering["b.0.conv"] == ["/act/Clip_output_0"]  # through the padding, not the weight
    assert entering["b.0.conv.pad"] == ["/act/Clip_output_0"]
    assert entering["act"] == ["x"]
    assert entering["b.0"] == ["/act/Clip_output_0"]
