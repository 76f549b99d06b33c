"""`quantlab compare` end to end on the tiny model: engines, metrics, tolerance, files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantlab.cli import main
from quantlab.compare import run_compare
from quantlab.config import load_config


@pytest.fixture
def run(tiny_run: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_run


def test_compare_evaluates_every_engine(run: tuple[Path, Path]) -> None:
    run_dir, config_path = run
    result = run_compare(load_config(config_path), run_dir)
    names = [e.name for e in result.engines]
    assert names[:2] == ["fp32", "fp16"] and len(names) == 2 + 8
    fp32 = result["fp32"]
    # the labels are FP32's own predictions, and FP32 agrees with itself exactly
    assert fp32.metrics["top1"] == 1.0 and fp32.metrics["top1_agreement"] == 1.0
    # FP32 against itself has no error: no SQNR (not the 999 dB cap)
    assert fp32.metrics["sqnr_db"] is None and fp32.outputs["logits"]["sqnr_db"] is None
    assert fp32.metrics["kl"] == pytest.approx(0.0, abs=1e-12)
    assert result.labelled == 12 and result.primary == "top1"
    labels = {int(f.stem.rsplit("_", 1)[1]) for f in Path(load_config(config_path).compare.eval).iterdir()}
    assert len(labels) > 1, "the evaluation set spans several classes"
    for e in result.int8:
        assert 0.0 <= e.metrics["top1"] <= 1.0 and e.metrics["sqnr_db"] < 999.0
        assert e.metrics["top1"] == e.metrics["top1_agreement"]  # labels == FP32 argmax
        assert e.tolerance_ok is not None
        if e.target == "tensorrt":
            # built for TensorRT: evaluated, but its CPU latency measures nothing a TensorRT user gets
            assert e.latency == {} and not e.slower_than_fp32 and "--backend tensorrt" in e.untimed
            continue
        assert e.untimed is None and e.latency["1"]["p90_ms"] >= e.latency["1"]["median_ms"] > 0
        # batch 4 is timed once per graph: the other calibrators' models of a target differ only in constants
        assert set(e.latency) == {"1", "4"} or (set(e.latency) == {"1"} and set(e.latency_same_as) == {"4"})
    for fp in ("fp32", "fp16"):
        assert set(result[fp].latency) == {"1", "4"} and result[fp].untimed is None
    timed = [e.name for e in result.int8 if e.target == "ort-cpu" and "4" in e.latency]
    assert len(timed) == 1, timed
    assert all(e.latency_same_as == {"4": timed[0]} for e in result.int8 if e.target == "ort-cpu" and e.name != timed[0])
    assert result.best is not None and result.best.precision == "int8"
    text = str(result)
    assert "int8:entropy.ort-cpu" in text and "best INT8 engine" in text and "999.0" not in text
    assert "'n/t': not timed: the tensorrt target's models are built for tensorrt;" in text
    assert json.loads((run_dir / "latency.json").read_text())["not_timed"].keys() == {
        e.name for e in result.int8 if e.target == "tensorrt"}
    head, _, fp32_row = text.splitlines()[1:4]
    sqnr_col = head.split().index("sqnr_db")
    assert fp32_row.split()[sqnr_col] == "-"


def test_results_are_written_listed_and_deterministic(run: tuple[Path, Path]) -> None:
    run_dir, config_path = run
    run_compare(load_config(config_path), run_dir)
    first = (run_dir / "compare.json").read_bytes()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    kinds = {a["path"]: a["kind"] for a in manifest["artefacts"]}
    assert kinds["compare.json"] == "compare" and kinds["latency.json"] == "timing"
    run_compare(load_config(config_path), run_dir)
    assert (run_dir / "compare.json").read_bytes() == first
    data = json.loads(first)
    assert data["best"] and data["engines"][0]["name"] == "fp32"
    assert data["layers"]["rows"], "per-layer analysis of the best engine"
    for row in data["layers"]["rows"]:
        assert row["own_sqnr_db"] is not None and row["accumulated_sqnr_db"] is not None


def test_sensitivity_layers_measures_the_worst_own_errors_only(run: tuple[Path, Path]) -> None:
    run_dir, config_path = run
    config_path.write_text(config_path.read_text().replace("[compare]", "[compare]\nsensitivity_layers = 2", 1))
    rows = run_compare(load_config(config_path), run_dir, write=False).layers["rows"]
    measured = [r for r in rows if r["sensitivity"] is not None]
    assert len(measured) == 2 and len(rows) > 2
    assert rows[:2] == measured  # the unmeasured layers come last
    worst_own = sorted(rows, key=lambda r: r["own_sqnr_db"])[:2]
    assert {r["node"] for r in measured} == {r["node"] for r in worst_own}


def test_layers_skip_a_best_engine_that_is_not_a_copy_of_the_fp32_graph(run: tuple[Path, Path]) -> None:
    """A model exported separately (as after QAT) can be the best engine; the analysis takes the next."""
    import onnx

    run_dir, config_path = run
    best = run_compare(load_config(config_path), run_dir, layers=False, write=False).best
    model = onnx.load(str(run_dir / best.path))
    renamed = {}
    for i, node in enumerate(model.graph.node):  # same computation, other node and tensor names
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            node.name = f"exported_{i}"
            for k, out in enumerate(node.output):
                if out not in {o.name for o in model.graph.output}:
                    renamed[out] = node.output[k] = f"exported_{i}_{k}"
    for node in model.graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
    del model.graph.value_info[:]
    onnx.save(model, str(run_dir / "int8" / "a-export.ort-cpu.onnx"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["artefacts"].append({"path": "int8/a-export.ort-cpu.onnx", "kind": "model-int8-qdq",
                                  "calibrator": "a-export", "target": "ort-cpu"})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = run_compare(load_config(config_path), run_dir)
    assert result.best.name == "int8:a-export.ort-cpu"  # ties its source on every metric, first by name
    assert result.layers["engine"] == best.name and result.layers["skipped"] == ["int8:a-export.ort-cpu"]
    assert result.layers["rows"] and "not a Q/DQ copy of the FP32 graph" in str(result)
    assert "not analysed: int8:a-export.ort-cpu" in (run_dir / "index.html").read_text()


def test_tolerance_decides_truthiness_and_exit_code(run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir, config_path = run
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--no-layers"]) == 0
    text = config_path.read_text().replace("top1_agreement = 0.5", "top1_agreement = { min = 1.01 }")
    config_path.write_text(text)
    capsys.readouterr()
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--no-layers"]) == 1
    out = capsys.readouterr().out
    assert "below the floor 1.01" in out and "FAIL" in out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("top1_agreement = 0.5", "iou = 0.1"), "tolerance on iou, which compare"),
        (lambda t: t.replace("top1_agreement = 0.5", "sqnr_db = 3"), "tolerance on sqnr_db relative to FP32"),
        (lambda t: t.replace('task = "classification"', 'task = "classification"\nprimary = "bleu"'),
         "compare.primary 'bleu' is not computed"),
        (lambda t: t.replace('task = "classification"', 'task = "classification"\nmetric = "nowhere_mod:f"'),
         "cannot import the metric module"),
    ],
)
def test_bad_compare_configs_are_user_errors(run, edit, message, capsys) -> None:
    run_dir, config_path = run
    config_path.write_text(edit(config_path.read_text()))
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--no-layers"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_run_without_manifest_and_mismatched_eval_data(run, tmp_path, capsys) -> None:
    run_dir, config_path = run
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["compare", "--config", str(config_path), "--run", str(empty)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "a_1.npy", np.zeros((3, 4, 4), np.float32))
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--eval", str(wrong)]) == 2
    assert "reshape the data to match the model" in capsys.readouterr().err
    bad_label = tmp_path / "bad_label"
    bad_label.mkdir()
    np.save(bad_label / "a_9.npy", np.zeros((3, 8, 8), np.float32))  # the model has 4 classes
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--eval", str(bad_label)]) == 2
    assert "out of range for a model with 4 classes" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    np.save(unlabelled / "sample.npy", np.zeros((3, 8, 8), np.float32))
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir), "--eval", str(unlabelled)]) == 2
    assert "cannot read a class label from 'sample.npy'" in capsys.readouterr().err


def test_fixed_batch_model_is_compared_at_its_batch_size(tmp_path: Path) -> None:
    """A model whose batch dimension is fixed at 2: evaluation, latency and the per-layer analysis feed batches of 2."""
    import onnx

    from exporters import convolutions
    from quantlab.ptq import run_ptq

    onnx.save(convolutions(batch=2), str(tmp_path / "fixed2.onnx"))
    g = np.random.default_rng(3)
    for sub in ("calib", "eval"):
        (tmp_path / sub).mkdir()
        np.savez(tmp_path / sub / "x.npz", x1=g.standard_normal((6, 4, 16)).astype(np.float32))
    (tmp_path / "q.toml").write_text(
        f'[model]\nonnx = "{tmp_path}/fixed2.onnx"\n[data]\ncalib = "{tmp_path}/calib"\n'
        f'[ptq]\nout = "{tmp_path}/out"\nlatency_runs = 1\ncalibrators = ["minmax"]\nreport = false\n'
        f'[compare]\neval = "{tmp_path}/eval"\nlabels = "none"\ntask = "outputs"\nlatency_runs = 1\n'
    )
    config = load_config(tmp_path / "q.toml")
    run_ptq(config)
    result = run_compare(config)
    assert all(set(e.latency) == {"2"} for e in result.engines if not e.untimed)
    assert any(e.untimed for e in result.engines) and any(set(e.latency) == {"2"} for e in result.int8)
    assert result.layers and len(result.layers["rows"]) > 0


def test_transformed_run_is_judged_against_the_untransformed_fp32(run: tuple[Path, Path]) -> None:
    """INT8 models of a transformed graph: FP32 is the original model, the per-layer analysis pairs
    each INT8 layer with the transformed graph it was quantized from."""
    from quantlab.config import override
    from quantlab.ptq import run_ptq

    _, config_path = run
    config = override(load_config(config_path), "ptq", transforms=("smoothquant", "bias-correction"),
                      calibrators=("minmax",), run_name="transformed", report=False)
    run_dir = run_ptq(config).run_dir
    result = run_compare(config, run_dir)
    assert result["fp32"].path == "model_fp32.onnx" and result["fp32"].metrics.get("sqnr_db") is None
    assert result.layers and result.layers["rows"] and not result.layers.get("skipped")
    assert any(r["node"].startswith("fc") for r in result.layers["rows"])


def test_graph_fingerprint_ignores_constants_and_sees_structure(tmp_path: Path) -> None:
    from conftest import conv_net, save_model

    from quantlab.compare.harness import graph_fingerprint

    a = save_model(conv_net(seed=0), tmp_path / "a.onnx")
    b = save_model(conv_net(seed=1), tmp_path / "b.onnx")  # other weights, same graph
    c = save_model(conv_net(seed=0, hw=(16, 16)), tmp_path / "c.onnx")  # other input shape
    assert a.read_bytes() != b.read_bytes()
    assert graph_fingerprint(a) == graph_fingerprint(b) != graph_fingerprint(c)
