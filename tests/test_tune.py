"""`quantlab tune` on the tiny model: the ladder's rungs, tune.json, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantlab.cli import main


def test_ladder_records_every_rung(tiny_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir, config = tiny_run
    # top-1 agreement of 1.01 cannot be met: every rung runs and fails; QAT trains the converted ONNX graph
    config.write_text(config.read_text().replace("top1_agreement = 0.5", "top1_agreement = { min = 1.01 }")
                      + '\n[tune]\nmax_float_layers = 2\nrecipes = [["equalize"], ["smoothquant", "bias-correction"]]\n'
                      + "[qat]\nepochs = 1\ncalib_batches = 1\n")
    assert main(["tune", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "calibrator-sweep" in out and "tolerance NOT met" in out
    tune = json.loads((run_dir / "tune.json").read_text())
    assert [r["rung"] for r in tune["rungs"]] == ["calibrator-sweep", "recipes", "partial", "qat"]
    sweep, recipes, partial, qat = tune["rungs"]
    assert sweep["status"] == "fail" and sweep["value"] is not None and sweep["reference"] == 1.0
    # equalization has no pair to work on in this model: said, and no PTQ run for it
    assert recipes["status"] == "fail" and "equalize: not applicable (no layer pair to equalize" in recipes["detail"]
    assert "smoothquant+bias-correction: " in recipes["detail"] and recipes["engine"].endswith("+smoothquant+bias-correction.ort-cpu")
    assert sorted(p.name for p in (run_dir / "recipes").iterdir()) == ["smoothquant+bias-correction"]
    assert partial["status"] == "fail" and len(partial["float_layers"]) <= 2
    assert qat["status"] == "fail" and "onnx graph" in qat["detail"] and qat["engine"] == "int8:qat.tensorrt"
    assert tune["ok"] is False and tune["final_engine"] is None
    manifest = {a["path"]: a["kind"] for a in json.loads((run_dir / "manifest.json").read_text())["artefacts"]}
    assert manifest["tune.json"] == "tune" and manifest["int8/qat.tensorrt.onnx"] == "model-int8-qdq"
    if partial["float_layers"]:  # a kept step leaves its model in the run, listed and evaluated
        assert manifest["int8/partial.ort-cpu.onnx"] == "model-int8-qdq"
        engines = [e["name"] for e in json.loads((run_dir / "compare.json").read_text())["engines"]]
        assert "int8:partial.ort-cpu" in engines


def test_passing_tolerance_stops_at_the_first_rung(tiny_run: tuple[Path, Path], capsys) -> None:
    run_dir, config = tiny_run
    config.write_text(config.read_text().replace("top1_agreement = 0.5", "top1_agreement = 1.0"))
    assert main(["tune", "--config", str(config)]) == 0
    tune = json.loads((run_dir / "tune.json").read_text())
    assert tune["rungs"][0]["status"] == "pass" and tune["final_engine"].startswith("int8:")
    assert [r["rung"] for r in tune["rungs"][1:]] == ["recipes", "partial", "qat"]
    assert [r["status"] for r in tune["rungs"][1:]] == ["skipped", "skipped", "skipped"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t + '\n[qat]\nsource = "pytorch"\n', "QAT needs the PyTorch model"),
        (lambda t: t.replace("top1_agreement = 0.5", ""), "quantlab tune needs a tolerance"),
        (lambda t: t + '\n[tune]\ntarget = "tpu"\n', "unknown tune.target 'tpu'"),
        (lambda t: t + '\n[tune]\nrecipes = [["gptq"]]\n', "unknown transform in tune.recipes 'gptq'"),
    ],
)
def test_tune_user_errors_write_nothing(tiny_run, edit, message, capsys) -> None:
    run_dir, config = tiny_run
    before = sorted(p.name for p in run_dir.iterdir())
    config.write_text(edit(config.read_text()))
    assert main(["tune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_an_engine_within_tolerance_beats_a_tie_on_the_primary_metric() -> None:
    """EfficientNet's top-1 on 20 labelled images ties at 0.85; top-1 agreement decides the tolerance."""
    from quantlab.compare.harness import EngineResult
    from quantlab.tune import _pick

    def engine(name: str, sqnr: float, ok: bool) -> EngineResult:
        return EngineResult(name, "int8", f"{name}.onnx", "minmax", "ort-cpu", 5.0, {"top1": 0.85, "sqnr_db": sqnr}, {},
                            tolerance_ok=ok)

    louder, within = engine("int8:a", 25.0, False), engine("int8:b", 20.0, True)
    assert _pick([louder, within], "top1") is within
    assert _pick([louder, engine("int8:c", 20.0, False)], "top1") is louder  # then SQNR
