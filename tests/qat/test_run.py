"""``quantlab qat`` on a PTQ run folder: exit codes, what it writes, and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli import main

pytest.importorskip("torch")
pytest.importorskip("modelopt")


def _files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))


def _set(config, section: str, text: str) -> None:
    body = config.read_text()
    config.write_text(body.replace(f"[{section}]\n", f"[{section}]\n{text}\n", 1) if f"[{section}]" in body
                      else body + f"\n[{section}]\n{text}\n")


def test_qat_meets_the_tolerance_exit_0(capsys, tiny_run):
    run, config = tiny_run
    _set(config, "qat", "epochs = 3\nlr = 0.001\noptimizer = \"adam\"\ncalib_batches = 1")
    code = main(["qat", "--config", str(config), "--run", str(run), "--calibrator", "minmax", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epoch 1/3" in out and "tolerance met" in out
    assert (run / "int8" / "qat.tensorrt.onnx").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artefacts"]}
    assert listed["int8/qat.tensorrt.onnx"]["calibrator"] == "qat" and "qat.json" in listed
    record = json.loads((run / "qat.json").read_text())
    assert record["ok"] and record["qat"]["source"] == "onnx" and record["qat"]["stop"] == "tolerance"
    assert record["qat"]["epochs"] == 1 and record["start"]["engine"] == "int8:minmax.tensorrt"
    # compare takes the QAT model up as one more engine
    assert main(["compare", "--config", str(config), "--run", str(run), "--latency-runs", "0", "--no-layers"]) in (0, 1)
    engines = [e["name"] for e in json.loads((run / "compare.json").read_text())["engines"]]
    assert "int8:qat.tensorrt" in engines
    # the report draws the per-epoch curve from qat.json
    assert main(["report", "--run", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["qat"]["metrics"] == record["qat"]["metrics"] and report["qat"]["best_epoch"] == 1
    assert report["qat"]["start"] == record["start"]["value"]
    assert 'id="qat-curve"' in (run / "index.html").read_text() and "## QAT:" in (run / "summary.md").read_text()


def test_qat_below_the_tolerance_exit_1(capsys, tiny_run):
    run, config = tiny_run
    _set(config, "tolerance", "sqnr_db = { min = 200 }")
    _set(config, "qat", "epochs = 1\ncalib_batches = 1")
    code = main(["qat", "--config", str(config), "--run", str(run), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "tolerance NOT met" in out
    assert not json.loads((run / "qat.json").read_text())["ok"]


@pytest.mark.parametrize("case", ["cuda", "no-stats", "bad-data", "bad-calibrator", "bad-epochs", "unsupported-op",
                                  "bad-learn-ranges"])
def test_bad_input_exit_2_one_line_nothing_written(capsys, tiny_run, tmp_path, case):
    run, config = tiny_run
    args = ["qat", "--config", str(config), "--run", str(run)]
    if case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
        args += ["--device", "cuda"]
        expected = "sees no CUDA GPU"
    elif case == "no-stats":
        (run / "stats.npz").unlink()
        expected = "has no stats.npz"
    elif case == "bad-data":  # arrays of another shape than the model's input
        folder = tmp_path / "other"
        folder.mkdir()
        np.save(folder / "a.npy", np.zeros((2, 3, 5, 5), np.float32))
        _set(config, "qat", f'data = "{folder}"')
        expected = "a.npy"
    elif case == "unsupported-op":  # the FP32 graph holds an op the ONNX-to-PyTorch converter lacks
        import onnx

        model = onnx.load(str(run / "model_fp32.onnx"))
        next(n for n in model.graph.node if n.op_type == "Relu").op_type = "Celu"
        onnx.save(model, str(run / "model_fp32.onnx"))
        expected = "op(s) Celu not supported"
    elif case == "bad-learn-ranges":
        _set(config, "qat", 'learn_ranges = "weights"')
        expected = "unknown qat.learn_ranges 'weights'"
    elif case == "bad-calibrator":
        args += ["--calibrator", "kl"]
        expected = "unknown calibrator 'kl'"
    else:
        args += ["--epochs", "0"]
        expected = "qat.epochs must be >= 1"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("quantlab: error:") and "\n" not in err and expected in err, err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed


def test_qat_that_loses_to_its_start_says_so(capsys, tiny_run):
    run, config = tiny_run
    _set(config, "qat", "epochs = 1\nlr = 5.0\noptimizer = \"adam\"\ncalib_batches = 1\nlearn_ranges = \"off\"")
    code = main(["qat", "--config", str(config), "--run", str(run), "--calibrator", "minmax", "--device", "cpu"])
    out = capsys.readouterr().out
    record = json.loads((run / "qat.json").read_text())
    assert record["worse_than_start"] and record["final"]["value"] < record["start"]["value"], out
    assert "QAT did not beat its PTQ start: int8:minmax.tensorrt stays the better model of the two" in out
    assert code in (0, 1)
