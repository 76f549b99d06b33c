"""Accuracy: quantlab's calibrators against ONNX Runtime's own ``quantize_static``, one harness.

For each bundled real model (EfficientNet-Lite0, the PP-OCRv6 text detector, the MiniLM sentence
encoder) this

1. runs ``quantlab ptq`` (every calibrator, target ``ort-cpu``: U8 activations, S8 per-channel
   weights) into a temporary run folder;
2. quantizes the same prepared FP32 model with ONNX Runtime's ``quantize_static`` (QDQ, QUInt8
   activations, QInt8 per-channel weights, as ``ort-cpu``) with ``CalibrationMethod.MinMax``,
   ``Entropy`` and ``Percentile``, fed with the same calibration batches through quantlab's reader,
   and lists those models in the run's manifest as engines ``int8:ort-<method>.ort-cpu``;
3. evaluates every engine with ``quantlab compare`` (same data, same metrics, same latency loop);

then prints one table per model and two checks: quantlab's best INT8 engine is at least as accurate
as ONNX Runtime's best on the primary metric, and quantlab's best ``ort-cpu`` engine is no slower at
batch 1 than ONNX Runtime's (within 10 %: the engines share one graph layout, so the difference is
noise on a shared machine).

    python benchmarks/bench_accuracy.py                 # all three models
    python benchmarks/bench_accuracy.py --models efficientnet-lite0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "efficientnet-lite0": REPO / "quantlab.toml",
    "ppocr-det": REPO / "quantlab" / "models" / "ppocr-det" / "quantlab.toml",
    "minilm": REPO / "quantlab" / "models" / "minilm" / "quantlab.toml",
}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def ort_quantize(config, run_dir: Path) -> list[str]:
    """ONNX Runtime's own static quantization of the run's FP32 model; returns the relative paths."""
    import warnings

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from quantlab.artefacts import Artefact, dumps_json
    from quantlab.compare.harness import read_manifest
    from quantlab.data import make_reader
    from quantlab.model import input_specs

    fp32 = run_dir / "model_fp32.onnx"
    inputs = input_specs(fp32)

    class Reader(CalibrationDataReader):
        """One sample at a time: ORT's histogram calibrators fail on a short last batch."""

        def __init__(self) -> None:
            batches = make_reader(config.data, config.resolve(config.data.calib), inputs, resolve=config.resolve)
            self.it = ({k: v[i : i + 1] for k, v in feed.items()} for feed in batches
                       for i in range(next(iter(feed.values())).shape[0]))

        def get_next(self):
            return next(self.it, None)

    written = []
    manifest = read_manifest(run_dir)
    for method in ORT_METHODS:
        rel = f"int8/ort-{method.lower()}.ort-cpu.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(fp32), str(run_dir / rel), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                )
        except Exception as exc:  # an ORT calibrator failing on a model is a result, not the end of the run
            print(f"ONNX Runtime {method} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        manifest["artefacts"].append(Artefact(rel, "model-int8-qdq", f"ort-{method.lower()}", "ort-cpu").to_dict(run_dir))
        written.append(rel)
    (run_dir / "manifest.json").write_text(dumps_json(manifest))
    return written


def bench(name: str, config_path: Path, work: Path) -> tuple[str, bool, bool]:
    from quantlab.compare import run_compare
    from quantlab.config import load_config, override
    from quantlab.ptq import run_ptq

    config = load_config(config_path)
    config = override(config, "ptq", targets=("ort-cpu",), out=str(work), run_name=name, latency_runs=0)
    config = dataclasses.replace(config, tolerance={})
    t0 = time.perf_counter()
    run = run_ptq(config).run_dir
    t_ql = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_quantize(config, run)
    t_ort = time.perf_counter() - t0
    result = run_compare(config, run, layers=False)
    primary = result.primary
    ours = [e for e in result.int8 if not (e.calibrator or "").startswith("ort-")]
    theirs = [e for e in result.int8 if (e.calibrator or "").startswith("ort-")]
    from quantlab.compare.harness import rank_engines

    if not theirs:
        return f"### {name}: every ONNX Runtime calibrator failed\n\n{result.table()}", True, True
    best_ours, best_theirs = rank_engines(ours, primary)[0], rank_engines(theirs, primary)[0]
    sign = 1 if primary not in ("kl", "mae", "max_abs") else -1
    accurate = sign * (best_ours.metrics[primary] - best_theirs.metrics[primary]) >= -1e-9
    lat = lambda e: e.latency.get("1", {}).get("median_ms") or float("nan")  # noqa: E731
    fast = lat(best_ours) <= 1.10 * lat(best_theirs)
    lines = [f"### {name} ({result.samples} evaluation samples, primary metric {primary})", "", result.table(), "",
             f"quantlab ptq (4 calibrators): {t_ql:.1f} s; ONNX Runtime quantize_static x3: {t_ort:.1f} s",
             f"best quantlab: {best_ours.name} {primary} {best_ours.metrics[primary]:.4f}, {lat(best_ours):.2f} ms; "
             f"best ONNX Runtime: {best_theirs.name} {primary} {best_theirs.metrics[primary]:.4f}, {lat(best_theirs):.2f} ms",
             f"accuracy at least ORT's best: {'PASS' if accurate else 'FAIL'}; "
             f"ort-cpu latency no slower than ORT's (10 % noise margin): {'PASS' if fast else 'FAIL'}"]
    return "\n".join(lines), accurate, fast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-acc-") as tmp:
        for name in names:
            text, accurate, fast = bench(name, MODELS[name], Path(tmp))
            print(text, "\n", flush=True)
            ok = ok and accurate
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
