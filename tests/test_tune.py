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
                      + '\n[tune]\nmax_float_layers = 2\nmax_float_share = 1.0\nrecipes = [["equalize"], ["smoothquant", "bias-correction"]]\n'
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
    for rung in tune["rungs"]:  # each rung's engine: batch-1 latency (engines for ONNX Runtime), size; seconds
        timed = not rung["engine"].endswith(".tensorrt")  # a TensorRT model's CPU latency measures nothing
        assert (rung["latency_ms"] > 0 if timed else rung["latency_ms"] is None), rung["rung"]
        assert rung["size_mb"] > 0 and rung["seconds"] > 0, rung["rung"]
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
        (lambda t: t + '\n[tune]\nmax_float_share = 5\n', "tune.max_float_share must be a fraction in [0, 1]"),
        (lambda t: t + '\n[tune]\nmax_latency_increase = -0.1\n', "tune.max_latency_increase must be a fraction >= 0"),
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


def test_latency_cap_is_relative_to_the_fully_quantized_engine() -> None:
    from quantlab.tune import latency_exceeded

    assert latency_exceeded("conv", 31.9, 35.0, 0.10) == ""
    why = latency_exceeded("conv", 31.9, 46.0, 0.10)
    assert why.startswith("stopped before conv: batch-1 latency 31.90 -> 46.00 ms (+44%")
    assert "tune.max_latency_increase = 0.1" in why
    assert latency_exceeded("conv", 10.0, 10.0, 0.0) == "" and latency_exceeded("conv", 10.0, 10.01, 0.0)


def test_partial_rung_within_its_caps(tiny_run: tuple[Path, Path]) -> None:
    """ort-cpu: every kept step was timed in turn within max_latency_increase, or the rung says where it stopped;
    max_float_layers bounds the layers; every rung records latency, size and seconds in tune.json."""
    run_dir, config = tiny_run
    config.write_text(config.read_text().replace("top1_agreement = 0.5", "top1_agreement = { min = 1.01 }")
                      + '\n[tune]\nrecipes = [["bias-correction"], ["equalize", "bias-correction"]]\nqat = "off"\n'
                      + 'max_float_layers = 2\nmax_float_share = 0.0\nmax_latency_increase = 0.0\n')
    assert main(["tune", "--config", str(config)]) == 1
    tune = json.loads((run_dir / "tune.json").read_text())
    sweep, recipes, partial, qat = tune["rungs"]
    assert qat["status"] == "skipped"
    # equalization does not apply here: its recipe with bias correction is the bias-correction model, not quantized twice
    assert "equalize+bias-correction: the model of bias-correction (equalize does not apply)" in recipes["detail"]
    assert sorted(p.name for p in (run_dir / "recipes").iterdir()) == ["bias-correction"]
    for rung in (sweep, recipes, partial):
        assert rung["latency_ms"] > 0 and rung["size_mb"] > 0 and rung["seconds"] >= 0
    assert len(partial["float_layers"]) <= 2  # max_float_layers; the share is tensorrt's cap, not ort-cpu's
    detail = partial["detail"]
    stopped = "would exceed tune.max_latency_increase = 0" in detail
    if partial["float_layers"]:
        # "(base -> candidate ms timed in turn)": the last kept step was no slower than the INT8 engine
        timed = detail.split(" ms timed in turn)")[0].rsplit("(", 1)[1]
        base, candidate = (float(x) for x in timed.split(" -> "))
        assert candidate <= base
    else:
        assert stopped or "stopped at the cap" in detail or "improved" in detail
    report = (run_dir / "summary.md").read_text()
    assert "batch-1 ms" in report


def test_partial_rung_for_tensorrt_keeps_fp16(tiny_run: tuple[Path, Path]) -> None:
    import onnx

    run_dir, config = tiny_run
    config.write_text(config.read_text().replace("top1_agreement = 0.5", "top1_agreement = { min = 1.01 }")
                      + '\n[tune]\ntarget = "tensorrt"\nrecipes = []\nqat = "off"\nmax_float_share = 0.25\n')
    assert main(["tune", "--config", str(config)]) == 1
    partial = json.loads((run_dir / "tune.json").read_text())["rungs"][2]
    assert len(partial["float_layers"]) <= 1  # a quarter of 4 quantized layers
    if partial["float_layers"]:
        assert "kept in FP16" in partial["detail"]
        model = onnx.load(str(run_dir / "int8" / "partial.tensorrt.onnx"))
        (node,) = [n for n in model.graph.node if n.name == partial["float_layers"][0]]
        assert all(x.endswith("::fp16") for x in node.input if x)
    else:
        assert "in FP16 improved" in partial["detail"]
