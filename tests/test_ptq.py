"""The PTQ pipeline on a small model: every artefact, determinism, atomicity, statistics reuse."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from quantlab.calibrators import get_calibrator
from quantlab.config import load_config, override
from quantlab.errors import QuantlabError
from quantlab.ptq import config_dict, run_ptq
from quantlab.stats import StatsSet
from quantlab.trtcache import read_calibration_cache


def _files(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_run_writes_every_artefact_and_lists_it(tiny_config):
    result = run_ptq(load_config(tiny_config))
    assert result
    run = result.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artefacts"]}
    assert set(listed) | {"manifest.json"} == set(_files(run))
    kinds = sorted(a["kind"] for a in manifest["artefacts"])
    assert kinds.count("model-int8-qdq") == 8 and kinds.count("tensorrt-calibration-cache") == 4
    assert {"config", "statistics", "model-fp32", "model-fp16", "scale-table", "summary", "timing"} <= set(kinds)
    assert manifest["calibration"]["samples"] == 24
    assert all(e["tensorrt_rules"] == "pass" for e in json.loads((run / "summary.json").read_text())["engines"] if e["target"] == "tensorrt")


def test_cache_matches_the_scale_table(tiny_config):
    run = run_ptq(load_config(tiny_config)).run_dir
    rows = json.loads((run / "scales.json").read_text())
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        cache = read_calibration_cache(run / "trt" / f"{calibrator}.calib.cache")
        amax = {r["tensor"]: r["amax"] for r in rows if r["calibrator"] == calibrator and r["target"] == "tensorrt" and r["kind"] == "activation"}
        assert cache.algorithm == "EntropyCalibration2" and set(cache.scales) == set(amax)
        for tensor, value in amax.items():
            assert cache.scales[tensor] == pytest.approx(value / 127, rel=1e-6)
    deployed = [r for r in rows if r["target"] == "tensorrt" and r["kind"] == "activation" and r["scale"] is not None]
    assert deployed and all(r["scale"] == pytest.approx(r["amax"] / 127, rel=1e-6) and r["zero_point"] == 0 for r in deployed)
    csv_lines = (run / "scales.csv").read_text().splitlines()
    assert csv_lines[0] == "tensor,kind,calibrator,target,dtype,amax,min,max,channel,scale,zero_point"


def test_scale_table_holds_the_deployed_scale_of_a_quantized_graph_output(tmp_path):
    # ort-cpu quantizes a convolution's output, and ONNX Runtime renames a quantized graph output's float
    # tensor "<output>_QuantizeLinear_Input": the table still lists it under the output's name
    from conftest import one_conv_net, save_model, tiny_config_text

    g = np.random.default_rng(3)
    graph = one_conv_net(output="logits", x="input")
    model = save_model(graph, tmp_path / "conv.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "b.npz", input=g.standard_normal((4, 3, 8, 8)).astype(np.float32))
    config = tmp_path / "quantlab.toml"
    config.write_text(tiny_config_text(model, calib, tmp_path / "reports"))
    run = run_ptq(override(load_config(config), "ptq", calibrators=("minmax",), targets=("ort-cpu",))).run_dir
    rows = [r for r in json.loads((run / "scales.json").read_text()) if r["tensor"] == "logits"]
    assert len(rows) == 1 and rows[0]["dtype"] == "uint8"
    assert rows[0]["scale"] == pytest.approx((rows[0]["max"] - rows[0]["min"]) / 255, rel=1e-6)
    assert rows[0]["zero_point"] == round(-rows[0]["min"] / rows[0]["scale"])
    csv_row = next(line for line in (run / "scales.csv").read_text().splitlines() if line.startswith("logits,"))
    assert csv_row.split(",")[-2:] == [repr(rows[0]["scale"]), str(rows[0]["zero_point"])]


def test_same_inputs_same_bytes(tiny_config, tmp_path):
    config = load_config(tiny_config)
    first = _files(run_ptq(config).run_dir)
    second = _files(run_ptq(config).run_dir)
    renamed = _files(run_ptq(override(config, "ptq", run_name="again")).run_dir)
    for files in (first, second, renamed):
        files.pop("timing.json")
        for view in ("index.html", "summary.md", "report.json"):  # they show the date and timings
            files.pop(view)
    assert first.keys() == second.keys() == renamed.keys()
    assert [k for k in first if first[k] != second[k]] == []
    # another run name changes the recorded configuration and nothing else
    assert [k for k in first if first[k] != renamed[k]] == ["config.json", "manifest.json"]


def test_config_json_is_the_effective_configuration(tiny_config):
    config = override(load_config(tiny_config), "ptq", calibrators=("entropy", "minmax"), percentile=99.9)
    run = run_ptq(config).run_dir
    saved = json.loads((run / "config.json").read_text())
    assert saved == config_dict(config) and "root" not in saved
    assert set(saved) == {f.name for f in dataclasses.fields(config)} - {"root"}
    assert saved["ptq"]["calibrators"] == ["entropy", "minmax"] and saved["ptq"]["percentile"] == 99.9
    assert saved["model"]["onnx"] == config.model.onnx and saved["data"]["preprocess"]["mean"] == [0.0, 0.0, 0.0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [a["kind"] for a in manifest["artefacts"] if a["path"] == "config.json"] == ["config"]


def test_one_quantize_static_call_per_target(tiny_config, monkeypatch):
    import quantlab.qdq.targets as targets

    calls = []
    direct = targets.write_qdq_model

    def counted(model_path, ranges, target, out, exclude=()):
        calls.append(target.name)
        direct(model_path, ranges, target, out, exclude)

    monkeypatch.setattr(targets, "write_qdq_model", counted)
    run = run_ptq(load_config(tiny_config)).run_dir
    assert sorted(calls) == ["ort-cpu", "tensorrt"]
    # every model is the one quantize_static writes for its own ranges
    stats = StatsSet.load(run / "stats.npz")
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        for name, target in targets.TARGETS.items():
            ranges = targets.compute_ranges(stats, get_calibrator(calibrator), target)
            direct(run / "model_fp32.onnx", ranges, target, run / "direct.onnx")
            assert (run / "direct.onnx").read_bytes() == (run / "int8" / f"{calibrator}.{name}.onnx").read_bytes()


def test_models_that_cannot_be_rewritten_are_quantized_directly(tiny_config, monkeypatch):
    import quantlab.qdq.targets as targets

    config = load_config(tiny_config)
    rewritten = _files(run_ptq(config).run_dir)
    monkeypatch.setattr(targets.QdqRewrite, "apply", lambda self, ranges: None)
    direct = _files(run_ptq(config).run_dir)
    assert [k for k in rewritten if k.startswith("int8/") and rewritten[k] != direct[k]] == []


def test_stats_reuse_needs_no_data_and_gives_the_same_models(tiny_config, tmp_path):
    config = load_config(tiny_config)
    run = run_ptq(config).run_dir
    no_data = dataclasses.replace(config, data=dataclasses.replace(config.data, calib=None))
    reused = run_ptq(override(no_data, "ptq", run_name="reuse", percentile=99.9), stats=run / "stats.npz")
    assert (reused.run_dir / "int8" / "minmax.ort-cpu.onnx").read_bytes() == (run / "int8" / "minmax.ort-cpu.onnx").read_bytes()
    assert StatsSet.load(reused.run_dir / "stats.npz").samples == 24


def test_failed_run_leaves_nothing_half_written(tiny_config, tiny_calib):
    config = load_config(tiny_config)
    good = run_ptq(config).run_dir
    before = _files(good)
    bad = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.savez(tiny_calib / "zz_bad.npz", input=bad)
    with pytest.raises(QuantlabError, match="NaN"):
        run_ptq(config)
    assert _files(good) == before
    assert [p.name for p in good.parent.iterdir()] == [good.name]


def test_stats_from_another_model_are_refused(tiny_config, tmp_path):
    from conftest import conv_net, save_model

    config = load_config(tiny_config)
    run = run_ptq(config).run_dir
    other = save_model(conv_net(seed=5), tmp_path / "other.onnx")
    with pytest.raises(QuantlabError, match="different model"):
        run_ptq(override(config, "model", onnx=str(other)), stats=run / "stats.npz")


def test_transforms_run_before_statistics_and_are_recorded(tiny_config):
    """The statistics and INT8 models come from the transformed graph; FP32 stays the reference."""
    import onnx

    config = override(load_config(tiny_config), "ptq", transforms=("smoothquant", "equalize"), calibrators=("minmax",))
    result = run_ptq(config)
    run = result.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    kinds = {a["path"]: a["kind"] for a in manifest["artefacts"]}
    assert kinds["model_fp32.onnx"] == "model-fp32" and kinds["model_fp32_transformed.onnx"] == "model-fp32-transformed"
    assert [t["name"] for t in manifest["transforms"]] == ["equalize", "smoothquant"]  # always in pipeline order
    assert manifest["model"]["transformed_sha256"] == StatsSet.load(run / "stats.npz").model_sha256
    from quantlab.model import prepare_model

    assert (run / "model_fp32.onnx").read_bytes() == prepare_model(config.model.onnx).path.read_bytes()
    assert manifest["model"]["sha256"] != manifest["model"]["transformed_sha256"]
    summary = json.loads((run / "summary.json").read_text())
    smooth = summary["transforms"][1]
    assert smooth["applied"] and smooth["keep_float"] == summary["kept_float"]["added_by_transforms"]
    assert not summary["transforms"][0]["applied"] and summary["transforms"][0]["detail"].startswith("no layer pair")
    transformed = onnx.load(str(run / "model_fp32_transformed.onnx"))
    mul = smooth["keep_float"][0]
    assert mul in {n.name for n in transformed.graph.node}
    int8 = onnx.load(str(run / "int8" / "minmax.ort-cpu.onnx"))
    assert mul in {n.name for n in int8.graph.node}  # the scaling Mul stays float: no Q/DQ reads its constant
    printed = str(result)
    assert printed.count("transform smoothquant") == 1 and "untransformed reference" in printed
    assert all(e.cosine > 0.999 for e in result.engines)


def test_transformed_runs_are_deterministic_and_reuse_the_cache(tiny_config):
    config = override(load_config(tiny_config), "ptq", transforms=("smoothquant", "bias-correction"), calibrators=("minmax",))
    first = run_ptq(config)
    files = _files(first.run_dir)
    second = run_ptq(config)
    assert all(t.cached for t in second.transforms)
    again = _files(second.run_dir)
    for f in (files, again):
        f.pop("timing.json")
        for view in ("index.html", "summary.md", "report.json"):
            f.pop(view)
    assert files == again


def test_transforms_that_need_data_refuse_stats_without_data(tiny_config):
    config = load_config(tiny_config)
    run = run_ptq(config).run_dir
    no_data = dataclasses.replace(config, data=dataclasses.replace(config.data, calib=None))
    with pytest.raises(QuantlabError, match="no calibration data given"):
        run_ptq(override(no_data, "ptq", transforms=("smoothquant",)), stats=run / "stats.npz")
    with pytest.raises(QuantlabError, match=r"different model \(or with other \[ptq\] transforms\)"):
        run_ptq(override(config, "ptq", transforms=("bias-correction",), run_name="x"), stats=run / "stats.npz")


def test_the_transform_cache_key_follows_code_data_and_settings(tiny_model):
    from quantlab.config import TransformConfig
    from quantlab.transforms import _cache_key

    data = [{"input": np.ones((2, 3, 8, 8), np.float32)}]
    key = _cache_key("abc", ["smoothquant"], data, TransformConfig(), [])
    assert key == _cache_key("abc", ["smoothquant"], data, TransformConfig(), [])
    assert key != _cache_key("abc", ["smoothquant"], data, TransformConfig(smoothquant_alpha=0.5), [])
    assert key != _cache_key("abc", ["smoothquant"], [{"input": np.zeros((2, 3, 8, 8), np.float32)}], TransformConfig(), [])
    assert key != _cache_key("abd", ["smoothquant"], data, TransformConfig(), [])
    assert key != _cache_key("abc", ["smoothquant"], data, TransformConfig(), ["fc"])


def test_stages_one_at_a_time(tiny_config, tmp_path):
    """The stages run_ptq calls, each on its own: prepare, check, statistics, reference, kept-float plan,
    one Q/DQ model, its check."""
    import onnx

    from quantlab.collect import ort_session
    from quantlab.ptq import (
        RunFiles, _check_engine, check_quantizable, kept_float_nodes, prepare, run_reference, statistics, write_qdq,
    )
    from quantlab.qdq.targets import TARGETS, compute_ranges

    config = override(load_config(tiny_config), "ptq", exclude=("conv2",))
    source, prepared = prepare(config)
    assert source == config.resolve(config.model.onnx) and prepared.path.is_file()
    fp32 = check_quantizable(config, prepared)
    assert [n.name for n in fp32.graph.node] == [n.name for n in onnx.load(str(prepared.path)).graph.node]
    with pytest.raises(QuantlabError, match=r"ptq.exclude names \['nope'\]"):
        check_quantizable(override(config, "ptq", exclude=("nope",)), prepared)
    stats = statistics(config, prepared, source, None)
    assert stats.samples == 24 and stats.model_sha256 == prepared.sha256
    assert statistics(config, prepared, source, stats) is stats
    reference = run_reference(config, prepared, source)
    feed = reference.feed["input"]
    assert feed.shape == (5, 3, 8, 8) and reference.latency_ms is None  # latency_runs = 0
    assert np.array_equal(reference.outputs, ort_session(str(prepared.path), level="all").run(None, reference.feed)[0])
    kept = kept_float_nodes(config, fp32, stats, [])
    assert kept == {"nodes": ["conv2"], "fill_value_tensors": [], "excluded_by_config": ["conv2"]}
    ranges = compute_ranges(stats, get_calibrator("minmax"), TARGETS["tensorrt"])
    rewrites, failed = {}, {}
    run = RunFiles(tmp_path)
    qmodel, data = write_qdq(tmp_path / "m.onnx", prepared, fp32, ranges, "tensorrt", kept["nodes"], rewrites, failed, plan=True)
    assert (tmp_path / "m.onnx").read_bytes() == data and failed == {} and "tensorrt" in rewrites
    conv2 = next(n for n in qmodel.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # kept in float: its weight is not quantized
    engine = _check_engine("minmax", "tensorrt", "m.onnx", run.folder, data, qmodel, reference.outputs, reference.feed,
                           config, reference.batch)
    ops = [n.op_type for n in qmodel.graph.node]
    assert engine.ok and engine.tensorrt_rules == "pass" and engine.cosine > 0.99
    assert (engine.quantize_nodes, engine.dequantize_nodes) == (ops.count("QuantizeLinear"), ops.count("DequantizeLinear"))
