"""Post-training quantization end to end: one statistics pass, every calibrator, every target.

``run_ptq(config)`` is what ``quantlab ptq`` calls.  It writes a run folder::

    <out>/<run name>/
      manifest.json            every artefact with its kind, size and sha256
      summary.json             per engine: Q/DQ counts, rule check, agreement with FP32
      config.json              the effective configuration (every field but ``root``)
      timing.json              measured times (the only file that differs run to run)
      stats.npz                the statistics; calibrate again from it without inference
      model_fp32.onnx          the prepared FP32 graph: the reference every engine is compared with
      model_fp32_transformed.onnx  with ``[ptq] transforms``: the transformed FP32 graph the
                               statistics and the INT8 models come from
      model_fp16.onnx          FP16 weights and compute, FP32 inputs and outputs
      int8/<calibrator>.<target>.onnx
      int8/dynamic.ort-dynamic.onnx  ONNX Runtime dynamic quantization (one model, no calibrator)
      trt/<calibrator>.calib.cache   legacy TensorRT calibration caches
      scales.json, scales.csv  activation ranges and deployed scales/zero-points
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantlab import __version__
from quantlab.artefacts import Artefact, atomic_dir
from quantlab.config import Config
from quantlab.errors import QuantlabError, check, stage
from quantlab.model import PreparedModel, export_pytorch, prepare_model
from quantlab.scales import scale_rows, write_scale_tables
from quantlab.stats import StatsSet
from quantlab.textio import dumps_json, write_text
from quantlab.transforms.result import TransformResult

ProgressFactory = Callable[[int], Any]
TRANSFORMED = "model_fp32_transformed.onnx"


@dataclass
class EngineSummary:
    """One INT8 model of the run and how it behaved on the first calibration batch."""

    calibrator: str
    target: str
    path: str
    quantize_nodes: int
    dequantize_nodes: int
    tensorrt_rules: str  # "pass", "fail: <rules>" or "n/a"
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return not self.tensorrt_rules.startswith("fail")


@dataclass
class PtqResult:
    """What a PTQ run produced; prints as a table, serialises to JSON, truthy when every model passed."""

    run_dir: Path
    model: str
    samples: int
    tensors: int
    folded: int
    engines: list[EngineSummary]
    fp32_latency_ms: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    kept_float: dict[str, list[str]] = field(default_factory=dict)  # nodes left in float, and why
    notes: list[str] = field(default_factory=list)  # what preparation changed, artefacts not written
    latency_batch: int = 1  # the model's fixed batch size, else 1
    said: list[str] = field(default_factory=list)  # about the run as a whole, said once
    transforms: list[TransformResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(e.ok for e in self.engines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "samples": self.samples,
            "calibrated_tensors": self.tensors,
            "folded_tensors": self.folded,
            "engines": [{k: v for k, v in asdict(e).items() if k != "latency_ms"} for e in self.engines],
            "kept_float": self.kept_float,
            "preparation": self.notes,
            "notes": self.said,
            "transforms": [t.to_dict() for t in self.transforms],
        }

    def __str__(self) -> str:
        head = f"{self.model}: {self.samples} calibration samples, {self.tensors} tensors calibrated (+{self.folded} folded)"
        notes = [f"transform {t.name} ({'cached' if t.cached else f'{t.seconds:.1f} s'}): {t.detail}" for t in self.transforms]
        cols = ["calibrator", "target", "Q/DQ", "TRT rules", "cosine", "SQNR dB", "top-1 agree", "latency ms"]
        rows = []
        for e in self.engines:
            slow = ""
            if e.latency_ms is not None and self.fp32_latency_ms and e.latency_ms > self.fp32_latency_ms:
                slow = " SLOWER than FP32"
            rows.append([
                e.calibrator, e.target, f"{e.quantize_nodes}/{e.dequantize_nodes}", e.tensorrt_rules,
                f"{e.cosine:.5f}", f"{e.sqnr_db:.1f}",
                "-" if e.top1_agreement is None else f"{e.top1_agreement:.2f}",
                "-" if e.latency_ms is None else f"{e.latency_ms:.2f}{slow}",
            ])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
        out = [head, *notes, line(cols), line(["-" * w for w in widths]), *map(line, rows)]
        if self.fp32_latency_ms is not None:
            out.append(f"FP32 latency (batch {self.latency_batch}, median): {self.fp32_latency_ms:.2f} ms")
        if self.kept_float.get("nodes"):
            why = []
            if self.kept_float.get("fill_value_tensors"):
                why.append(f"they write or read {len(self.kept_float['fill_value_tensors'])} tensor(s) holding fill values "
                           "such as an attention mask's -3.4e38, which no INT8 scale can hold")
            if self.kept_float.get("excluded_by_config"):
                why.append(f"{len(self.kept_float['excluded_by_config'])} named in [ptq] exclude")
            if self.kept_float.get("added_by_transforms"):
                why.append(f"{len(self.kept_float['added_by_transforms'])} scaling node(s) added by the transforms")
            out.append(f"kept in float: {len(self.kept_float['nodes'])} node(s) ({'; '.join(why)})")
        for target, failed in self.kept_float.get("quantizer_failed", {}).items():
            for node, why in failed.items():
                out.append(f"kept in float for {target}: '{node}' (ONNX Runtime's quantizer fails on it: {why})")
        for note in self.notes:
            out.append(f"prepared: {note}")
        out.extend(self.said)
        if self.transforms:
            out.append("INT8 models quantize the transformed FP32 graph (model_fp32_transformed.onnx); "
                       "model_fp32.onnx stays the untransformed reference")
        out.append(f"run folder: {self.run_dir}")
        return "\n".join(out)


def resolve_model(config: Config) -> Path:
    """The ONNX file a config names, exporting its PyTorch factory when that is what it names."""
    m = config.model
    if m.onnx:
        return config.resolve(m.onnx)
    if m.pytorch:
        return export_pytorch(m.pytorch, m.input_shapes, m.input_names, m.output_names, m.opset)
    raise QuantlabError("no model given: pass --model MODEL.onnx or set [model] onnx or pytorch in quantlab.toml")


def gather_stats(
    config: Config, prepared: PreparedModel, progress: ProgressFactory | None = None
) -> StatsSet:
    """Run the one statistics pass over the configured calibration folder."""
    from quantlab.collect import collect_stats
    from quantlab.data import make_reader

    check(config.data.calib is not None, "no calibration data given: pass --calib FOLDER or set [data] calib in quantlab.toml")
    reader = make_reader(config.data, config.resolve(config.data.calib), prepared.inputs, resolve=config.resolve)
    bar = progress(len(reader)) if progress else None
    try:
        return collect_stats(prepared, reader, on_batch=(lambda n: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()


def calibration_feeds(config: Config, prepared: PreparedModel) -> list[dict[str, np.ndarray]]:
    """Every calibration batch in memory (what the data-driven transforms read)."""
    from quantlab.data import make_reader

    check(config.data.calib is not None, "no calibration data given: pass --calib FOLDER or set [data] calib in quantlab.toml")
    return list(make_reader(config.data, config.resolve(config.data.calib), prepared.inputs, resolve=config.resolve))


def transform_model(config: Config, prepared: PreparedModel, exclude: list[str]) -> tuple[PreparedModel, list[TransformResult]]:
    """The prepared model after ``[ptq] transforms``, ready to calibrate (cached like preparation)."""
    from quantlab.transforms import NEEDS_DATA, transform_prepared

    feeds = calibration_feeds(config, prepared) if set(config.ptq.transforms) & NEEDS_DATA else []
    return transform_prepared(prepared, config.ptq.transforms, feeds, config.transforms, exclude)


def _first_batch(config: Config, prepared: PreparedModel) -> dict[str, np.ndarray]:
    """The first calibration batch (at the model's fixed batch size, if it has one); without data
    (statistics reused), seeded normal values for float inputs and zeros for the others."""
    from quantlab.data import make_reader

    if config.data.calib is None:
        gen = np.random.default_rng(0)
        return {
            s.name: gen.standard_normal([d or 1 for d in s.shape]).astype(s.dtype)
            if np.issubdtype(s.dtype, np.floating) else np.zeros([d or 1 for d in s.shape], s.dtype)
            for s in prepared.inputs
        }
    return next(iter(make_reader(config.data, config.resolve(config.data.calib), prepared.inputs, resolve=config.resolve)))


def _agreement(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float | None]:
    from quantlab.compare.metrics import check_agreement

    top1 = float(np.mean(ref.argmax(-1) == out.argmax(-1))) if ref.ndim == 2 and ref.shape[-1] > 1 else None
    return (*check_agreement(ref, out), top1)


def latency_batch(prepared: PreparedModel) -> int:
    """The batch size latency is measured at: the model's fixed batch dimension, else 1."""
    return next((s.shape[0] for s in prepared.inputs if s.shape and s.shape[0] is not None), 1)


def _latency_ms(session: Any, feed: dict[str, np.ndarray], runs: int, batch: int = 1) -> float | None:
    """Median wall time on the first ``batch`` samples of ``feed``, in ms: at most ``runs`` runs,
    fewer once the median is stable (:func:`quantlab.latency.time_runs`)."""
    from quantlab.latency import BUDGET_S, time_runs

    if runs <= 0:
        return None
    one = {k: v[:batch] for k, v in feed.items()}
    times = time_runs(lambda: session.run(None, one), warmup=3, max_runs=runs, budget_s=BUDGET_S)
    return float(np.median(times) * 1000)


def try_write_fp16(src: Path, dst: Path) -> str | None:
    """Write the FP16 model and check that ONNX Runtime loads it; the reason when it cannot (nothing written)."""
    from quantlab.collect import ort_session

    try:
        with stage("fp16", "writing the FP16 model", "the INT8 models do not depend on it"):
            write_fp16(src, dst)
            ort_session(str(dst))
    except QuantlabError as exc:
        dst.unlink(missing_ok=True)
        return str(exc).removeprefix("fp16: ")
    return None


MAX_SKIPPED = 16  # nodes left in float because ONNX Runtime's quantizer fails on them, at most


def quantize_or_skip(
    model_path: Path, ranges: dict[str, Any], target: Any, out: Path, exclude: list[str], failed: dict[str, str]
) -> None:
    """``write_qdq_model``, leaving in float each node ONNX Runtime's quantizer fails on.

    When ``quantize_static`` raises while quantizing a node (its frames show which), that node joins
    ``failed`` (node -> the error's first line) and the call is repeated without it, up to
    :data:`MAX_SKIPPED` nodes; the rest of the model is still quantized.  An error that names no node,
    or a node without a name, is raised (``stage`` turns it into a one-line error).
    """
    from quantlab.errors import raised_by_onnx, describe, node_in_traceback
    from quantlab.qdq.targets import write_qdq_model

    while True:
        try:
            write_qdq_model(model_path, ranges, target, out, exclude=sorted({*exclude, *failed}))
            return
        except Exception as exc:
            node = node_in_traceback(exc) if raised_by_onnx(exc) else None
            if node is None or node in failed or node in exclude or len(failed) >= MAX_SKIPPED:
                raise
            failed[node] = describe(exc)


def write_fp16(src: Path, dst: Path) -> None:
    """FP16 copy of the model: weights and compute in FP16, inputs and outputs kept FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the ``with`` block as ``seconds[key]`` (when it completes)."""
    t0 = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t0


@dataclass
class Reference:
    """The FP32 reference on the first calibration batch: what every INT8 model is checked against."""

    feed: dict[str, np.ndarray]
    outputs: np.ndarray  # the first output
    batch: int  # the batch size latency is measured at
    latency_ms: float | None


@dataclass
class RunFiles:
    """What the stages have written into the run folder so far, in manifest order."""

    folder: Path
    artefacts: list[Artefact] = field(default_factory=list)
    engines: list[EngineSummary] = field(default_factory=list)
    scales: list[dict[str, Any]] = field(default_factory=list)  # rows of the scale table

    def add(self, rel: str, kind: str, calibrator: str | None = None, target: str | None = None) -> None:
        self.artefacts.append(Artefact(rel, kind, calibrator, target))


def run_ptq(
    config: Config,
    *,
    stats: StatsSet | str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> PtqResult:
    """Quantize the configured model with every configured calibrator and target.

    ``stats`` reuses the statistics of an earlier run (a ``StatsSet`` or its ``stats.npz``) so that
    another calibrator or percentile costs no inference.  ``progress(total)`` may return a progress
    bar (anything with ``update(n)`` and ``close()``) for the calibration batches.

    The stages, in order: :func:`prepare`, :func:`check_quantizable`, :func:`transform_model`,
    :func:`statistics`, :func:`run_reference`, :func:`kept_float_nodes`, then in the run folder
    :func:`write_float_models`, :func:`write_static_models` (calibrate, place Q/DQ, check, per
    calibrator and target), :func:`write_dynamic` and the scale tables, summary, timing and manifest
    (:func:`write_run_record`).  The report is asked for last.
    """
    from quantlab.calibrators import get_calibrator
    from quantlab.qdq.targets import DYNAMIC_TARGET

    seconds: dict[str, float] = {}
    with _timed(seconds, "prepare"):
        source, reference_model = prepare(config)
    fp32_model = check_quantizable(config, reference_model)
    prepared, transforms = reference_model, []  # prepared: the graph the INT8 models quantize
    if config.ptq.transforms:
        with _timed(seconds, "transforms"):
            prepared, transforms = transform_model(config, reference_model, sorted(config.ptq.exclude))
        seconds.update({f"transform:{t.name}": t.seconds for t in transforms})
        fp32_model = _load(prepared.path)
    with _timed(seconds, "statistics"):
        stats = statistics(config, prepared, source, stats, progress)
    reference = run_reference(config, reference_model, source)
    calibrators = {c: get_calibrator(c, percentile=config.ptq.percentile) for c in config.ptq.calibrators}
    kept_float = kept_float_nodes(config, fp32_model, stats, transforms)
    notes = list(reference_model.notes)
    said = [dynamic_note(list(calibrators))] if DYNAMIC_TARGET in config.ptq.targets else []
    run_dir = config.resolve(config.ptq.out) / (config.ptq.run_name or config.model.display_name)
    with atomic_dir(run_dir) as tmp:
        run = RunFiles(tmp)
        notes += write_float_models(run, config, stats, reference_model, prepared, transforms, seconds)
        failures = write_static_models(run, config, calibrators, stats, prepared, fp32_model, kept_float, reference, seconds)
        if DYNAMIC_TARGET in config.ptq.targets:
            with _timed(seconds, f"dynamic:{DYNAMIC_TARGET}"):
                write_dynamic(run, config, prepared, kept_float["nodes"], reference)
        for name in write_scale_tables(tmp, run.scales):
            run.add(name, "scale-table")
        if failures:
            kept_float["quantizer_failed"] = failures
        result = PtqResult(
            run_dir, config.model.display_name, stats.samples, len(stats.tensors), len(stats.folded), run.engines,
            reference.latency_ms, seconds, kept_float, notes, reference.batch, said, transforms,
        )
        write_run_record(run, config, result, stats, reference_model, prepared)
    if config.ptq.report:
        from quantlab.report import write_report_files

        with _timed(seconds, "report"):
            write_report_files(run_dir)  # index.html, summary.md, report.json: views of the files above
    return result


def _load(path: Path) -> Any:
    from quantlab.onnxgraph import load_model

    return load_model(path, "prepared")


def prepare(config: Config) -> tuple[Path, PreparedModel]:
    """Stage 1: the configured model (exported first when it is a PyTorch factory) and its prepared form."""
    source = resolve_model(config)
    with stage("prepare", f"preparing '{source.name}'", "check that the model loads and runs in ONNX Runtime"):
        return source, prepare_model(source, config.model.input_shapes)


def check_quantizable(config: Config, prepared: PreparedModel) -> Any:
    """The prepared ``ModelProto``, once ``[ptq] exclude`` names only its nodes and every target finds
    something to quantize: a target with nothing to quantize stops here, before any inference."""
    from quantlab.qdq.targets import DYNAMIC_TARGET, TARGETS, check_dynamic, placement_for

    fp32_model = _load(prepared.path)
    named = {n.name for n in fp32_model.graph.node if n.name}
    unknown = [n for n in config.ptq.exclude if n not in named]
    check(not unknown, f"ptq.exclude names {unknown[:3]}, not node(s) of the model: use node names as the model shows them "
                       "(e.g. in Netron, or the per-layer table of quantlab compare)")
    for tname in config.ptq.targets:
        if tname == DYNAMIC_TARGET:
            check_dynamic(fp32_model, config.ptq.exclude)
        else:
            placement_for(fp32_model, TARGETS[tname], config.ptq.exclude)
    return fp32_model


def statistics(
    config: Config, prepared: PreparedModel, source: Path, stats: StatsSet | str | Path | None,
    progress: ProgressFactory | None = None,
) -> StatsSet:
    """Stage 2: the one statistics pass over the calibration data, or the statistics given (a
    ``StatsSet`` or its file), which must have been collected on this very (transformed) model."""
    if stats is None:
        with stage("statistics", f"running '{source.name}' in ONNX Runtime on the calibration data",
                   "check that the data matches the model's inputs (shapes, dtypes, preprocessing)"):
            stats = gather_stats(config, prepared, progress)
    elif not isinstance(stats, StatsSet):
        stats = StatsSet.load(stats)
    check(
        stats.model_sha256 == prepared.sha256,
        "the statistics were collected on a different model (or with other [ptq] transforms): re-run calibration "
        "for this model (drop --stats)",
    )
    return stats


def run_reference(config: Config, reference_model: PreparedModel, source: Path) -> Reference:
    """The untransformed FP32 model on the first calibration batch: its output and latency."""
    from quantlab.collect import ort_session

    feed = _first_batch(config, reference_model)
    batch = latency_batch(reference_model)
    with stage("statistics", f"running '{source.name}' in ONNX Runtime on the first calibration batch",
               "check that the data matches the model's inputs (shapes, dtypes, preprocessing)"):
        fp32 = ort_session(str(reference_model.path), level="all")
        outputs = fp32.run(None, feed)[0]
        latency = _latency_ms(fp32, feed, config.ptq.latency_runs, batch)
    return Reference(feed, outputs, batch, latency)


def kept_float_nodes(config: Config, fp32_model: Any, stats: StatsSet, transforms: list[TransformResult]) -> dict[str, Any]:
    """The nodes every INT8 model leaves in float, and why: those that write or read fill values
    (no INT8 scale holds -3.4e38), those named in ``[ptq] exclude``, the transforms' scaling nodes."""
    from quantlab.qdq.targets import fill_value_tensors, float_nodes

    fills = fill_value_tensors(stats)
    added = sorted({n for t in transforms for n in t.keep_float})
    kept_float: dict[str, Any] = {
        "nodes": sorted(set(config.ptq.exclude) | set(float_nodes(fp32_model, fills)) | set(added)),
        "fill_value_tensors": fills, "excluded_by_config": sorted(config.ptq.exclude),
    }
    if added:
        kept_float["added_by_transforms"] = added
    return kept_float


def dynamic_note(calibrators: list[str]) -> str:
    """What a run says once about ``ort-dynamic``: no calibrator changes it."""
    from quantlab.qdq.targets import DYNAMIC_CALIBRATOR, DYNAMIC_TARGET

    return (
        f"{DYNAMIC_TARGET}: activations are quantized at run time, so the calibrators "
        f"({', '.join(calibrators)}) make no difference to it; one model: int8/{DYNAMIC_CALIBRATOR}.{DYNAMIC_TARGET}.onnx"
    )


def write_float_models(
    run: RunFiles, config: Config, stats: StatsSet, reference_model: PreparedModel, prepared: PreparedModel,
    transforms: list[TransformResult], seconds: dict[str, float],
) -> list[str]:
    """The run's inputs: ``config.json``, ``stats.npz``, the FP32 model (and the transformed one), the
    FP16 model.  Returns the note saying why no FP16 model was written, if none was."""
    tmp = run.folder
    write_text(tmp / "config.json", dumps_json(config_dict(config)))
    run.add("config.json", "config")
    with _timed(seconds, "fp16"):
        stats.save(tmp / "stats.npz")
        run.add("stats.npz", "statistics")
        shutil.copyfile(reference_model.path, tmp / "model_fp32.onnx")
        run.add("model_fp32.onnx", "model-fp32")
        if transforms:
            shutil.copyfile(prepared.path, tmp / TRANSFORMED)
            run.add(TRANSFORMED, "model-fp32-transformed")
        fp16_error = try_write_fp16(reference_model.path, tmp / "model_fp16.onnx")
        if fp16_error is None:
            run.add("model_fp16.onnx", "model-fp16")
    return [] if fp16_error is None else [f"no FP16 model: {fp16_error}"]


def write_static_models(
    run: RunFiles, config: Config, calibrators: dict[str, Any], stats: StatsSet, prepared: PreparedModel,
    fp32_model: Any, kept_float: dict[str, Any], reference: Reference, seconds: dict[str, float],
) -> dict[str, dict[str, str]]:
    """Stages 3-5 per calibrator and static target: calibrate (ranges), place Q/DQ and write the model,
    check it, list its scales; then the calibrator's TensorRT calibration cache.

    One ``quantize_static`` call per target; the other calibrators rewrite that model's scales
    (:func:`~quantlab.qdq.targets.plan_rewrite`).  Returns, per target, the nodes ONNX Runtime's
    quantizer failed on and why (left in float, see :func:`quantize_or_skip`).
    """
    from quantlab.qdq.targets import DYNAMIC_TARGET, TARGETS, QdqRewrite, compute_ranges

    static_targets = [t for t in config.ptq.targets if t != DYNAMIC_TARGET]
    rewrites: dict[str, QdqRewrite | None] = {}
    failures: dict[str, dict[str, str]] = {}  # target -> node ONNX Runtime's quantizer failed on -> why
    for cname, calibrator in calibrators.items():
        by_target: dict[str, dict] = {}
        for tname in static_targets:
            with _timed(seconds, f"ranges:{cname}:{tname}"):
                ranges = by_target[tname] = compute_ranges(stats, calibrator, TARGETS[tname])
            rel = f"int8/{cname}.{tname}.onnx"
            with _timed(seconds, f"qdq:{cname}:{tname}"):
                qmodel, data = write_qdq(
                    run.folder / rel, prepared, fp32_model, ranges, tname, kept_float["nodes"], rewrites,
                    failures.setdefault(tname, {}), plan=len(calibrators) > 1,
                )
            run.add(rel, "model-int8-qdq", cname, tname)
            with _timed(seconds, f"checks:{cname}:{tname}"):
                run.engines.append(_check_engine(cname, tname, rel, run.folder, data, qmodel, reference.outputs,
                                                 reference.feed, config, reference.batch))
                run.scales += scale_rows(ranges, qmodel, stats.folded, cname, tname)
        trt_ranges = by_target.get("tensorrt") or compute_ranges(stats, calibrator, TARGETS["tensorrt"])
        rel = f"trt/{cname}.calib.cache"
        write_calibration_cache(run.folder / rel, trt_ranges, kept_float["fill_value_tensors"])
        run.add(rel, "tensorrt-calibration-cache", cname, "tensorrt")
    return {t: dict(sorted(f.items())) for t, f in sorted(failures.items()) if f}


def write_qdq(
    out: Path, prepared: PreparedModel, fp32_model: Any, ranges: dict[str, Any], tname: str, kept: list[str],
    rewrites: dict[str, Any], failed: dict[str, str], *, plan: bool,
) -> tuple[Any, bytes]:
    """Stage 4, one model: the Q/DQ model of target ``tname`` with ``ranges``, written to ``out``.

    The first model of a target comes from ONNX Runtime's ``quantize_static``
    (:func:`quantize_or_skip`); with ``plan`` the scale rewrite of that model is planned and kept in
    ``rewrites`` so the next calibrators only rewrite scales.  Returns the model and its bytes.
    """
    import onnx

    from quantlab.qdq.targets import TARGETS, plan_rewrite

    rewrite = rewrites.get(tname)
    with stage("quantize", f"ONNX Runtime's quantize_static for target {tname}",
               "leave the node named there in float with [ptq] exclude = [\"<node>\"] in quantlab.toml"):
        qmodel = rewrite.apply(ranges) if rewrite is not None else None
        if qmodel is None:
            quantize_or_skip(prepared.path, ranges, TARGETS[tname], out, kept, failed)
            data = out.read_bytes()
            qmodel = onnx.load_model_from_string(data)
            if plan and tname not in rewrites:
                rewrites[tname] = plan_rewrite(fp32_model, qmodel, ranges, TARGETS[tname], sorted({*kept, *failed}))
        else:
            data = qmodel.SerializeToString()
            out.write_bytes(data)
    return qmodel, data


def write_calibration_cache(path: Path, ranges: dict[str, Any], fills: list[str]) -> None:
    """The legacy TensorRT calibration cache of TensorRT-target ranges (no INT8 range for fill values)."""
    from quantlab.trtcache import format_calibration_cache

    amaxes = {n: r.amax for n, r in ranges.items() if n not in fills}
    write_text(path, format_calibration_cache(amaxes))


def write_dynamic(run: RunFiles, config: Config, prepared: PreparedModel, kept: list[str], reference: Reference) -> None:
    """The one ``ort-dynamic`` model (ONNX Runtime's ``quantize_dynamic``), checked like the others."""
    import onnx

    from quantlab.qdq.targets import DYNAMIC_CALIBRATOR, DYNAMIC_TARGET, write_dynamic_model

    rel = f"int8/{DYNAMIC_CALIBRATOR}.{DYNAMIC_TARGET}.onnx"
    with stage("quantize", f"ONNX Runtime's quantize_dynamic for target {DYNAMIC_TARGET}",
               "leave the node named there in float with [ptq] exclude = [\"<node>\"] in quantlab.toml"):
        write_dynamic_model(prepared.path, run.folder / rel, exclude=kept)
    data = (run.folder / rel).read_bytes()
    run.add(rel, "model-int8-dynamic", DYNAMIC_CALIBRATOR, DYNAMIC_TARGET)
    run.engines.append(_check_engine(
        DYNAMIC_CALIBRATOR, DYNAMIC_TARGET, rel, run.folder, data, onnx.load_model_from_string(data), reference.outputs,
        reference.feed, config, reference.batch,
    ))


def write_run_record(
    run: RunFiles, config: Config, result: PtqResult, stats: StatsSet, reference_model: PreparedModel,
    prepared: PreparedModel,
) -> None:
    """The last files of a run: ``summary.json``, ``timing.json`` and ``manifest.json`` (every file
    listed with its digest)."""
    tmp, transforms = run.folder, result.transforms
    write_text(tmp / "summary.json", dumps_json(result.to_dict()))
    run.add("summary.json", "summary")
    timing = {
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "latency_ms_batch1": {"fp32": result.fp32_latency_ms, **{e.path: e.latency_ms for e in result.engines if e.latency_ms}},
        "latency_batch": result.latency_batch,
    }
    write_text(tmp / "timing.json", dumps_json(timing))
    run.add("timing.json", "timing")
    manifest = {
        "quantlab": __version__,
        "model": {"name": config.model.display_name, "source": reference_model.source.name, "sha256": reference_model.sha256,
                  **({"transformed_sha256": prepared.sha256} if transforms else {})},
        "transforms": [{"name": t.name, "applied": t.applied, "detail": t.detail} for t in transforms],
        "calibration": {"samples": stats.samples, "calibrators": list(config.ptq.calibrators),
                        "percentile": config.ptq.percentile, "targets": list(config.ptq.targets)},
        "artefacts": [a.to_dict(tmp) for a in run.artefacts],
    }
    write_text(tmp / "manifest.json", dumps_json(manifest))


def _check_engine(
    calibrator: str, target: str, rel: str, tmp: Path, data: bytes, qmodel: Any, reference: np.ndarray,
    feed: dict[str, np.ndarray], config: Config, batch: int,
) -> EngineSummary:
    """Check one INT8 model as written: ``onnx.checker``, an ONNX Runtime session, agreement with FP32 on
    the first calibration batch, TensorRT's rules for ``tensorrt``, latency for the CPU targets."""
    import onnx

    from quantlab.collect import ort_session
    from quantlab.qdq.lint import lint_tensorrt

    with stage("check", f"checking the {calibrator}.{target} INT8 model (onnx.checker, ONNX Runtime)",
               "leave the node named there in float with [ptq] exclude = [\"<node>\"] in quantlab.toml"):
        onnx.checker.check_model(data)
        session = ort_session(str(tmp / rel), level="all")
        cosine, sqnr, top1 = _agreement(reference, session.run(None, feed)[0])
    rules = "n/a"
    if target == "tensorrt":
        report = lint_tensorrt(qmodel)
        rules = "pass" if report else "fail: " + ", ".join(sorted({i.rule for i in report.issues}))
    ops = [n.op_type for n in qmodel.graph.node]
    return EngineSummary(
        calibrator, target, rel, ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), rules, cosine, sqnr, top1,
        _latency_ms(session, feed, config.ptq.latency_runs, batch) if target != "tensorrt" else None,
    )


def config_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as JSON-ready data: every field but ``root``, paths as strings, tuples as lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain({k: v for k, v in asdict(config).items() if k != "root"})
