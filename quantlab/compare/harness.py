"""``quantlab compare``: evaluate every engine of a PTQ run on the same data with the same metrics.

``run_compare(config, run_dir)`` reads the run's ``manifest.json`` for its engines (FP32, FP16 and
each INT8 Q/DQ model), loads the evaluation set the ``[compare]`` section describes once into
memory, runs every engine over it, and computes

* the task metrics against FP32 and the labels (:mod:`quantlab.compare.metrics`),
* per output: cosine, SQNR, max abs error, fraction within atol/rtol,
* the ``[tolerance]`` rules for every INT8 engine (:mod:`quantlab.compare.tolerance`),
* latency: median and p90 after ``warmup`` runs, at each of ``latency_batches``, throughput in
  samples per second, and the model file's size; an INT8 engine slower than FP32 at batch 1 is
  flagged.  Engines built for another runtime are evaluated but not timed: the ``tensorrt`` target's
  S8 Q/DQ models (Q/DQ on layer inputs only) are not the form ONNX Runtime's CPU kernels are fast
  on, so their CPU latency says nothing about TensorRT's (time them with ``--backend tensorrt``).  Timing stops once the median is stable, at most ``latency_runs`` runs and
  ``BUDGET_S`` timed seconds per measurement (:mod:`quantlab.latency`).  Above the smallest batch size, a graph is timed once: INT8 models that
  differ from one already timed only in their constants (other calibrators' scales on the same
  target) run the same kernels on the same shapes, and their row points at the timed one,
* per-layer analysis of the best INT8 engine (:mod:`quantlab.compare.layers`): each quantized
  layer's own SQNR and the SQNR accumulated up to it, and its sensitivity (the primary metric with
  only that layer quantized), worst first.

Results go into the run folder: ``compare.json`` (deterministic: same run and data give the same
bytes), ``latency.json`` (measured times), both listed in ``manifest.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantlab.artefacts import dumps_json, write_text
from quantlab.compare import metrics as M
from quantlab.compare.runners import Runner, make_runner
from quantlab.compare.tolerance import Failure, check_known, evaluate, parse_tolerance
from quantlab.config import Config
from quantlab.data import ImageInfo, sample_infos
from quantlab.errors import QuantlabError, check
from quantlab.latency import BUDGET_S, time_runs
from quantlab.model import input_specs

if TYPE_CHECKING:
    from quantlab.compare.detection import Detections, NmsDetector

Feed = dict[str, np.ndarray]
ProgressFactory = Callable[[int, str], Any]


# ---------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a run: a model file and what it is."""

    name: str
    precision: str
    path: str
    calibrator: str | None = None
    target: str | None = None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    manifest = run_dir / "manifest.json"
    check(run_dir.is_dir(), f"run folder '{run_dir}' does not exist: run quantlab ptq first, or pass --run to an existing run")
    check(
        manifest.is_file(),
        f"run folder '{run_dir}' has no manifest.json: pass a folder written by quantlab ptq (or run it again)",
    )
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"'{manifest}' is not valid JSON ({exc}): run quantlab ptq again") from None


def engines_of_run(run_dir: Path, manifest: dict[str, Any] | None = None) -> list[EngineSpec]:
    """FP32, FP16 and every INT8 model the manifest lists, in that order."""
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    engines: list[EngineSpec] = []
    int8: list[EngineSpec] = []
    for a in manifest.get("artefacts", []):
        kind = a.get("kind")
        if kind == "model-fp32":
            engines.insert(0, EngineSpec("fp32", "fp32", a["path"]))
        elif kind == "model-fp16":
            engines.append(EngineSpec("fp16", "fp16", a["path"]))
        elif kind in ("model-int8-qdq", "model-int8-dynamic"):
            name = f"int8:{a['calibrator']}.{a['target']}"
            int8.append(EngineSpec(name, "int8", a["path"], a["calibrator"], a["target"]))
    check(
        bool(engines) and engines[0].precision == "fp32",
        f"the manifest of '{run_dir}' lists no FP32 model: run quantlab ptq again",
    )
    for e in [*engines, *int8]:
        check((run_dir / e.path).is_file(), f"'{e.path}' listed in the manifest of '{run_dir}' is missing: run quantlab ptq again")
    return engines + int8


# ------------------------------------------------------------------------------------- eval data


@dataclass
class EvalSet:
    """The evaluation samples in memory: batches, and a label per sample (-1: none)."""

    batches: list[Feed]
    labels: np.ndarray | None
    samples: int
    labelled: int
    sources: list[str] = field(default_factory=list)
    infos: list[ImageInfo] | None = None  # per sample (image data): the pre-processing detection decoders undo

    def subset(self, n: int) -> list[Feed]:
        """The first ``n`` samples, batched as stored."""
        out: list[Feed] = []
        seen = 0
        for feed in self.batches:
            if seen >= n:
                break
            k = next(iter(feed.values())).shape[0]
            take = min(k, n - seen)
            out.append({key: v[:take] for key, v in feed.items()} if take < k else feed)
            seen += take
        return out


def _label_of(path: Path) -> int:
    tail = path.stem.rsplit("_", 1)[-1]
    check(
        tail.isdigit(),
        f"cannot read a class label from '{path.name}': with compare.labels = \"filename\" each file name must end "
        "in _<class number> (e.g. cat_281.jpg)",
    )
    return int(tail)


def eval_reader(config: Config, folder: Path, inputs: list[Any], *, glob: str = "*", crops: int = 1,
                resize: int | None = None) -> tuple[Any, list[Path]]:
    """A reader over an evaluation folder (the ``[data]`` preprocessing, compare's batch size) and its files."""
    import dataclasses

    from quantlab.data import list_data_files, make_reader

    data = dataclasses.replace(config.data, batch_size=config.compare.batch_size, max_samples=0)
    _, files = list_data_files(folder, data.kind, glob)
    reader = make_reader(data, folder, inputs, glob=glob, crops=crops, resize=resize, resolve=config.resolve)
    return reader, files


def load_eval_set(config: Config, inputs: list[Any], eval_dir: str | Path | None = None) -> EvalSet:
    """Read ``[compare] eval`` (or ``eval_dir``) and the optional ``extra`` folder into memory."""
    c = config.compare
    folder = eval_dir if eval_dir is not None else c.eval
    check(folder is not None, "no evaluation data given: pass --eval FOLDER or set [compare] eval in the config")
    path = Path(folder) if eval_dir is not None else config.resolve(folder)
    batches: list[Feed] = []
    labels: list[int] = []
    sources = [str(folder)]
    reader, files = eval_reader(config, path, inputs, glob=c.glob)
    infos = sample_infos(reader)
    for feed in reader:
        batches.append(feed)
    n_main = sum(next(iter(b.values())).shape[0] for b in batches)
    if c.labels == "filename":
        check(
            len(files) == n_main,
            f"compare.labels = \"filename\" needs one sample per file, but '{path}' holds {n_main} samples in "
            f"{len(files)} files: use image or .npy files of one sample each",
        )
        labels = [_label_of(f) for f in files]
    else:
        labels = [-1] * n_main
    if c.extra:
        sources.append(str(c.extra))
        extra, _ = eval_reader(config, config.resolve(c.extra), inputs, glob=c.extra_glob,
                               crops=c.extra_crops, resize=c.extra_resize)
        extra_infos = sample_infos(extra)
        infos = infos + extra_infos if infos is not None and extra_infos is not None else None
        for feed in extra:
            batches.append(feed)
            labels.extend([-1] * next(iter(feed.values())).shape[0])
    if c.max_samples and len(labels) > c.max_samples:
        kept = EvalSet(batches, None, len(labels), 0).subset(c.max_samples)
        batches, labels = kept, labels[: c.max_samples]
    lab = np.asarray(labels, dtype=np.int64)
    labelled = int(np.sum(lab >= 0))
    check(len(lab) > 0, f"the evaluation folder '{path}' gave no samples: add files that match compare.glob")
    infos = infos[: len(lab)] if infos is not None and len(infos) >= len(lab) else None
    return EvalSet(batches, lab if labelled else None, len(lab), labelled, sources, infos)


# ------------------------------------------------------------------------------------ evaluation


def run_all(runner: Runner, batches: list[Feed]) -> dict[str, np.ndarray]:
    """Every output over all batches, concatenated on the batch axis; NaN/Inf is an error."""
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    for feed in batches:
        for name, y in zip(runner.output_names, runner.run(feed)):
            chunks[name].append(np.asarray(y))
    out = {n: np.concatenate(v, axis=0) for n, v in chunks.items()}
    for n, y in out.items():
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise QuantlabError(
                f"engine {runner.name} produced NaN/Inf in output '{n}': check the model and the evaluation data"
            )
    return out


def _stable(x: float | None, digits: int = 6) -> float | None:
    if x is None:
        return None
    if math.isnan(x):
        return None
    return round(float(x), digits)


def graph_fingerprint(path: str | Path) -> str:
    """SHA-256 of a model's structure: nodes, attributes, and initializer names, types and shapes, but
    not initializer values.  Two models with the same fingerprint run the same kernels on the same
    shapes (e.g. one target's INT8 models from two calibrators), so their latency is one measurement."""
    import hashlib

    import onnx

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        init.ClearField("raw_data")
        for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(name)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def latency_sizes(batch_sizes: tuple[int, ...], fixed_batch: int | None) -> tuple[int, ...]:
    """The batch sizes latency is measured at: a model with a fixed batch dimension takes only that size."""
    return (fixed_batch,) if fixed_batch is not None else tuple(batch_sizes)


def pooled(batches: list[Feed]) -> Feed:
    """The evaluation batches joined along the batch axis, one array per input."""
    return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}


def feed_of_size(pool: Feed, size: int) -> Feed:
    """A feed of ``size`` samples from ``pool`` (its first ones, cycling when it holds fewer)."""
    idx = np.arange(size) % next(iter(pool.values())).shape[0]
    return {k: np.ascontiguousarray(v[idx]) for k, v in pool.items()}


def latency_of(runner: Runner, batches: list[Feed], batch_sizes: tuple[int, ...], runs: int, warmup: int,
               fixed_batch: int | None) -> dict[str, dict[str, float]]:
    """Median and p90 in ms and throughput in samples/s per batch size.

    At most ``runs`` timed runs per size, fewer once the median is stable (:func:`time_runs`).  A
    model with a fixed batch dimension takes only that size: it is measured at that one size.
    """
    if runs <= 0:
        return {}
    pool = pooled(batches)
    result: dict[str, dict[str, float]] = {}
    for b in latency_sizes(batch_sizes, fixed_batch):
        feed = feed_of_size(pool, b)
        ms = time_runs(lambda: runner.run(feed), warmup=warmup, max_runs=runs, budget_s=BUDGET_S) * 1000.0
        median = float(np.median(ms))
        result[str(b)] = {
            "median_ms": round(median, 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "throughput": round(b * 1000.0 / median, 2) if median > 0 else 0.0,
            "runs": int(ms.shape[0]),
        }
    return result


@dataclass
class EngineResult:
    """One engine's evaluation."""

    name: str
    precision: str
    path: str
    calibrator: str | None
    target: str | None
    size_mb: float
    metrics: dict[str, float | None]
    outputs: dict[str, dict[str, float]]
    failures: list[Failure] = field(default_factory=list)
    tolerance_ok: bool | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    slower_than_fp32: bool = False
    latency_same_as: dict[str, str] = field(default_factory=dict)  # batch size -> engine timed on the same graph
    untimed: str | None = None  # why the engine was not timed on this backend (built for another runtime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "precision": self.precision, "path": self.path, "calibrator": self.calibrator,
            "target": self.target, "size_mb": self.size_mb, "metrics": self.metrics, "outputs": self.outputs,
            "tolerance_ok": self.tolerance_ok, "failures": [f.to_dict() for f in self.failures],
        }


@dataclass
class CompareResult:
    """The comparison of a run's engines: prints as a table, serialises to JSON, and is truthy when
    every INT8 engine meets the configured tolerance."""

    run_dir: Path
    model: str
    backend: str
    task: str
    samples: int
    labelled: int
    primary: str
    tolerance: dict[str, dict[str, float]]
    engines: list[EngineResult]
    layers: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    picture: dict[str, Any] | None = None  # detections.png: which images and engines it shows

    def __bool__(self) -> bool:
        return all(e.tolerance_ok is not False for e in self.engines if e.precision == "int8")

    def __getitem__(self, name: str) -> EngineResult:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def int8(self) -> list[EngineResult]:
        return [e for e in self.engines if e.precision == "int8"]

    @property
    def best(self) -> EngineResult | None:
        """The INT8 engine best on the primary metric (ties: better output SQNR, then name order)."""
        ranked = rank_engines(self.int8, self.primary)
        return ranked[0] if ranked else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "model": self.model, "backend": self.backend, "task": self.task, "samples": self.samples,
            "labelled": self.labelled, "primary": self.primary, "tolerance": self.tolerance, "ok": bool(self),
            "best": best.name if best else None, "engines": [e.to_dict() for e in self.engines],
            "layers": self.layers, **({"picture": self.picture} if self.picture else {}),
        }

    def latency_dict(self) -> dict[str, Any]:
        return {
            "engines": {e.name: e.latency for e in self.engines},
            "same_graph_as": {e.name: e.latency_same_as for e in self.engines if e.latency_same_as},
            "slower_than_fp32": [e.name for e in self.engines if e.slower_than_fp32],
            **({"not_timed": {e.name: e.untimed for e in self.engines if e.untimed}}
               if any(e.untimed for e in self.engines) else {}),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def table(self) -> str:
        keys = [k for k in _metric_columns(self) if any(e.metrics.get(k) is not None for e in self.engines)]
        batches = sorted({b for e in self.engines for b in e.latency}, key=int)
        cols = ["engine", *keys, *(f"ms@b{b}" for b in batches), "MB", "tolerance"]
        rows = []
        for e in self.engines:
            row = [e.name]
            for k in keys:
                v = e.metrics.get(k)
                digits = 1 if k == "sqnr_db" else 0 if k == "boxes" else 4
                row.append("-" if v is None else f"{v:.{digits}f}")
            for b in batches:
                lat = e.latency.get(b)
                if lat is None and b in e.latency_same_as:
                    row.append("=")
                    continue
                if lat is None and e.untimed:
                    row.append("n/t")
                    continue
                row.append("-" if lat is None else f"{lat['median_ms']:.2f}" + (" SLOW" if b == "1" and e.slower_than_fp32 else ""))
            row.append(f"{e.size_mb:.1f}")
            row.append("-" if e.tolerance_ok is None else ("ok" if e.tolerance_ok else "FAIL"))
            rows.append(row)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
        return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])

    def __str__(self) -> str:
        head = (f"{self.model}: {self.samples} evaluation samples ({self.labelled} labelled), task {self.task}, "
                f"backend {self.backend}; primary metric {self.primary}")
        out = [head, self.table()]
        best = self.best
        if best is not None:
            out.append(f"best INT8 engine: {best.name} ({self.primary} {_fmt(best.metrics.get(self.primary))})")
        for e in self.int8:
            for f in e.failures:
                out.append(f"  {e.name}: {f.explain()}")
        slow = [e.name for e in self.engines if e.slower_than_fp32]
        if slow:
            out.append(f"SLOWER than FP32 at batch 1: {', '.join(slow)}")
        if self.layers and self.layers.get("rows"):
            worst = self.layers["rows"][:5]
            desc = ", ".join(
                f"{r['node']} ({_fmt(r.get('sensitivity'))}, own {_fmt(r.get('own_sqnr_db'), 1)} dB)" for r in worst
            )
            out.append(f"most sensitive layers of {self.layers['engine']} ({self.layers['score']}): {desc}")
            if self.layers.get("skipped"):
                out.append(f"  (not analysed: {', '.join(self.layers['skipped'])}, not a Q/DQ copy of the FP32 graph)")
        shared = sorted({b for e in self.engines for b in e.latency_same_as}, key=int)
        if shared:
            out.append(f"ms@b{'/'.join(shared)} '=': the same graph as an engine timed above (other constants only), timed once")
        untimed = sorted({e.untimed for e in self.engines if e.untimed})
        if untimed and any(e.latency for e in self.engines):
            out.append("'n/t': not timed: " + "; ".join(untimed))
        if self.tolerance:
            out.append("tolerance: " + ("every INT8 engine passes" if self else "some INT8 engines FAIL"))
        out.append(f"results: {self.run_dir / 'compare.json'}")
        return "\n".join(out)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _metric_columns(result: CompareResult) -> list[str]:
    task = list(M.TASK_METRICS.get(result.task, ()))
    extra = sorted({k for e in result.engines for k in e.metrics} - set(task) - set(M.OUTPUT_METRICS))
    return [*task, *extra, "cosine", "sqnr_db"]


def rank_engines(engines: list[EngineResult], primary: str) -> list[EngineResult]:
    """Engines best first by the primary metric, then output SQNR, then name."""
    sign = 1.0 if M.higher_is_better(primary) else -1.0

    def key(e: EngineResult) -> tuple[float, float, str]:
        v = e.metrics.get(primary)
        return (-sign * v if v is not None else math.inf, -(e.metrics.get("sqnr_db") or -math.inf), e.name)

    return sorted(engines, key=key)


def engine_metrics(
    config: Config, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], labels: np.ndarray | None,
    output: str, user: tuple[str, Callable[..., Any]] | None = None, detector: NmsDetector | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Task metrics (flat, with the task output's per-output metrics) and per-output metrics.

    ``detector`` (a :class:`quantlab.compare.detection.NmsDetector`) decodes every output into
    detections for the mAP and box metrics of an NMS detector.
    """
    c = config.compare
    per_output = {
        n: {k: _stable(v) for k, v in M.output_metrics(ref[n], out[n], c.atol, c.rtol).items()} for n in ref
    }
    flat: dict[str, float | None] = dict(per_output[output])
    boxes = M.BoxParams(c.dense_threshold, c.box_threshold, c.box_unclip_ratio, c.box_dilation, c.box_iou)
    if detector is not None:
        task: dict[str, Any] = dict(detector.metrics(ref, out))
    else:
        task = M.task_metrics(c.task, ref[output], out[output], labels, dense_threshold=c.dense_threshold,
                              retrieval_k=c.retrieval_k, boxes=boxes)
    flat.update({k: _stable(v) for k, v in task.items()})
    if user is not None:
        flat.update({k: _stable(v) for k, v in M.user_metrics(user[1], user[0], ref, out, labels).items()})
    return flat, per_output


def _output_name(config: Config, names: list[str]) -> str:
    wanted = config.compare.output
    if wanted is None:
        return names[0]
    check(wanted in names, f"compare.output '{wanted}' is not an output of the model: choose one of {', '.join(names)}")
    return wanted


def default_run_dir(config: Config) -> Path:
    return config.resolve(config.ptq.out) / (config.ptq.run_name or config.model.display_name)


class Evaluator:
    """The evaluation set, FP32's outputs on it and the tolerance, loaded once; evaluates engines.

    ``run_compare`` evaluates a run's engines with it; the escalation ladder evaluates the models it
    builds (partially quantized, QAT) with the same one, so every engine is judged alike.
    """

    def __init__(self, config: Config, run_dir: Path, *, eval_dir: str | Path | None = None) -> None:
        c = config.compare
        self.config = config
        self.run_dir = run_dir
        self.manifest = read_manifest(run_dir)
        self.specs = engines_of_run(run_dir, self.manifest)
        self.tolerance = parse_tolerance(config.tolerance)
        self.user = (c.metric, M.load_user_metric(c.metric)) if c.metric else None
        self.seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        fp32_path = run_dir / self.specs[0].path
        self.fp32_path = fp32_path
        # the FP32 graph the INT8 models are Q/DQ copies of: the transformed one when the run has it
        transformed = [a["path"] for a in self.manifest.get("artefacts", []) if a.get("kind") == "model-fp32-transformed"]
        self.graph_path = run_dir / transformed[0] if transformed else fp32_path
        self.inputs = input_specs(fp32_path)
        self.data = load_eval_set(config, self.inputs, eval_dir)
        self.seconds["load_data"] = time.perf_counter() - t0
        first = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        self.fixed_batch = first or None
        self.max_batch = max(c.batch_size, *c.latency_batches)
        self.fp32_runner = make_runner(c.backend, fp32_path, "fp32", max_batch=self.max_batch)
        self.output = _output_name(config, self.fp32_runner.output_names)
        self.primary = c.primary or M.default_primary(c.task, self.data.labelled, bool(c.postprocess))
        self.detector: NmsDetector | None = None
        if c.postprocess:
            from quantlab.compare.detection import NmsDetector

            self.detector = NmsDetector(c.postprocess, c.classes, self.data.infos, c.box_iou)
        self.reference: dict[str, np.ndarray] = {}
        self.detections: dict[str, list[Detections]] = {}  # each engine's decoded detections (NMS detectors)
        self.fp32: EngineResult | None = None
        self.timed_graphs: dict[str, str] = {}  # graph fingerprint -> the engine timed at every batch size

    def evaluate(self, spec: EngineSpec, *, latency: bool = True) -> EngineResult:
        """Run one engine over the evaluation set: metrics, latency, size, tolerance."""
        c = self.config.compare
        t0 = time.perf_counter()
        path = self.run_dir / spec.path
        is_ref = spec.precision == "fp32" and not self.reference
        runner = self.fp32_runner if is_ref else make_runner(c.backend, path, spec.name, max_batch=self.max_batch)
        out = run_all(runner, self.data.batches)
        if is_ref:
            self.reference = out
        flat, per_output = engine_metrics(self.config, self.reference, out, self.data.labels, self.output, self.user,
                                          self.detector)
        if self.detector is not None:
            self.detections[spec.name] = self.detector.detections(out)
        computed = {k for k, v in flat.items() if v is not None}
        if is_ref:
            # FP32 against itself has no error: its SQNR is not a measurement (the cap, 999 dB), so none is shown
            flat["sqnr_db"] = None
            for metrics in per_output.values():
                metrics["sqnr_db"] = None
        self.seconds[f"eval:{spec.name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        untimed = self.untimed(spec) if latency and c.latency_runs > 0 else None
        lat, same_as = self.latency(runner, spec, path, latency and untimed is None)
        self.seconds[f"latency:{spec.name}"] = time.perf_counter() - t0
        size = round(path.stat().st_size / 1e6, 3)
        result = EngineResult(spec.name, spec.precision, spec.path, spec.calibrator, spec.target, size, flat,
                              per_output, latency=lat, latency_same_as=same_as, untimed=untimed)
        if is_ref:
            self.fp32 = result
            check_known(self.tolerance, computed, f"compare (task {c.task})")
            relative = sorted(m for m, rules in self.tolerance.items()
                              if result.metrics.get(m) is None and {"max_drop", "max_increase"} & set(rules))
            check(
                not relative,
                f"tolerance on {', '.join(relative)} relative to FP32, which has no value of its own (no error "
                f"against itself): give an absolute bound instead, e.g. {relative[0] if relative else ''} = {{ min = 20 }}",
            )
            check(
                self.primary in computed,
                f"compare.primary '{self.primary}' is not computed here: choose one of {', '.join(sorted(computed))}",
            )
        elif spec.precision == "int8":
            self.judge(result)
        return result

    def untimed(self, spec: EngineSpec) -> str | None:
        """Why ``spec`` is not timed on this backend (its target builds models for another runtime), or None."""
        from quantlab.qdq.targets import runtime_of

        runtime = runtime_of(spec.target)
        backend = self.config.compare.backend
        if runtime is None or runtime == backend:
            return None
        return (f"the {spec.target} target's models are built for {runtime}; their {backend} time here is not "
                f"theirs there (time them with --backend {runtime})")

    def latency(self, runner: Runner, spec: EngineSpec, path: Path, enabled: bool) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """Latency at the smallest batch size always; at the larger ones only for a graph not timed yet
        (see the module docstring).  Returns the measurements and, per size left out, the engine timed
        on the same graph."""
        c = self.config.compare
        runs = c.latency_runs if enabled else 0
        sizes = latency_sizes(c.latency_batches, self.fixed_batch)
        if runs <= 0 or len(sizes) == 1:
            return latency_of(runner, self.data.batches, sizes, runs, c.warmup, None), {}
        key = graph_fingerprint(path)
        twin = self.timed_graphs.get(key)
        if twin is None:
            self.timed_graphs[key] = spec.name
            return latency_of(runner, self.data.batches, sizes, runs, c.warmup, None), {}
        first = min(sizes)
        lat = latency_of(runner, self.data.batches, (first,), runs, c.warmup, None)
        return lat, {str(b): twin for b in sizes if b != first}

    def judge(self, e: EngineResult) -> None:
        """Apply the tolerance and the latency flag to an INT8 engine (FP32 must be evaluated first)."""
        check(self.fp32 is not None, "evaluate the FP32 engine first: it is the reference")
        e.failures = evaluate(self.tolerance, e.metrics, self.fp32.metrics) if self.tolerance else []
        e.tolerance_ok = not e.failures if self.tolerance else None
        smallest = str(self.fixed_batch or 1)  # the model's fixed batch size, else batch 1
        fp32_b1 = self.fp32.latency.get(smallest, {}).get("median_ms")
        b1 = e.latency.get(smallest, {}).get("median_ms")
        e.slower_than_fp32 = bool(fp32_b1 and b1 and b1 > fp32_b1)

    def result(self, engines: list[EngineResult]) -> CompareResult:
        c = self.config.compare
        return CompareResult(self.run_dir, self.config.model.display_name, c.backend, c.task, self.data.samples,
                             self.data.labelled, self.primary, self.tolerance, engines, None, self.seconds)


def run_compare(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    eval_dir: str | Path | None = None,
    layers: bool | None = None,
    engines: list[str] | None = None,
    write: bool = True,
    progress: ProgressFactory | None = None,
) -> CompareResult:
    """Evaluate the engines of ``run_dir`` (default: the config's run folder) and write the results.

    ``engines`` restricts the evaluation to those engine names (FP32 is always evaluated: it is the
    reference).  ``layers`` overrides ``[compare] layers``.  ``write=False`` leaves the run folder
    untouched.  ``progress(total, description)`` may return a progress bar.
    """
    c = config.compare
    run = Path(run_dir) if run_dir is not None else default_run_dir(config)
    ev = Evaluator(config, run, eval_dir=eval_dir)
    result = ev.result(evaluate_engines(ev, select_engines(ev.specs, engines), progress))
    figures: dict[str, bytes] = {}
    if ev.detector is not None and write and result.int8:
        picture = detection_picture(config, ev, result, eval_dir)
        if picture is not None:
            result.picture, figures["detections.png"] = picture
    if (c.layers if layers is None else layers) and c.backend == "onnxruntime":
        t0 = time.perf_counter()
        result.layers = analyse_best_engine(config, ev, result)
        ev.seconds["layers"] = time.perf_counter() - t0
    if write:
        write_results(result, figures)
    return result


def select_engines(specs: list[EngineSpec], engines: list[str] | None) -> list[EngineSpec]:
    """The engines named in ``engines`` (all when None), FP32 always first: it is the reference."""
    if engines is None:
        return specs
    unknown = sorted(set(engines) - {s.name for s in specs})
    check(not unknown, f"unknown engine(s) {', '.join(unknown)}: the run has {', '.join(s.name for s in specs)}")
    return [s for s in specs if s.name == "fp32" or s.name in engines]


def evaluate_engines(ev: Evaluator, specs: list[EngineSpec], progress: ProgressFactory | None) -> list[EngineResult]:
    """Each engine over the evaluation set, in order, with an optional progress bar."""
    bar = progress(len(specs), "engines") if progress else None
    results: list[EngineResult] = []
    try:
        for spec in specs:
            results.append(ev.evaluate(spec))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def analyse_best_engine(config: Config, ev: Evaluator, result: CompareResult) -> dict[str, Any] | None:
    """The per-layer analysis of the best INT8 engine that is a Q/DQ copy of the FP32 graph (a QAT
    export or an ``ort-dynamic`` model is not); the engines passed over are listed under ``skipped``."""
    import onnx

    from quantlab.compare.layers import mismatch

    skipped = []
    fp32_model = onnx.load(str(ev.graph_path))
    for engine in rank_engines(result.int8, result.primary):
        int8_model = onnx.load(str(result.run_dir / engine.path))
        if mismatch(fp32_model, int8_model) is None:
            layers = analyse_layers(config, fp32_model, int8_model, engine.name, ev.data,
                                    ev.output, ev.reference[ev.output])
            if skipped:
                layers["skipped"] = skipped
            return layers
        skipped.append(engine.name)
    return None


def detection_picture(config: Config, ev: Evaluator, result: CompareResult,
                      eval_dir: str | Path | None = None) -> tuple[dict[str, Any], bytes] | None:
    """``detections.png`` of an NMS detector: FP32's, the best and the worst INT8 engine's boxes on the
    two evaluation images where the worst engine disagrees most with FP32 (see
    :mod:`quantlab.report.detections`), and what it shows.  ``None`` when the images are not files
    of the evaluation folder."""
    from quantlab.report.detections import detection_picture as draw
    from quantlab.report.detections import pick_images

    c = config.compare
    ranked = rank_engines(result.int8, result.primary)
    best, worst = ranked[0], ranked[-1]
    folder = Path(eval_dir) if eval_dir is not None else config.resolve(c.eval)
    ref = ev.detections["fp32"]
    chosen = [i for i in pick_images(ref, ev.detections[worst.name], c.box_iou, len(ref))
              if (folder / ev.data.infos[i].source).is_file()][:2]
    if not chosen:
        return None
    panels = [(f"best {best.name}", [ev.detections[best.name][i] for i in chosen])]
    if worst.name != best.name:
        panels.append((f"worst {worst.name}", [ev.detections[worst.name][i] for i in chosen]))
    png = draw([folder / ev.data.infos[i].source for i in chosen], [ref[i] for i in chosen], panels, c.classes, c.box_iou)
    info = {"file": "detections.png", "images": [ev.data.infos[i].source for i in chosen],
            "engines": [best.name, worst.name]}
    return info, png


def analyse_layers(
    config: Config, fp32: Any, int8: Any, engine: str, data: EvalSet, output: str,
    reference: np.ndarray,
) -> dict[str, Any]:
    """Own and accumulated SQNR of every quantized layer and its sensitivity, worst first.

    ``fp32`` and ``int8`` are the models: paths or loaded ``onnx.ModelProto``.

    Sensitivity is measured on the first ``sensitivity_samples`` evaluation samples: the model is
    run with only that one layer quantized (downstream part only, from cached FP32 activations) and
    scored by the SQNR of the task output against FP32, in dB (higher is better).  SQNR separates
    layers that an agreement count over a few dozen samples would tie.  ``sensitivity_layers = N``
    measures only the N layers with the lowest own SQNR (the others get no sensitivity), for models
    too large to measure every layer of.
    """
    from quantlab.compare import layers as L

    n = config.compare.sensitivity_samples or data.samples
    feeds = data.subset(n)
    samples = sum(next(iter(f.values())).shape[0] for f in feeds)
    fp32_model, int8_model = L.load_model(fp32, "FP32"), L.load_model(int8, "INT8")
    errors = L.layer_errors(fp32_model, int8_model, feeds)
    out_names = [o.name for o in fp32_model.graph.output]
    index = out_names.index(output)
    ref = reference[:samples]

    def score(outputs: list[np.ndarray]) -> float:
        return M.sqnr_db(ref, outputs[index])

    cap = config.compare.sensitivity_layers
    chosen = None
    if cap and cap < len(errors):  # the layers with the worst own error, ties in graph order
        chosen = [e.node for e in sorted(errors, key=lambda e: -math.inf if math.isnan(e.own_sqnr_db) else e.own_sqnr_db)[:cap]]
    sens = {s.node: s.score for s in L.sensitivity(fp32_model, int8_model, feeds, score, chosen)}
    rows = []
    for e in errors:
        d = e.to_dict()
        d["op"] = d.pop("op_type")
        d["inputs"] = [*d["activations"], *d["weights"]]
        d["sensitivity"] = _stable(sens.get(e.node), 4)
        d["own_sqnr_db"] = _stable(d.get("own_sqnr_db"), 4)
        d["accumulated_sqnr_db"] = _stable(d.get("accumulated_sqnr_db"), 4)
        rows.append(d)
    rows.sort(key=lambda r: (math.inf if r["sensitivity"] is None else r["sensitivity"], r["node"]))
    return {"engine": engine, "samples": samples,
            "score": "output SQNR dB with only this layer quantized", "rows": rows}


def write_results(result: CompareResult, figures: dict[str, bytes] | None = None) -> None:
    """``compare.json``, ``latency.json`` and ``figures`` (name -> PNG bytes) into the run folder, each
    atomically, then the manifest and report."""
    from quantlab.artefacts import Artefact, update_manifest
    from quantlab.report import write_report_files

    run = result.run_dir
    for name, payload in (("compare.json", result.to_dict()), ("latency.json", result.latency_dict())):
        tmp = run / f".{name}.tmp"
        write_text(tmp, dumps_json(payload))
        tmp.replace(run / name)
    for name, data in (figures or {}).items():
        tmp = run / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(run / name)
    update_manifest(run, [Artefact("compare.json", "compare"), Artefact("latency.json", "timing"),
                          *(Artefact(name, "figure") for name in figures or {})])
    write_report_files(run)
