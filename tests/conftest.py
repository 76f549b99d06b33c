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


def one_conv_net(output: str = "y", x: str = "x") -> onnx.GraphProto:
    """x[N,3,8,8] -> Conv(4, 3x3) -> the graph output: a quantized convolution output that is a graph output."""
    g = np.random.default_rng(3)
    return helper.make_graph(
        [helper.make_node("Conv", [x, "w"], [output], name="conv", pads=[1, 1, 1, 1])], "one_conv",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(g.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_model(conv_net(), tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_calib(tmp_path: Path) -> Path:
    """Six .npz files of 4 seeded samples each for ``tiny_model``."""
    return write_tiny_calib(tmp_path / "calib")


def write_tiny_calib(folder: Path, files: int = 6) -> Path:
    """``files`` .npz files of 4 seeded samples each for the tiny model (the same first files for any count)."""
    folder.mkdir()
    g = np.random.default_rng(1)
    for i in range(files):
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


def _labelled_eval_folder(folder: Path, model: Path, n: int = 12, seed: int = 7) -> Path:
    """``n`` single-sample .npy files named ``s<i>_<label>``, labelled with FP32's own prediction.

    A per-sample colour offset spreads the tiny model's predictions over several classes.
    """
    from quantlab.collect import ort_session

    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    x = (g.standard_normal((n, 3, 8, 8)) + 2 * g.standard_normal((n, 3, 1, 1))).astype(np.float32)
    labels = ort_session(str(model)).run(None, {"input": x})[0].argmax(1)
    for i, (sample, label) in enumerate(zip(x, labels)):
        np.save(folder / f"s{i:02d}_{label}.npy", sample)
    return folder


COMPARE_SECTION = """
[compare]
eval = "{eval}"
labels = "filename"
task = "classification"
latency_runs = 2
latency_batches = [1, 4]
sensitivity_samples = 8

[gate]
baseline = "{root}/baseline.json"
regression = 0.0

[tolerance]
top1_agreement = 0.5
"""


@pytest.fixture(scope="session")
def _tiny_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PTQ run of the tiny model with a labelled evaluation folder, made once per session."""
    import os

    from quantlab.config import load_config
    from quantlab.ptq import run_ptq

    root = tmp_path_factory.mktemp("tiny-run")
    old = os.environ.get("QUANTLAB_CACHE")
    os.environ["QUANTLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "quantlab-cache")
    try:
        model = save_model(conv_net(), root / "tiny.onnx")
        calib = write_tiny_calib(root / "calib")
        folder = _labelled_eval_folder(root / "eval", model)
        config = root / "quantlab.toml"
        config.write_text(tiny_config_text(model, calib, root / "reports") + COMPARE_SECTION.format(eval=folder, root=root))
        run_ptq(load_config(config))
    finally:
        if old is None:
            os.environ.pop("QUANTLAB_CACHE", None)
        else:
            os.environ["QUANTLAB_CACHE"] = old
    return root


@pytest.fixture
def tiny_run(tmp_path: Path, _tiny_run_template: Path) -> tuple[Path, Path]:
    """``(run folder, config)``: a private copy of the session's tiny PTQ run and its config."""
    import shutil

    root = tmp_path / "tiny-run"
    shutil.copytree(_tiny_run_template, root)
    config = root / "quantlab.toml"
    config.write_text(config.read_text().replace(str(_tiny_run_template), str(root)))
    return root / "reports" / "tiny", config


def prepared_with_stats(folder: Path, graph: onnx.GraphProto, name: str, input_name: str,
                        shape: tuple[int, ...], batches: int, seed: int):
    """``(prepared model, statistics, generator)``: ``graph`` saved as ``folder/name``, prepared under a
    cache inside ``folder`` (never the user's), its statistics over ``batches`` seeded standard-normal
    batches of ``shape``; the generator goes on from there for further draws."""
    from quantlab.collect import collect_stats
    from quantlab.model import prepare_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_CACHE", str(folder / "cache"))
        pm = prepare_model(save_model(graph, folder / name))
    g = np.random.default_rng(seed)
    calib = [{input_name: g.standard_normal(shape).astype(np.float32)} for _ in range(batches)]
    return pm, collect_stats(pm, calib), g


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The prepared tiny conv net and its minmax Q/DQ model for each target, plus three seeded batches."""
    from quantlab.calibrators import get_calibrator
    from quantlab.qdq.targets import TARGETS, compute_ranges, write_qdq_model

    folder = tmp_path_factory.mktemp("layers")
    pm, stats, _ = prepared_with_stats(folder, conv_net(), "tiny.onnx", "input", (4, 3, 8, 8), 5, 0)
    models = {}
    for name, target in TARGETS.items():
        out = folder / f"{name}.onnx"
        write_qdq_model(pm.path, compute_ranges(stats, get_calibrator("minmax"), target), target, out)
        models[name] = onnx.load(str(out))
    fp32 = onnx.load(str(pm.path))
    g = np.random.default_rng(7)
    feeds = [{"input": g.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    return fp32, models, feeds
