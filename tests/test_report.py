"""The run report: index.html, summary.md and report.json from a small real PTQ run.

The compare.json, latency.json and tune.json below are hand-written test data in the schema that
``quantlab compare`` and ``quantlab tune`` write; the PTQ run itself is real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.report import build_report, fake_quant_quality, load_run, write_report
from quantlab.report.plots import bar_chart_svg, histogram_png
from quantlab.stats import TensorStats

REPORT_FILES = ("index.html", "summary.md", "report.json")


def make_run(base: Path, targets: tuple[str, ...] = ("tensorrt", "ort-cpu")) -> Path:
    """A real PTQ run of the tiny conv net (two calibrators, both targets by default) under ``base``."""
    from conftest import conv_net, save_model, tiny_config_text, write_tiny_calib

    from quantlab.config import load_config, override
    from quantlab.ptq import run_ptq

    base.mkdir(parents=True, exist_ok=True)
    model = save_model(conv_net(), base / "tiny.onnx")
    calib = write_tiny_calib(base / "calib", files=3)
    (base / "quantlab.toml").write_text(tiny_config_text(model, calib, base / "reports"))
    config = override(load_config(base / "quantlab.toml"), "ptq", calibrators=("minmax", "entropy"), targets=targets)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLAB_CACHE", str(base / "cache"))
        return run_ptq(config).run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("report-run"))


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run folder (tests that add files to it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _add_compare_files(run_dir: Path) -> None:
    """Test data: what quantlab compare and quantlab tune would add to the run folder."""
    metrics = lambda top1, agree: {"top1": top1, "top5": 0.95, "top1_agreement": agree, "top5_overlap": 1.0, "kl": 0.01}  # noqa: E731
    engines = [
        {"name": "fp32", "precision": "fp32", "calibrator": None, "target": None, "path": "model_fp32.onnx",
         "size_mb": 0.01, "metrics": metrics(0.85, 1.0), "outputs": {"logits": {"cosine": 1.0, "sqnr_db": 999.0, "max_abs": 0.0, "within_tol": 1.0}},
         "tolerance_ok": None, "failures": []},
        {"name": "fp16", "precision": "fp16", "calibrator": None, "target": None, "path": "model_fp16.onnx",
         "size_mb": 0.005, "metrics": metrics(0.85, 1.0), "outputs": {"logits": {"cosine": 0.99999, "sqnr_db": 60.1, "max_abs": 0.001, "within_tol": 1.0}},
         "tolerance_ok": True, "failures": []},
    ]
    for cal, target, top1 in (("minmax", "tensorrt", 0.8), ("minmax", "ort-cpu", 0.85), ("entropy", "tensorrt", 0.7), ("entropy", "ort-cpu", 0.75)):
        ok = top1 >= 0.8
        engines.append({
            "name": f"int8:{cal}.{target}", "precision": "int8", "calibrator": cal, "target": target,
            "path": f"int8/{cal}.{target}.onnx", "size_mb": 0.004, "metrics": metrics(top1, 0.9),
            "outputs": {"logits": {"cosine": 0.98, "sqnr_db": 15.2, "max_abs": 0.3, "within_tol": 0.9}},
            "tolerance_ok": ok,
            "failures": [] if ok else [{"metric": "top1", "value": top1, "reference": 0.85, "limit": 0.05, "rule": "max_drop"}],
        })
    compare = {
        "model": "tiny", "backend": "onnxruntime", "task": "classification", "samples": 20, "labelled": 20,
        "primary": "top1", "tolerance": {"top1": {"max_drop": 0.05}}, "ok": False, "best": "int8:minmax.ort-cpu",
        "engines": engines,
        "layers": {"engine": "int8:minmax.ort-cpu", "score": "output SQNR dB with only this layer quantized", "rows": [
            {"node": "conv1", "op": "Conv", "output": "c1", "inputs": ["input"], "own_sqnr_db": 35.0, "accumulated_sqnr_db": 35.0, "sensitivity": 41.0},
            {"node": "conv2", "op": "Conv", "output": "c2", "inputs": ["r1"], "own_sqnr_db": 28.5, "accumulated_sqnr_db": 26.0, "sensitivity": 22.5},
            {"node": "add1", "op": "Add", "output": "a1", "inputs": ["c2", "r1"], "own_sqnr_db": 31.0, "accumulated_sqnr_db": 25.1, "sensitivity": None},
            {"node": "fc", "op": "Gemm", "output": "logits", "inputs": ["flat"], "own_sqnr_db": 40.0, "accumulated_sqnr_db": 24.0, "sensitivity": 30.0},
        ]},
    }
    latency = {"engines": {e["name"]: {"1": {"median_ms": 0.5 + i / 10, "p90_ms": 0.7, "throughput": 1900.0},
                                       "8": {"median_ms": 1.5 + i / 10, "p90_ms": 1.9, "throughput": 5300.0}}
                           for i, e in enumerate(engines)},
               "slower_than_fp32": ["int8:minmax.tensorrt"]}
    tune = {"ok": True, "final_engine": "int8:minmax.ort-cpu+float", "rungs": [
        {"rung": "calibrator-sweep", "status": "fail", "metric": "top1", "value": 0.85, "reference": 0.85,
         "engine": "int8:minmax.ort-cpu", "detail": "best calibrator still 0.05 below", "float_layers": []},
        {"rung": "partial", "status": "pass", "metric": "top1", "value": 0.85, "reference": 0.85,
         "engine": "int8:minmax.ort-cpu+float", "detail": "conv2 kept in FP32", "float_layers": ["conv2"]},
        {"rung": "qat", "status": "skipped", "metric": "top1", "value": None, "reference": None,
         "engine": None, "detail": "not needed", "float_layers": []},
    ]}
    for name, data in (("compare.json", compare), ("latency.json", latency), ("tune.json", tune)):
        (run_dir / name).write_text(json.dumps(data, indent=2))


def _bytes(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in REPORT_FILES}


def test_report_is_written_atomically_reproducibly_and_whole(run_copy):
    index = write_report(run_copy, worst=2)
    assert index == run_copy / "index.html"
    first = _bytes(run_copy)
    write_report(run_copy, worst=2)
    assert _bytes(run_copy) == first
    assert not [p.name for p in run_copy.iterdir() if p.name.startswith(".")]  # no temporary files left
    html = first["index.html"].decode()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "src=\"http" not in html  # self-contained
    for anchor in ('id="engines-table"', 'id="calibrators"', 'id="layers"', 'id="tensors"', 'id="scales-tensorrt"',
                   'id="scales-ort-cpu"', 'id="other-tensors"', 'id="run"', "Calibrator that won",
                   "estimated from calibration histograms", 'alt="histogram SQNR per tensor"'):
        assert anchor in html, anchor
    assert html.count("data:image/png;base64,") == len(load_run(run_copy).stats.tensors)  # 2 full, the rest thumbnails
    md = first["summary.md"].decode()
    assert md.startswith("# tiny: INT8 calibration report") and "**Winner:" in md and "## Worst tensors" in md
    data = json.loads(first["report.json"])
    assert data["format"] == "quantlab-report-1" and data["run"]["model"] == "tiny" and len(data["worst"]) == 2


def test_report_without_compare_judges_by_histogram_sqnr(run_copy):
    run = load_run(run_copy)
    report = build_report(run, worst=3)
    assert report["winner"]["basis"] == "histogram-sqnr"
    assert report["winner"]["calibrator"] in ("minmax", "entropy")
    assert report["engines"]["source"] == "summary"
    assert [r["name"] for r in report["engines"]["rows"]][0] == "fp32"
    tensors = report["tensors"]
    assert len(tensors) == len(run.stats.tensors) and report["worst"] == [t["tensor"] for t in tensors[:3]]
    target = report["primary_target"]
    winner = report["winner"]["calibrator"]
    sqnr = [t["quality"][target][winner]["sqnr_db"] for t in tensors]
    assert sqnr == sorted(sqnr)  # worst first
    # minmax clips nothing; every threshold is the one the deployed model got (scales.json)
    deployed = {(r["tensor"], r["calibrator"], r["target"]): r["amax"] for r in run.scales if r["kind"] == "activation"}
    for t in tensors:
        for tg in run.targets:
            assert t["quality"][tg]["minmax"]["clipped"] == 0.0
            for cal in ("minmax", "entropy"):
                assert t["quality"][tg][cal]["amax"] == pytest.approx(deployed[(t["tensor"], cal, tg)], rel=1e-6)
    assert set(report["scales"]) == {"tensorrt", "ort-cpu"}
    assert report["layers"] is None and report["tune"] is None


def test_report_with_compare_latency_and_tune(run_copy):
    _add_compare_files(run_copy)
    write_report(run_copy, worst=1)
    report = json.loads((run_copy / "report.json").read_text())
    assert report["winner"]["basis"] == "compare"
    assert (report["winner"]["calibrator"], report["winner"]["target"]) == ("minmax", "ort-cpu")
    rows = {r["name"]: r for r in report["engines"]["rows"]}
    assert list(rows)[:2] == ["fp32", "fp16"] and rows["int8:minmax.ort-cpu"]["winner"]
    assert rows["int8:entropy.tensorrt"]["ok"] is False and rows["int8:entropy.tensorrt"]["failures"][0]["metric"] == "top1"
    assert rows["fp16"]["values"]["b8_ms"] == pytest.approx(1.6) and rows["int8:minmax.tensorrt"]["slower_than_fp32"]
    assert report["engines"]["columns"][0][0] == "top1"  # the primary metric first
    # FP32's SQNR against itself (the 999 dB cap in this compare.json) is not applicable: shown as "-"
    assert rows["fp32"]["values"]["output_sqnr_db"] is None and rows["fp16"]["values"]["output_sqnr_db"] == 60.1
    # most sensitive first: an SQNR score is worse when lower
    assert [r["node"] for r in report["layers"]["rows"]] == ["conv2", "fc", "conv1", "add1"]
    assert report["layers"]["lower_is_worse"] is True
    assert [r["rung"] for r in report["tune"]["rungs"]] == ["calibrator-sweep", "partial", "qat"]
    html = (run_copy / "index.html").read_text()
    for text in ('id="tune-table"', "OUT OF TOLERANCE", 'id="layers-table"', 'alt="sensitivity per layer"', "slower than FP32",
                 "measured: compare.json"):
        assert text in html, text
    md = (run_copy / "summary.md").read_text()
    assert "OUT OF TOLERANCE" in md and "## Escalation: passed" in md and "## Most sensitive layers" in md
    assert "999" not in md and "999" not in html
    # only the measured latencies may differ between two reports of the same run
    before = _bytes(run_copy)
    latency = json.loads((run_copy / "latency.json").read_text())
    latency["engines"]["fp32"]["1"]["median_ms"] = 9.75
    (run_copy / "latency.json").write_text(json.dumps(latency))
    write_report(run_copy, worst=1)
    after = _bytes(run_copy)
    assert after["index.html"] != before["index.html"] and "9.75" in after["index.html"].decode()
    strip = lambda d: json.dumps({k: v for k, v in json.loads(d).items() if k != "engines"})  # noqa: E731
    assert strip(after["report.json"]) == strip(before["report.json"])


def test_report_says_when_the_entropy_clip_limit_acted(run_copy):
    from quantlab.stats import StatsSet

    # give one tensor no mass near zero: the KL search alone clips all its values into one bin
    stats = StatsSet.load(run_copy / "stats.npz")
    stats.tensors["r1"] = TensorStats.from_array("r1", np.random.default_rng(0).uniform(0.6, 0.9, 50_000))
    stats.save(run_copy / "stats.npz")
    write_report(run_copy)
    report = json.loads((run_copy / "report.json").read_text())
    rows = {r["calibrator"]: r for r in report["calibrators"]["tensorrt"]}
    assert rows["minmax"]["limited"] is None and rows["minmax"]["limited_worst"] is None
    entropy = rows["entropy"]
    moved = load_run(run_copy).limited("entropy", "tensorrt")
    assert entropy["limited"] == len(moved) >= 1 and "r1" in moved and moved["r1"].amax >= 0.89
    assert entropy["limited_worst"]["tensor"] == "r1" and entropy["limited_worst"]["clipped_without_limit"] > 0.99
    note = f"the clip limit (at most 1e-05 of the values clipped) moved {len(moved)} of {entropy['tensors']} thresholds"
    assert note in (run_copy / "summary.md").read_text() and note in (run_copy / "index.html").read_text()


def test_bad_run_folders_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(QuantlabError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantlabError, match="no manifest.json"):
        write_report(tmp_path / "empty")
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantlab ptq" in err[0]
    assert not list((tmp_path / "empty").iterdir())


def test_cli_report(run_copy, capsys):
    assert main(["report", "--run", str(run_copy), "--worst", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("winner: ") and "index.html" in out
    assert all((run_copy / name).is_file() for name in REPORT_FILES)


def test_histogram_sqnr_agrees_with_fake_quantizing_the_data():
    x = np.random.default_rng(3).standard_normal(200_000) * 2.0
    st = TensorStats.from_array("t", x)
    for amax in (float(np.abs(x).max()), 4.0, 2.5):
        scale = amax / 127
        q = np.clip(np.round(x / scale), -128, 127) * scale
        direct = 10 * np.log10((x**2).sum() / ((x - q) ** 2).sum())
        clipped, sqnr = fake_quant_quality(st, -amax, amax, symmetric=True)
        assert sqnr == pytest.approx(direct, abs=0.6)
        assert clipped == pytest.approx(np.mean(np.abs(x) > amax), abs=2e-3)
    # U8 after a ReLU: the asymmetric range [0, amax] gets all 256 levels
    r = np.maximum(x, 0)
    st = TensorStats.from_array("r", r)
    scale = 4.0 / 255
    q = np.clip(np.round(r / scale), 0, 255) * scale
    direct = 10 * np.log10((r**2).sum() / ((r - q) ** 2).sum())
    assert fake_quant_quality(st, 0.0, 4.0, symmetric=False)[1] == pytest.approx(direct, abs=0.6)


def test_plots_are_byte_reproducible(tiny_run):
    run = load_run(tiny_run)
    name = run.worst_tensors(1)[0]
    lines = [(c, run.quality(c, "tensorrt")[name]) for c in run.calibrators]
    st = run.stats.tensors[name]
    assert histogram_png(st, lines, "tensorrt") == histogram_png(st, lines, "tensorrt")
    assert histogram_png(st, lines, "tensorrt", compact=True) == histogram_png(st, lines, "tensorrt", compact=True)
    svg = bar_chart_svg(["a", "b"], [1.0, 2.0], title="t", xlabel="x")
    assert svg == bar_chart_svg(["a", "b"], [1.0, 2.0], title="t", xlabel="x")
    assert b"<dc:date>" not in svg


def _find_browser() -> tuple[str, str] | None:
    for browser in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(browser) and shutil.which("chromedriver"):
            return shutil.which(browser), shutil.which("chromedriver")
    return None


def test_report_renders_in_headless_chromium(run_copy):
    found = _find_browser()
    if found is None:
        pytest.skip("chromium and chromedriver not found on PATH: bash .ci/setup installs them (apt: chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    _add_compare_files(run_copy)
    index = write_report(run_copy, worst=2)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(index.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        assert len(images) >= len(load_run(run_copy).stats.tensors) + 2
        assert [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)] == []
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => [t.id, t.rows.length]);"
        )
        ids = {t[0] for t in tables}
        assert {"engines-table", "scales-tensorrt", "scales-ort-cpu", "layers-table", "tune-table", "other-tensors"} <= ids
        assert all(rows > 1 for _, rows in tables)
        assert "calibrator that won" in driver.find_element("id", "winner").text.lower()
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


def test_escalation_engine_winning_still_orders_the_tensors(run_copy):
    """A partial-quantization or QAT engine has no calibrator of its own; the report still builds."""
    _add_compare_files(run_copy)
    compare = json.loads((run_copy / "compare.json").read_text())
    compare["best"] = "int8:qat.tensorrt"
    (run_copy / "compare.json").write_text(json.dumps(compare))
    run = load_run(run_copy)
    assert run.winner.calibrator == "qat"
    assert run.worst_tensors(2) == run.worst_tensors(2, calibrator=run.calibrators[0])
    assert write_report(run_copy).is_file()
