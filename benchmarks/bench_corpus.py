"""Corpus: does each real model a user might bring come out quantized, and valid?

For every model of :mod:`quantlab.corpus` (the ONNX models rapidocr, rapidocr-onnxruntime and
ddddocr ship, and exports of the bundled PyTorch models at several opsets, batch sizes and with
external data) this

1. writes real calibration samples (``--samples``, default 16) as ``.npz`` arrays;
2. runs quantlab (``run_ptq``: every calibrator, targets ``tensorrt`` and ``ort-cpu``) with the
   corpus entry's ``[model.input_shapes]``;
3. runs ONNX Runtime's ``quantize_static`` as its documentation recommends (``quant_pre_process``
   first, falling back to the model as it is when that fails; QDQ, QUInt8 activations, QInt8
   per-channel weights, MinMax) on the same model file and the same arrays;
4. checks every INT8 model it got: ``onnx.checker``, loads and runs in ONNX Runtime on every
   calibration batch, ``quantlab lint`` for the ``tensorrt`` models; and measures the cosine of its
   first output to the FP32 model's over all calibration samples.

It prints one row per model and a total: quantized (every target gave a model with Q/DQ nodes),
valid (every such model passed the checks), cosine (quantlab: ``minmax``/``ort-cpu``, the ONNX
Runtime configuration's equal, and the best of its 8 engines), and what happened instead.

    python benchmarks/bench_corpus.py                       # the whole corpus (about 10 minutes on 2 cores)
    python benchmarks/bench_corpus.py --models ppocr-cls,ddddocr-det --samples 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantlab.corpus import CorpusModel, config_text, corpus, scratch, write_calibration  # noqa: E402
from quantlab.errors import QuantlabError, describe  # noqa: E402


@dataclass
class ToolResult:
    """One tool on one model."""

    quantized: bool = False
    valid: bool = False
    models: int = 0  # INT8 models written
    cosine_minmax: float | None = None  # ort-cpu style MinMax model
    cosine_best: float | None = None
    best: str = ""
    outcome: str = ""  # "ok", the one-line reason, or "traceback: ..."
    traceback: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n - size + 1, size)]


def run_outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output over every batch, concatenated (raises what ONNX Runtime raises)."""
    from quantlab.collect import ort_session

    session = ort_session(str(path), level="all")
    names = {i.name: i for i in session.get_inputs()}
    outs = []
    for feed in feeds:
        fed = {k: v.astype(np.float32) if names[k].type == "tensor(float)" else v for k, v in feed.items() if k in names}
        outs.append(np.asarray(session.run(None, fed)[0], dtype=np.float64))
    return np.concatenate([o.reshape(o.shape[0], -1) if o.ndim else o.reshape(1, 1) for o in outs])


def check_model(path: Path, feeds: list[dict[str, np.ndarray]], reference: np.ndarray, lint: bool) -> tuple[float, list[str]]:
    """Cosine to FP32 and the problems found: onnx.checker, ONNX Runtime, quantlab lint."""
    import onnx

    from quantlab.compare.metrics import cosine
    from quantlab.qdq.lint import lint_tensorrt

    problems = []
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        problems.append(f"onnx.checker: {describe(exc)}")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    if "QuantizeLinear" not in ops and "DequantizeLinear" not in ops:
        problems.append("no Q/DQ nodes")
    try:
        out = run_outputs(path, feeds)
    except Exception as exc:
        return float("nan"), [*problems, f"ONNX Runtime: {describe(exc)}"]
    if lint:
        report = lint_tensorrt(model)
        if not report:
            problems.append("lint: " + ", ".join(sorted({i.rule for i in report.issues})))
    return cosine(reference, out), problems


def run_quantlab(model: CorpusModel, path: Path, calib: Path, work: Path, feeds, reference) -> ToolResult:
    from quantlab.config import load_config
    from quantlab.ptq import run_ptq

    res = ToolResult()
    config = work / "quantlab.toml"
    config.write_text(config_text(model, path, calib, work / "runs"))
    t0 = time.perf_counter()
    try:
        result = run_ptq(load_config(config))
    except QuantlabError as exc:
        res.seconds = time.perf_counter() - t0
        res.outcome = str(exc)
        return res
    except Exception as exc:  # a bug: the corpus must show none
        res.seconds = time.perf_counter() - t0
        res.traceback = True
        res.outcome = f"traceback: {describe(exc)}"
        traceback.print_exc()
        return res
    res.seconds = time.perf_counter() - t0
    cosines = {}
    for e in result.engines:
        cos, problems = check_model(result.run_dir / e.path, feeds, reference, lint=e.target == "tensorrt")
        cosines[f"{e.calibrator}.{e.target}"] = cos
        res.problems += [f"{e.calibrator}.{e.target}: {p}" for p in problems]
        res.models += 1
    res.quantized = res.models == 8
    res.valid = res.quantized and not res.problems
    res.cosine_minmax = cosines.get("minmax.ort-cpu")
    res.best = max(cosines, key=lambda k: cosines[k])
    res.cosine_best = cosines[res.best]
    notes = [*result.notes, *(f"{t}: {', '.join(f)} kept in float" for t, f in result.kept_float.get("quantizer_failed", {}).items())]
    res.outcome = "ok" + (f" ({'; '.join(notes)})" if notes else "")
    return res


def run_ort(path: Path, arrays: dict[str, np.ndarray], size: int, work: Path, feeds, reference) -> ToolResult:
    """ONNX Runtime's documented flow: ``quant_pre_process``, then ``quantize_static`` (MinMax, QDQ, per channel)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches(arrays, size))

        def get_next(self):
            return next(self.items, None)

    res = ToolResult()
    pre, out = work / "ort-pre.onnx", work / "ort-int8.onnx"
    t0 = time.perf_counter()
    source = path
    try:
        # its symbolic shape inference writes scratch files into the working directory
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), contextlib.chdir(work):
            quant_pre_process(str(path), str(pre))
        source = pre
    except Exception:
        source = path  # the documented flow allows skipping pre-processing
    try:
        external = any(p.suffix != ".onnx" for p in path.parent.iterdir()) and source == path
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), contextlib.chdir(work):
            quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            use_external_data_format=external)
    except Exception as exc:
        res.seconds = time.perf_counter() - t0
        res.traceback = True
        res.outcome = f"traceback: {describe(exc)}"
        return res
    res.seconds = time.perf_counter() - t0
    res.models = 1
    cos, problems = check_model(out, feeds, reference, lint=False)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    res.quantized = "QuantizeLinear" in ops or "DequantizeLinear" in ops
    res.problems = problems
    res.valid = res.quantized and not problems
    res.cosine_minmax = res.cosine_best = cos
    res.best = "MinMax"
    res.outcome = "ok" if res.valid else "; ".join(problems)
    return res


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per model (default 16)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    chosen = corpus()
    if args.models:
        wanted = args.models.split(",")
        chosen = [m for m in chosen if m.name in wanted]
    rows = []
    with scratch() as tmp:
        root = Path(tmp)
        for model in chosen:
            work = root / model.name
            work.mkdir()
            path = model.fetch(root / "exports")
            calib = write_calibration(model, work / "calib", args.samples)
            arrays = model.samples(args.samples)
            fixed = _fixed_batch(path)
            size = fixed or 4
            feeds = batches(arrays, size)
            reference = run_outputs(path, feeds)
            ql = run_quantlab(model, path, calib, work, feeds, reference)
            ort = run_ort(path, arrays, size, work, feeds, reference)
            rows.append((model, ql, ort))
            print(f"{model.name}: quantlab {ql.outcome} [{ql.seconds:.1f} s]; ORT {ort.outcome} [{ort.seconds:.1f} s]",
                  file=sys.stderr)
            for p in ql.problems + ort.problems:
                print(f"  problem: {p}", file=sys.stderr)
    print(table(rows))
    return 0


def _fixed_batch(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        if i.name not in inits:
            d = i.type.tensor_type.shape.dim
            if d and d[0].HasField("dim_value") and d[0].dim_value > 0:
                return d[0].dim_value
    return None


def table(rows: list[tuple[CorpusModel, ToolResult, ToolResult]]) -> str:
    head = ("| model | from | quantlab: quantized / valid | cosine minmax ort-cpu / best | s | "
            "ORT quantize_static: quantized / valid | cosine | s | quantlab says |")
    lines = [head, "|---|---|---|---|---:|---|---:|---:|---|"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for m, ql, ort in rows:
        said = ql.outcome if ql.outcome.startswith(("ok", "traceback")) else ql.outcome
        lines.append(
            f"| {m.name} | {m.origin} | {yes(ql.quantized)} / {yes(ql.valid)} | {_fmt(ql.cosine_minmax)} / {_fmt(ql.cosine_best)} "
            f"| {ql.seconds:.1f} | {yes(ort.quantized)} / {yes(ort.valid)} | {_fmt(ort.cosine_best)} | {ort.seconds:.1f} "
            f"| {said if said != 'ok' else ''} |"
        )
    n = len(rows)
    weighted = [r for r in rows if r[0].expect == "quantized"]
    lines.append(
        f"| **total** ({n} models, {len(weighted)} with weighted layers) | | "
        f"{sum(r[1].quantized for r in rows)} / {sum(r[1].valid for r in rows)} | | "
        f"{sum(r[1].seconds for r in rows):.0f} | {sum(r[2].quantized for r in rows)} / {sum(r[2].valid for r in rows)} | | "
        f"{sum(r[2].seconds for r in rows):.0f} | tracebacks: quantlab {sum(r[1].traceback for r in rows)}, "
        f"ORT {sum(r[2].traceback for r in rows)} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
