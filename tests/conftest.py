"""Shared fixtures: tiny ONNX models built in code, seeded data, an isolated model cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exported and prepared models go to a per-session temporary cache, never the user's."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "quantlab-cache"))


def save_model(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # the newest IR ONNX Runtime 1.31 loads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_net(seed: int = 0, batch: str | int = "N", hw: tuple[int | str, int | str] = (8, 8)) -> onnx.GraphProto:
    """input[N,3,8,8] -> Conv(8) -> Relu -> Conv(8) -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm(4)."""
    g = np.random.default_rng(seed)
    w1 = g.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = g.standard_normal(8).astype(np.float32) * 0.1
    w2 = g.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    b2 = g.standard_normal(8).astype(np.float32) * 0.1
    w3 = g.standard_normal((4, 8)).astype(np.float32) * 0.5
    b3 = g.standard_normal(4).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
        helper.make_node("GlobalAveragePool", ["a1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)]]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *hw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])
    return helper.make_graph(nodes, "conv_net", [x], [y], inits)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_model(conv_net(), tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_calib(tmp_path: Path) -> Path:
    """Six .npz files of 4 seeded samples each for ``tiny_model``."""
    folder = tmp_path / "calib"
    folder.mkdir()
    g = np.random.default_rng(1)
    for i in range(6):
        np.savez(folder / f"batch{i:02d}.npz", input=g.standard_normal((4, 3, 8, 8)).astype(np.float32))
    return folder


def tiny_config_text(model: Path, calib: Path, out: Path) -> str:
    return f"""
[model]
onnx = "{model}"
[data]
calib = "{calib}"
batch_size = 5
[ptq]
out = "{out}"
latency_runs = 0
"""


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model: Path, tiny_calib: Path) -> Path:
    path = tmp_path / "quantlab.toml"
    path.write_text(tiny_config_text(tiny_model, tiny_calib, tmp_path / "reports"))
    return path
