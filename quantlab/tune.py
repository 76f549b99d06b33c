"""``quantlab tune``: climb the escalation ladder until the tolerance holds.

The ladder follows Wu et al. 2020 (arXiv 2004.09602) and NNCF's accuracy control:

1. **calibrator sweep**: PTQ with every configured calibrator from one statistics pass; the best
   INT8 engine of ``[tune] target`` by the primary metric, judged by ``[tolerance]``.
2. **recipes**: PTQ again after graph transforms of the FP32 model (:mod:`quantlab.transforms`:
   equalization, SmoothQuant, bias correction, AdaRound), each recipe of ``[tune] recipes`` (one
   transform or a combination) with every calibrator, in order, validated on the full evaluation
   set; a recipe none of whose transforms applies to the model is skipped without quantizing, and
   the rung stops at the first engine that meets the tolerance.  The best engine so far (sweep or
   recipe) goes on to the next rung; its recipe's run stays in ``recipes/<recipe>/``.
3. **partial quantization**: the layers of that engine ranked by sensitivity (the task output's
   SQNR with only that layer quantized, :func:`quantlab.compare.harness.analyse_layers`); greedily
   the most sensitive layer goes back to FP32, the model is re-validated on the full evaluation set,
   a step that does not improve the primary metric is undone, until the tolerance holds or
   ``max_float_layers`` layers are in float.  The Q/DQ rewrite reuses the calibrated scales, so
   each step costs one evaluation, not a new quantization.
4. **quantization-aware training** through nvidia-modelopt (:mod:`quantlab.qat`), initialised from
   the best calibrator's ranges, evaluated by the same harness after each epoch, stopping early
   once the tolerance holds or on a plateau; a model that exists only as ONNX trains as its
   prepared graph converted to PyTorch (:mod:`quantlab.qat.convert`).

Each rung is recorded in ``tune.json`` (and the run's report) with its metric and result; the run
stops at the first rung that meets the tolerance, or says which rung failed and why.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantlab.artefacts import Artefact, dumps_json, write_text
from quantlab.compare.harness import (
    CompareResult, EngineResult, EngineSpec, Evaluator, analyse_layers, rank_engines, read_manifest, write_results,
)
from quantlab.compare.metrics import higher_is_better
from quantlab.config import Config, override
from quantlab.errors import check


@dataclass
class Rung:
    """One step of the ladder and what it achieved."""

    rung: str
    status: str  # "pass", "fail" or "skipped"
    metric: str
    value: float | None = None
    reference: float | None = None
    engine: str | None = None
    detail: str = ""
    float_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("seconds")
        return d


@dataclass
class TuneResult:
    """The ladder's outcome: truthy when some rung met the tolerance."""

    run_dir: Path
    model: str
    primary: str
    rungs: list[Rung]
    final_engine: str | None
    compare: CompareResult | None = None

    def __bool__(self) -> bool:
        return any(r.status == "pass" for r in self.rungs)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ok": bool(self), "primary": self.primary,
                "rungs": [r.to_dict() for r in self.rungs], "final_engine": self.final_engine}

    def __str__(self) -> str:
        lines = [f"{self.model}: escalation ladder on {self.primary}"]
        for r in self.rungs:
            value = "-" if r.value is None else f"{r.value:.4f}"
            ref = "" if r.reference is None else f" (FP32 {r.reference:.4f})"
            lines.append(f"  {r.rung:<17} {r.status.upper():<7} {value}{ref}  {r.engine or ''}")
            if r.detail:
                lines.append(f"      {r.detail}")
        verdict = f"tolerance met by {self.final_engine}" if self else "tolerance NOT met by any rung"
        lines.append(verdict)
        lines.append(f"run folder: {self.run_dir}")
        return "\n".join(lines)


def _better(metric: str, a: float | None, b: float | None) -> bool:
    """``a`` strictly better than ``b`` on ``metric``."""
    if a is None:
        return False
    if b is None:
        return True
    return a > b if higher_is_better(metric) else a < b


def _summary(e: EngineResult) -> str:
    if e.tolerance_ok:
        return "meets the tolerance"
    return "; ".join(f.explain() for f in e.failures)


def partial_quantization(
    ev: Evaluator, best: EngineResult, max_float: int, *, out: Path, graph: Path | None = None
) -> tuple[Rung, EngineResult | None]:
    """Greedy float fallback of the most sensitive layers of ``best`` (see the module docstring).

    ``graph`` is the FP32 graph ``best`` was quantized from (default: the run's).
    """
    import onnx

    from quantlab.qdq.keep import keep_float

    t0 = time.perf_counter()
    primary = ev.primary
    graph = graph or ev.graph_path
    fp32_model = onnx.load(str(graph))  # the graph the INT8 model was quantized from
    int8_model = onnx.load(str(ev.run_dir / best.path))
    layers = analyse_layers(ev.config, graph, ev.run_dir / best.path, best.name, ev.data, ev.output,
                            ev.reference[ev.output])
    ev.layers = layers  # the report shows them beside the ladder
    ranked = [r["node"] for r in layers["rows"] if r.get("sensitivity") is not None]
    kept: list[str] = []
    current = best
    tried = 0
    scratch = out.parent / f".{out.stem}.candidate.onnx"
    for node in ranked:
        if len(kept) >= max_float or current.tolerance_ok:
            break
        tried += 1
        onnx.save(keep_float(int8_model, fp32_model, [*kept, node]), str(scratch))
        candidate = ev.evaluate(EngineSpec("candidate", "int8", str(scratch)), latency=False)
        if _better(primary, candidate.metrics.get(primary), current.metrics.get(primary)) or (
            candidate.metrics.get(primary) == current.metrics.get(primary)
            and (candidate.metrics.get("sqnr_db") or 0) > (current.metrics.get("sqnr_db") or 0)
        ):
            kept.append(node)
            current = candidate
        # else: undo (the node stays quantized)
    scratch.unlink(missing_ok=True)
    if not kept:
        rung = Rung("partial", "fail", primary, best.metrics.get(primary), ev.fp32.metrics.get(primary), best.name,
                    f"keeping none of the {tried} most sensitive layers in FP32 improved {primary}",
                    seconds=time.perf_counter() - t0)
        return rung, None
    onnx.save(keep_float(int8_model, fp32_model, kept), str(out))
    rel = out.relative_to(ev.run_dir).as_posix()
    target = best.target
    final = ev.evaluate(EngineSpec(f"int8:partial.{target}", "int8", rel, "partial", target))
    cost = ""
    b1, f1 = best.latency.get("1", {}).get("median_ms"), final.latency.get("1", {}).get("median_ms")
    if b1 and f1:
        cost = f"; latency {b1:.2f} -> {f1:.2f} ms at batch 1, size {best.size_mb:.1f} -> {final.size_mb:.1f} MB"
    status = "pass" if final.tolerance_ok else "fail"
    detail = (f"{len(kept)} of {tried} tried layers kept in FP32 ({', '.join(kept)}): {_summary(final)}{cost}")
    rung = Rung("partial", status, primary, final.metrics.get(primary), ev.fp32.metrics.get(primary), final.name,
                detail, kept, time.perf_counter() - t0)
    return rung, final


def run_tune(config: Config, *, progress: Any = None) -> TuneResult:
    """PTQ, compare, then escalate only as far as needed; writes tune.json and the report."""
    from quantlab.ptq import run_ptq

    check(config.tolerance, "quantlab tune needs a tolerance to aim for: add a [tolerance] section (e.g. top1 = 0.01)")
    check(
        config.tune.target in config.ptq.targets,
        f"tune.target '{config.tune.target}' is not among ptq.targets ({', '.join(config.ptq.targets)}): add it",
    )
    qat_mode = config.tune.qat
    if qat_mode != "off":
        from quantlab.qat.train import qat_source

        qat_source(config)  # a QAT source the config cannot give: say so before anything runs
    ptq = run_ptq(override(config, "ptq", report=False), progress=progress)  # the report comes at the end
    run = ptq.run_dir
    ev = Evaluator(config, run)
    engines = [ev.evaluate(spec) for spec in ev.specs]
    compare = ev.result(engines)
    primary = ev.primary
    reference = ev.fp32.metrics.get(primary)
    rungs: list[Rung] = []

    candidates = [e for e in compare.int8 if e.target == config.tune.target]
    ranked = rank_engines(candidates, primary)
    passing = [e for e in ranked if e.tolerance_ok]
    best = passing[0] if passing else ranked[0]
    detail = ", ".join(f"{e.calibrator} {e.metrics.get(primary)}" for e in ranked)
    rungs.append(Rung("calibrator-sweep", "pass" if passing else "fail", primary, best.metrics.get(primary), reference,
                      best.name, f"{detail}; best {best.calibrator}: {_summary(best)}"))
    final: EngineResult | None = best if passing else None
    graph = ev.graph_path

    if final is None:
        if config.tune.recipes:
            rung, recipe, recipe_graph = recipes(config, ev, best, progress)
            rungs.append(rung)
            if recipe is not None:
                engines.append(recipe)
                if recipe.tolerance_ok:
                    final = recipe
                if _pick([best, recipe], primary) is recipe:
                    best, graph = recipe, recipe_graph
        else:
            rungs.append(Rung("recipes", "skipped", primary, detail="tune.recipes is empty"))

    if final is None:
        if best.target == "ort-dynamic":
            rungs.append(Rung("partial", "skipped", primary,
                              detail="ort-dynamic has no Q/DQ to keep in float: set tune.target = \"ort-cpu\" for partial quantization"))
        elif config.tune.max_float_layers > 0:
            rung, partial = partial_quantization(ev, best, config.tune.max_float_layers,
                                                 out=run / "int8" / f"partial.{best.target}.onnx", graph=graph)
            rungs.append(rung)
            if partial is not None:
                engines.append(partial)
                if partial.tolerance_ok:
                    final = partial
        else:
            rungs.append(Rung("partial", "skipped", primary, detail="tune.max_float_layers = 0"))

    if final is None:
        if qat_mode == "off":
            rungs.append(Rung("qat", "skipped", primary, detail="tune.qat = \"off\""))
        else:
            rung, qat_engine = _qat_rung(config, ev, best, run, progress)
            rungs.append(rung)
            if qat_engine is not None:
                engines.append(qat_engine)
                if qat_engine.tolerance_ok:
                    final = qat_engine
    else:
        for name in ("recipes", "partial", "qat")[len(rungs) - 1:]:
            rungs.append(Rung(name, "skipped", primary, detail="not needed: the tolerance already holds"))

    compare = ev.result(engines)
    compare.layers = getattr(ev, "layers", None)
    result = TuneResult(run, config.model.display_name, primary, rungs, final.name if final else None, compare)
    _write(run, result, compare)
    return result


def _pick(engines: list[EngineResult], primary: str) -> EngineResult:
    """The best engine: those within tolerance first, then by the primary metric, then SQNR."""
    passing = [e for e in engines if e.tolerance_ok]
    return rank_engines(passing or engines, primary)[0]


def recipes(config: Config, ev: Evaluator, best: EngineResult, progress: Any = None
            ) -> tuple[Rung, EngineResult | None, Path | None]:
    """PTQ after each recipe of graph transforms; the best engine, and the FP32 graph it comes from."""
    import shutil

    from quantlab.model import prepare_model
    from quantlab.ptq import resolve_model, run_ptq, transform_model
    from quantlab.transforms import ordered

    t0 = time.perf_counter()
    primary = ev.primary
    folder = ev.run_dir / "recipes"
    prepared = prepare_model(resolve_model(config), config.model.input_shapes)
    notes: list[str] = []
    tops: list[tuple[EngineResult, Path]] = []  # each recipe's best engine and its run folder
    for recipe in config.tune.recipes:
        label = "+".join(ordered(recipe))
        t1 = time.perf_counter()
        cfg = override(config, "ptq", transforms=tuple(recipe), targets=(config.tune.target,), out=str(folder),
                       run_name=label, report=False, latency_runs=0)
        _, done = transform_model(cfg, prepared, sorted(cfg.ptq.exclude))  # cached: run_ptq reuses it
        if not any(t.applied for t in done):
            notes.append(f"{label}: not applicable ({'; '.join(t.detail for t in done)})")
            continue
        ptq = run_ptq(cfg, progress=progress)
        results = []
        for e in ptq.engines:
            path = (ptq.run_dir / e.path).relative_to(ev.run_dir).as_posix()
            spec = EngineSpec(f"int8:{e.calibrator}+{label}.{e.target}", "int8", path, f"{e.calibrator}+{label}", e.target)
            results.append(ev.evaluate(spec, latency=False))
        top = _pick(results, primary)
        verdict = "meets the tolerance" if top.tolerance_ok else "fails"
        notes.append(f"{label}: {top.calibrator.split('+')[0]} {top.metrics.get(primary)}, {verdict} "
                     f"({time.perf_counter() - t1:.0f} s)")
        tops.append((top, ptq.run_dir))
        if top.tolerance_ok:
            break
    if not tops:
        return Rung("recipes", "skipped", primary, detail="no recipe applies to this model: " + "; ".join(notes),
                    seconds=time.perf_counter() - t0), None, None
    winner = _pick([e for e, _ in tops], primary)
    winner_dir = next(d for e, d in tops if e is winner)
    for _, d in tops:
        if d != winner_dir:
            shutil.rmtree(d)
    final = ev.evaluate(EngineSpec(winner.name, "int8", winner.path, winner.calibrator, winner.target))
    status = "pass" if final.tolerance_ok else "fail"
    gain = "" if _pick([best, final], primary) is final else \
        f"; no better than the sweep's {best.name} ({best.metrics.get(primary)})"
    detail = f"{'; '.join(notes)}; best {final.calibrator}: {_summary(final)}{gain}"
    rung = Rung("recipes", status, primary, final.metrics.get(primary), ev.fp32.metrics.get(primary), final.name,
                detail, seconds=time.perf_counter() - t0)
    return rung, final, winner_dir / "model_fp32_transformed.onnx"


def _qat_rung(config: Config, ev: Evaluator, best: EngineResult, run: Path, progress: Any) -> tuple[Rung, EngineResult | None]:
    """Fine-tune with fake quantizers initialised from ``best``'s calibrator, judged by the same harness
    (:func:`quantlab.qat.run.qat_run`; a model without a PyTorch factory trains as its converted ONNX graph)."""
    from quantlab.qat.run import qat_run

    t0 = time.perf_counter()
    primary = ev.primary
    calibrator = best.calibrator if best.calibrator in config.ptq.calibrators else config.ptq.calibrators[0]
    result = qat_run(config, run, calibrator=calibrator, evaluator=ev, progress=progress)
    qat, final = result.qat, result.final
    status = "pass" if final.tolerance_ok else "fail"
    per_epoch = ", ".join("-" if m is None else f"{m:.4f}" for m in qat.metrics)
    minutes = sum(qat.epoch_seconds) / 60
    detail = (f"{qat.epochs} epoch(s), {qat.steps} steps on {qat.device} ({qat.source} graph, {minutes:.1f} min, "
              f"stopped: {qat.stop}), loss {qat.loss}, ranges from {calibrator} ({qat.mapped} of {qat.quantizers} "
              f"quantizers mapped); {primary} per epoch: {per_epoch}, epoch {qat.best_epoch} kept; "
              f"TensorRT rules: {qat.tensorrt_rules}; {_summary(final)}")
    if qat.device == "cpu":
        detail += (f"; {qat.seconds.get('train_step', 0.0):.1f} s per step on the CPU: a GPU runs a step in well under "
                   "a second (see the README's QAT section)")
    rung = Rung("qat", status, primary, final.metrics.get(primary), ev.fp32.metrics.get(primary), final.name, detail,
                seconds=time.perf_counter() - t0)
    return rung, final


def _write(run: Path, result: TuneResult, compare: CompareResult) -> None:
    """tune.json and the ladder's new models in the manifest; compare.json, latency.json and the report refreshed."""
    from quantlab.artefacts import update_manifest

    tmp = run / ".tune.json.tmp"
    write_text(tmp, dumps_json(result.to_dict()))
    tmp.replace(run / "tune.json")
    listed = {a["path"] for a in read_manifest(run).get("artefacts", [])}
    new = [Artefact(e.path, "model-int8-dynamic" if e.target == "ort-dynamic" else "model-int8-qdq", e.calibrator, e.target)
           for e in compare.int8
           if e.path not in listed and (run / e.path).is_file()]
    update_manifest(run, [*new, Artefact("tune.json", "tune")])
    write_results(compare)
