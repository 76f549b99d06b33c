"""The command line: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import save_model
from quantlab.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("quantlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_ptq_success_prints_the_summary(capsys, tiny_config, tmp_path):
    code, out, _ = run(capsys, "ptq", "--config", str(tiny_config), "--calibrator", "minmax,entropy", "--target", "all")
    assert code == 0
    assert "24 calibration samples" in out and out.count(" pass ") == 2 and re.search(r"^entropy\s+ort-cpu\s", out, re.M)


def test_published_entropy_variants_work_by_name(capsys, tiny_config):
    # from the config file and from --calibrator, into the models, the caches and the report
    tiny_config.write_text(tiny_config.read_text().replace("[ptq]", '[ptq]\ncalibrators = ["entropy-trt", "entropy-modelopt"]'))
    code, out, _ = run(capsys, "ptq", "--config", str(tiny_config), "--target", "tensorrt")
    assert code == 0 and re.search(r"^entropy-trt\s+tensorrt\s+\S+\s+pass", out, re.M)
    run_dir = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    assert (run_dir / "int8" / "entropy-modelopt.tensorrt.onnx").is_file() and (run_dir / "trt" / "entropy-trt.calib.cache").is_file()
    rows = json.loads((run_dir / "report.json").read_text())["calibrators"]["tensorrt"]
    assert {r["calibrator"] for r in rows} == {"entropy-trt", "entropy-modelopt"}
    code, out, _ = run(capsys, "ptq", "--config", str(tiny_config), "--calibrator", "all", "--target", "tensorrt",
                       "--stats", str(run_dir / "stats.npz"))
    assert code == 0 and all(re.search(rf"^{c}\s+tensorrt\s", out, re.M) for c in
                             ("minmax", "percentile", "entropy", "mse", "entropy-trt", "entropy-modelopt"))


def test_no_report_leaves_the_report_to_quantlab_report(capsys, tiny_config, tmp_path):
    code, out, _ = run(capsys, "ptq", "--config", str(tiny_config), "--calibrator", "minmax", "--no-report")
    run_dir = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    assert code == 0 and (run_dir / "summary.json").is_file() and not (run_dir / "index.html").exists()
    assert run(capsys, "report", "--run", str(run_dir))[0] == 0 and (run_dir / "index.html").is_file()


def test_unknown_calibrator_and_target_list_the_valid_ones(capsys, tiny_config):
    assert "choose one of minmax, percentile, entropy, mse, entropy-trt, entropy-modelopt" in one_line_error(capsys, "ptq", "--config", str(tiny_config), "--calibrator", "kl")
    assert "choose one of tensorrt, ort-cpu" in one_line_error(capsys, "ptq", "--config", str(tiny_config), "--target", "tflite")


def test_bad_inputs_exit_2_and_write_nothing(capsys, tiny_config, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "does not exist": ["--calib", str(tmp_path / "missing")],
        "holds no": ["--calib", str(empty)],
        "is not an ONNX model": ["--model", str(text)],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(capsys, "ptq", "--config", str(tiny_config), "--out", str(out), *extra)
    assert not out.exists()


def test_nan_activations_exit_2(capsys, tiny_config, tiny_calib, tmp_path):
    bad = np.full((2, 3, 8, 8), np.inf, np.float32)
    np.savez(tiny_calib / "bad.npz", input=bad)
    assert "holds Inf values" in one_line_error(capsys, "ptq", "--config", str(tiny_config), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o" / "tiny").exists()


def test_broken_config(capsys, tmp_path):
    cfg = tmp_path / "quantlab.toml"
    cfg.write_text("[ptq]\ncalibratorz = ['minmax']\n")
    assert "unknown key(s) calibratorz in [ptq]" in one_line_error(capsys, "ptq", "--config", str(cfg))
    cfg.write_text("[ptq\n")
    assert "is not valid TOML" in one_line_error(capsys, "ptq", "--config", str(cfg))


def test_lint_exit_codes(capsys, tiny_config, tiny_model):
    run(capsys, "ptq", "--config", str(tiny_config))
    reports = tiny_config.parent / "reports" / "tiny" / "int8"
    assert run(capsys, "lint", str(reports / "entropy.tensorrt.onnx"))[0] == 0
    code, out, _ = run(capsys, "lint", str(reports / "entropy.ort-cpu.onnx"))
    assert code == 1 and "int32-bias" in out
    assert "not an ONNX model" in one_line_error(capsys, "lint", str(tiny_config))


def test_lint_reports_an_old_opset_as_a_rule(capsys, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # a per-channel weight DequantizeLinear (axis) at opset 12, which onnx.checker rejects
    w = numpy_helper.from_array(np.ones((2, 3), np.int8), "w")
    scale = numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "s")
    zero = numpy_helper.from_array(np.zeros(2, np.int8), "z")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0),
         helper.make_node("Gemm", ["x", "wf"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, scale, zero])
    path = save_model(graph, tmp_path / "ok.onnx", opset=13)
    model = onnx.load(str(path))
    model.opset_import[0].version = 12
    onnx.save(model, str(path))
    code, out, err = run(capsys, "lint", str(path))
    assert code == 1 and "[opset] the model uses opset 12" in out and not err


def test_console_script_runs_as_a_process(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "quantlab.cli", "lint", str(tiny_model)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no-qdq" in proc.stdout  # an FP32 model has nothing quantized


def test_import_stays_light():
    code = "import sys, quantlab; print(sorted(m for m in ('torch', 'onnxruntime', 'numba', 'matplotlib') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_model_flag_alone_ignores_a_local_config(capsys, tmp_path, tiny_model, tiny_calib, monkeypatch):
    from conftest import ROOT

    (tmp_path / "quantlab.toml").write_text((ROOT / "quantlab.toml").read_text())  # the EfficientNet default
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "ptq", "--model", str(tiny_model), "--calib", str(tiny_calib), "--calibrator", "minmax",
                       "--out", "runs")
    assert code == 0 and (tmp_path / "runs" / "tiny" / "int8" / "minmax.tensorrt.onnx").is_file()


def test_input_shape_flag_fixes_dynamic_dimensions(capsys, tmp_path):
    from conftest import conv_net, save_model, write_tiny_calib

    model = save_model(conv_net(hw=("H", "W")), tmp_path / "dyn.onnx")
    calib = write_tiny_calib(tmp_path / "calib", files=2)
    args = ["ptq", "--model", str(model), "--calib", str(calib), "--calibrator", "minmax", "--out", str(tmp_path / "out"),
            "--no-report"]
    line = one_line_error(capsys, *args)
    assert "dynamic dimension 'H' at axis 2" in line and "--input-shape input=1,3,<H>,<W>" in line
    assert "bad" in one_line_error(capsys, *args, "--input-shape", "input=1,3,bad")
    code, out, _ = run(capsys, *args, "--input-shape", "input=1,3,8,8")
    assert code == 0 and "8 calibration samples" in out


def test_onnx_runtime_errors_name_the_stage_and_the_node(capsys, tmp_path):
    """A model that ONNX Runtime cannot run on the data: one line naming the stage and the node, exit 2."""
    from onnx import TensorProto, helper, numpy_helper

    from conftest import save_model

    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="fixed_reshape"),  # only a batch of 1 fits [3, 4]
        helper.make_node("MatMul", ["r", "w"], ["y"], name="fc"),
    ]
    inits = [numpy_helper.from_array(np.array([3, 4], np.int64), "shape"),
             numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], inits)
    model = save_model(graph, tmp_path / "reshape.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32))
    line = one_line_error(capsys, "ptq", "--model", str(model), "--calib", str(tmp_path / "calib"), "--out",
                          str(tmp_path / "out"), "--no-report")
    assert line.startswith("quantlab: error: statistics: running 'reshape.onnx' in ONNX Runtime on the calibration data failed")
    assert "fixed_reshape" in line and "check that the data matches" in line
    assert not (tmp_path / "out").exists()


def test_transform_flags(capsys, tiny_config, tmp_path):
    out = tmp_path / "out"
    assert "unknown transform 'gptq': choose one of equalize, smoothquant, adaround, bias-correction" in one_line_error(
        capsys, "ptq", "--config", str(tiny_config), "--out", str(out), "--transform", "smoothquant,gptq")
    assert "smoothquant_alpha must be a number in [0, 1]" in one_line_error(
        capsys, "ptq", "--config", str(tiny_config), "--out", str(out), "--transform", "smoothquant", "--smoothquant-alpha", "1.5")
    assert "--smoothquant-alpha must be a number in [0, 1] or auto, got 'high'" in one_line_error(
        capsys, "ptq", "--config", str(tiny_config), "--out", str(out), "--smoothquant-alpha", "high")
    assert "adaround_iterations must be a positive integer" in one_line_error(
        capsys, "ptq", "--config", str(tiny_config), "--out", str(out), "--adaround-iterations", "0")
    assert not out.exists()
    code, printed, _ = run(capsys, "ptq", "--config", str(tiny_config), "--out", str(out), "--calibrator", "minmax",
                           "--transform", "equalize,smoothquant", "--smoothquant-alpha", "0.5", "--no-report")
    assert code == 0 and printed.count("transform equalize") == 1 and "no layer pair to equalize" in printed
    assert "transform smoothquant" in printed


@pytest.mark.parametrize("section, message", [
    ('[ptq]\ntransforms = "smoothquant"', "ptq.transforms must be a list of names"),
    ('[ptq]\ntransforms = ["smoothquant", "smoothquant"]', "names a transform twice"),
    ('[transforms]\nadaround_iterations = "many"', "adaround_iterations must be a positive integer"),
    ('[transforms]\nsmoothquant_grid = [0.5, 2.0]', "smoothquant_grid must be numbers in [0, 1]"),
    ('[transforms]\nalpha = 0.5', "unknown key(s) alpha in [transforms]"),
])
def test_bad_transform_config_is_one_line(capsys, tiny_config, tmp_path, section, message):
    text = tiny_config.read_text()
    if section.startswith("[ptq]"):
        text = text.replace("[ptq]\n", section + "\n")
    else:
        text += "\n" + section + "\n"
    tiny_config.write_text(text)
    assert message in one_line_error(capsys, "ptq", "--config", str(tiny_config))
    assert not (tmp_path / "reports").exists()
