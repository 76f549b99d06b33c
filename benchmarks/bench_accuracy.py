"""Accuracy: quantlab's targets against the strongest peers for each, one harness.

For each bundled real model (EfficientNet-Lite0, the PP-OCRv6 text detector, the MiniLM sentence
encoder) this

1. runs ``quantlab ptq`` (every calibrator; targets ``tensorrt``, ``ort-cpu`` and ``ort-dynamic``)
   into a temporary run folder;
2. quantizes the same prepared FP32 model with each target's peers, fed with the same calibration
   batches through quantlab's reader, and lists those models in the run's manifest as engines
   ``int8:<peer>.<target>``:

   * ``ort-cpu``: ONNX Runtime's ``quantize_static`` (QDQ, QUInt8 activations, QInt8 per-channel
     weights) with ``CalibrationMethod.MinMax``, ``Entropy`` and ``Percentile``;
   * ``tensorrt``: NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``, int8, ``max``
     and ``entropy``), run on the CPU (``calibration_eps=["cpu"]``) with FP32 kept as the high
     precision (``high_precision_dtype="fp32"``), so that only placement and ranges differ;
   * ``ort-dynamic``: ONNX Runtime's ``quantize_dynamic`` (per-channel QInt8 weights);

3. evaluates every engine with ``quantlab compare`` (same data, same metrics, same latency loop);

then prints one table per model and, per target, whether quantlab's best engine is at least as
accurate as the best peer on the primary metric.  A peer that fails is recorded with its error and
the table still prints.  ModelOpt's ONNX extra pins onnx and onnxruntime-gpu versions that would
replace the project's: install its other dependencies only (``pip install -c .ci/constraints.txt
-e '.[peers]'``); without them its rows are recorded as failed.

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


def _calibration_arrays(config, fp32: Path) -> dict:
    """The whole calibration set as one array per input (what ModelOpt's ``calibration_data`` takes)."""
    import numpy as np

    from quantlab.data import make_reader
    from quantlab.model import input_specs

    batches = list(make_reader(config.data, config.resolve(config.data.calib), input_specs(fp32), resolve=config.resolve))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def peer_quantize(config, run_dir: Path) -> list[str]:
    """ModelOpt's ONNX PTQ (``tensorrt`` peer) and ONNX Runtime's ``quantize_dynamic`` (``ort-dynamic`` peer)."""
    import contextlib
    import io
    import warnings

    from quantlab.artefacts import Artefact, dumps_json
    from quantlab.compare.harness import read_manifest

    fp32 = run_dir / "model_fp32.onnx"
    manifest = read_manifest(run_dir)
    written, failures = [], []
    jobs = [(f"modelopt-{m}", "tensorrt", m) for m in ("max", "entropy")] + [("ort-quantize_dynamic", "ort-dynamic", None)]
    for label, target, method in jobs:
        rel = f"int8/{label}.{target}.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if method is None:
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    quantize_dynamic(str(fp32), str(run_dir / rel), per_channel=True, weight_type=QuantType.QInt8)
                else:
                    from modelopt.onnx.quantization import quantize

                    quantize(onnx_path=str(fp32), quantize_mode="int8", calibration_data=_calibration_arrays(config, fp32),
                             calibration_method=method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                             output_path=str(run_dir / rel))
        except Exception as exc:  # a peer failing on a model is a result, not the end of the run
            failures.append(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(failures[-1], flush=True)
            continue
        manifest["artefacts"].append(Artefact(rel, "model-int8-qdq", label, target).to_dict(run_dir))
        written.append(rel)
    (run_dir / "manifest.json").write_text(dumps_json(manifest))
    return written, failures


def qdq_by_consumer(path: Path) -> dict[str, int]:
    """Quantized activation inputs per consumer op type (``op``), and quantized weights (``op (w)``)."""
    from collections import Counter

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for x in node.input:
            dq = producer.get(x)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            weight = dq.input[0] in inits or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits)
            counts[f"{node.op_type} (w)" if weight else node.op_type] += 1
    return dict(sorted(counts.items()))


def placement_table(run: Path, engines: list[str]) -> str:
    """Markdown table: Q/DQ'd inputs by consumer op type for each of ``engines`` (relative model paths)."""
    counts = {e: qdq_by_consumer(run / e) for e in engines}
    ops = sorted({op for c in counts.values() for op in c})
    head = "| consumer | " + " | ".join(Path(e).stem for e in engines) + " |"
    rows = [head, "|---|" + "---:|" * len(engines)]
    rows += [f"| {op} | " + " | ".join(str(counts[e].get(op, 0)) for e in engines) + " |" for op in ops]
    return "\n".join(rows)


def bench(name: str, config_path: Path, work: Path) -> tuple[str, bool, bool]:
    from quantlab.compare import run_compare
    from quantlab.config import load_config, override
    from quantlab.ptq import run_ptq

    config = load_config(config_path)
    config = override(config, "ptq", targets=("tensorrt", "ort-cpu", "ort-dynamic"), out=str(work), run_name=name,
                      latency_runs=0, report=False)
    config = dataclasses.replace(config, tolerance={})
    t0 = time.perf_counter()
    run = run_ptq(config).run_dir
    t_ql = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_quantize(config, run)
    t_ort = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, failures = peer_quantize(config, run)
    t_peers = time.perf_counter() - t0
    result = run_compare(config, run, layers=False)
    primary = result.primary
    from quantlab.compare.harness import rank_engines

    peer = lambda e: (e.calibrator or "").startswith(("ort-", "modelopt-"))  # noqa: E731
    sign = 1 if primary not in ("kl", "mae", "max_abs") else -1
    def lat(e) -> str:  # batch-1 median; the tensorrt target's models are not timed on the CPU (compare's n/t)
        ms = e.latency.get("1", {}).get("median_ms")
        return "not timed" if e.untimed else "no latency" if ms is None else f"{ms:.2f} ms"

    lines = [f"### {name} ({result.samples} evaluation samples, primary metric {primary})", "", result.table(), "",
             f"quantlab ptq (4 calibrators, 3 targets): {t_ql:.1f} s; ONNX Runtime quantize_static x3: {t_ort:.1f} s; "
             f"ModelOpt x2 + quantize_dynamic: {t_peers:.1f} s", *failures]
    placed = [p for p in ("int8/minmax.tensorrt.onnx", "int8/modelopt-max.tensorrt.onnx", "int8/minmax.ort-cpu.onnx",
                          "int8/ort-minmax.ort-cpu.onnx") if (run / p).is_file()]
    lines += ["", "Q/DQ inputs by consumer op type ((w): constants: weights, INT32 biases):", "", placement_table(run, placed), ""]
    accurate = True
    for target in ("tensorrt", "ort-cpu", "ort-dynamic"):
        ours = [e for e in result.int8 if e.target == target and not peer(e)]
        theirs = [e for e in result.int8 if e.target == target and peer(e)]
        if not ours or not theirs:
            lines.append(f"{target}: no {'peer' if ours else 'quantlab'} engine to compare")
            continue
        best_ours, best_theirs = rank_engines(ours, primary)[0], rank_engines(theirs, primary)[0]
        ok = sign * (best_ours.metrics[primary] - best_theirs.metrics[primary]) >= -1e-9
        accurate = accurate and ok
        lines.append(f"{target}: best quantlab {best_ours.name} {primary} {best_ours.metrics[primary]:.4f} "
                     f"({lat(best_ours)}); best peer {best_theirs.name} {best_theirs.metrics[primary]:.4f} "
                     f"({lat(best_theirs)}): {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), accurate, True


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
