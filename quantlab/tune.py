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
   the most sensitive layer leaves INT8, the model is re-validated on the full evaluation set, a
   step that does not improve the primary metric is undone, until the tolerance holds or a cap is
   reached.  A layer leaves INT8 for what its target would run instead: FP16 for ``tensorrt``
   (TensorRT builds a layer without Q/DQ in FP16, :func:`quantlab.qdq.keep.keep_fp16`), FP32 for
   ``ort-cpu``.  The caps: ``max_float_layers`` layers; for ``tensorrt`` (whose models are not
   meant for the CPU) ``max_float_share`` of the quantized layers; for ``ort-cpu``
   ``max_latency_increase``: a step whose model, timed in turn with the fully quantized engine at
   batch 1, is slower by more than that fraction ends the rung before it is kept, and the rung
   says so.  The Q/DQ rewrite reuses the calibrated scales, so each step costs
   one evaluation, not a new quantization.
4. **quantization-aware training** through nvidia-modelopt (:mod:`quantlab.qat`), initialised from
   the best calibrator's ranges, evaluated by the same harness after each epoch, stopping early
   once the tolerance holds or on a plateau; a model that exists only as ONNX trains as its
   prepared graph converted to PyTorch (:mod:`quantlab.qat.convert`).

Each rung is recorded in ``tune.json`` (and the run's report) with its metric, result, engine, the
engine's batch-1 latency and file size, and the rung's wall time in seconds; the run stops at the
first rung that meets the tolerance, or says which rung failed and why.  ``run_tune`` is the
sweep (:func:`_sweep`) then one function per rung, each adding its record to a shared
:class:`_Ladder`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantlab.artefacts import Artefact, dumps_json, write_text
from quantlab.compare.harness import (
    CompareResult, EngineResult, EngineSpec, Evaluator, analyse_layers, feed_of_size, pooled, rank_engines,
    read_manifest, write_results,
)
from quantlab.compare.metrics import higher_is_better
from quantlab.config import Config, override
from quantlab.errors import check


@dataclass
class Rung:
    """One step of the ladder and what it achieved.

    ``latency_ms`` is the batch-1 median of the rung's engine (ONNX Runtime on the CPU; ``None`` for
    the ``tensorrt`` target's models, which compare does not time there), ``size_mb`` its file size
    and ``seconds`` the rung's wall time.
    """

    rung: str
    status: str  # "pass", "fail" or "skipped"
    metric: str
    value: float | None = None
    reference: float | None = None
    engine: str | None = None
    detail: str = ""
    float_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latency_ms: float | None = None
    size_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d

    def measured(self, e: EngineResult | None) -> Rung:
        """This rung with ``e``'s batch-1 latency and size recorded."""
        if e is not None:
            self.latency_ms = _batch1_ms(e)
            self.size_mb = e.size_mb
        return self


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
            cost = f"  [{r.seconds:.0f} s" + ("" if r.latency_ms is None else f", {r.latency_ms:.2f} ms at batch 1") + \
                ("" if r.size_mb is None else f", {r.size_mb:.1f} MB") + "]" if r.status != "skipped" else ""
            lines.append(f"  {r.rung:<17} {r.status.upper():<7} {value}{ref}  {r.engine or ''}{cost}")
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


def _batch1_ms(e: EngineResult) -> float | None:
    """The smallest measured batch's median latency (batch 1, or the model's fixed batch)."""
    if not e.latency:
        return None
    return e.latency[min(e.latency, key=int)].get("median_ms")


def paired_latency(ev: Evaluator, a: Path, b: Path, runs: int) -> tuple[float, float]:
    """Median batch-1 latency in ms of the models ``a`` and ``b``, timed in turn (a, b, a, b, ...).

    Alternating the two puts whatever else the machine does at that moment on both alike, so their
    ratio is steadier than that of two separate measurements; ``runs`` pairs after one warm-up pair.
    """
    import numpy as np

    from quantlab.compare.runners import make_runner

    c = ev.config.compare
    runners = [make_runner(c.backend, p, p.stem, max_batch=ev.max_batch) for p in (a, b)]
    feed = feed_of_size(pooled(ev.data.batches), ev.fixed_batch or 1)
    times: list[list[float]] = [[], []]
    for i in range(max(runs, 1) + 1):
        for k, runner in enumerate(runners):
            t = time.perf_counter()
            runner.run(feed)
            if i:  # the first pair warms up
                times[k].append(time.perf_counter() - t)
    return float(np.median(times[0]) * 1000.0), float(np.median(times[1]) * 1000.0)


def latency_exceeded(node: str, base_ms: float, candidate_ms: float, max_increase: float) -> str:
    """Why keeping ``node`` out of INT8 is refused on latency, or ``""`` when it is within the cap.

    The cap is relative to the fully quantized engine: ``candidate <= base * (1 + max_increase)``;
    e.g. 31.9 ms with ``max_increase = 0.10`` allows up to 35.09 ms.
    """
    if candidate_ms <= base_ms * (1 + max_increase):
        return ""
    return (f"stopped before {node}: batch-1 latency {base_ms:.2f} -> {candidate_ms:.2f} ms "
            f"({candidate_ms / base_ms - 1:+.0%}, timed in turn) would exceed tune.max_latency_increase = "
            f"{max_increase:g} over the fully quantized engine")


@dataclass
class _Partial:
    """The state of the greedy float fallback: the layers kept so far and the engine they give."""

    kept: list[str]
    current: EngineResult
    tried: int = 0
    stop: str = ""
    latency: tuple[float, float] | None = None  # (fully quantized, current) batch-1 ms, paired


def _accept(primary: str, candidate: EngineResult, current: EngineResult) -> bool:
    """A step is kept when it improves the primary metric (or ties it and raises the output SQNR)."""
    a, b = candidate.metrics.get(primary), current.metrics.get(primary)
    return _better(primary, a, b) or (a == b and (candidate.metrics.get("sqnr_db") or 0) > (current.metrics.get("sqnr_db") or 0))


def partial_quantization(
    ev: Evaluator, best: EngineResult, max_float: int, *, out: Path, graph: Path | None = None,
    max_share: float = 1.0, max_latency_increase: float | None = None,
) -> tuple[Rung, EngineResult | None]:
    """Greedy fallback of the most sensitive layers of ``best`` out of INT8 (see the module docstring).

    ``graph`` is the FP32 graph ``best`` was quantized from (default: the run's).  A ``tensorrt``
    engine's layers go to FP16 (:func:`quantlab.qdq.keep.keep_fp16`, what TensorRT builds), an
    ``ort-cpu`` engine's to FP32 (:func:`quantlab.qdq.keep.keep_float`).  At most ``max_float``
    layers and ``max_share`` of the quantized layers; with ``max_latency_increase`` (a fraction), a
    step whose model is slower at batch 1 than ``best`` by more than that (timed in turn with it,
    :func:`paired_latency`) ends the rung before it is kept.
    """
    import onnx

    from quantlab.qdq.keep import keep_float, keep_fp16

    t0 = time.perf_counter()
    primary = ev.primary
    graph = graph or ev.graph_path
    fp32_model = onnx.load(str(graph))  # the graph the INT8 model was quantized from
    int8_model = onnx.load(str(ev.run_dir / best.path))
    keep, precision = (keep_fp16, "FP16") if best.target == "tensorrt" else (keep_float, "FP32")
    layers = analyse_layers(ev.config, graph, ev.run_dir / best.path, best.name, ev.data, ev.output,
                            ev.reference[ev.output])
    ev.layers = layers  # the report shows them beside the ladder
    ranked = [r["node"] for r in layers["rows"] if r.get("sensitivity") is not None]
    total = len(layers["rows"])
    cap = min(max_float, math.floor(max_share * total + 1e-9))
    state = _Partial([], best)
    scratch = out.parent / f".{out.stem}.candidate.onnx"
    for node in ranked:
        if state.current.tolerance_ok:
            break
        if len(state.kept) >= cap:
            state.stop = (f"stopped at the cap: {len(state.kept)} of {total} quantized layers out of INT8 "
                          f"(tune.max_float_layers = {max_float}, tune.max_float_share = {max_share})")
            break
        state.tried += 1
        onnx.save(keep(int8_model, fp32_model, [*state.kept, node]), str(scratch))
        candidate = ev.evaluate(EngineSpec("candidate", "int8", str(scratch)), latency=False)
        if not _accept(primary, candidate, state.current):
            continue  # undo: the node stays quantized
        if max_latency_increase is not None:
            base_ms, cand_ms = paired_latency(ev, ev.run_dir / best.path, scratch, ev.config.compare.latency_runs or 20)
            state.stop = latency_exceeded(node, base_ms, cand_ms, max_latency_increase)
            if state.stop:
                break
            state.latency = (base_ms, cand_ms)
        state.kept.append(node)
        state.current = candidate
    scratch.unlink(missing_ok=True)
    return _partial_result(ev, best, state, keep(int8_model, fp32_model, state.kept) if state.kept else None,
                           out, precision, t0)


def _partial_result(ev: Evaluator, best: EngineResult, state: _Partial, model: Any, out: Path, precision: str,
                    t0: float) -> tuple[Rung, EngineResult | None]:
    """The partial rung's record, and its engine evaluated in full (latency included) when a layer was kept."""
    import onnx

    primary = ev.primary
    stop = f"; {state.stop}" if state.stop else ""
    if model is None:
        detail = state.stop if not state.tried else \
            f"keeping none of the {state.tried} most sensitive layers in {precision} improved {primary}{stop}"
        rung = Rung("partial", "fail", primary, best.metrics.get(primary), ev.fp32.metrics.get(primary), best.name,
                    detail, seconds=time.perf_counter() - t0)
        return rung.measured(best), None
    onnx.save(model, str(out))
    rel = out.relative_to(ev.run_dir).as_posix()
    final = ev.evaluate(EngineSpec(f"int8:partial.{best.target}", "int8", rel, "partial", best.target))
    cost = f"; size {best.size_mb:.1f} -> {final.size_mb:.1f} MB"
    b1, f1 = _batch1_ms(best), _batch1_ms(final)
    if b1 and f1:
        cost += f", latency {b1:.2f} -> {f1:.2f} ms at batch 1"
    if state.latency:
        cost += f" ({state.latency[0]:.2f} -> {state.latency[1]:.2f} ms timed in turn)"
    status = "pass" if final.tolerance_ok else "fail"
    detail = (f"{len(state.kept)} of {state.tried} tried layers kept in {precision} ({', '.join(state.kept)}): "
              f"{_summary(final)}{cost}{stop}")
    rung = Rung("partial", status, primary, final.metrics.get(primary), ev.fp32.metrics.get(primary), final.name,
                detail, list(state.kept), time.perf_counter() - t0)
    return rung.measured(final), final


@dataclass
class _Ladder:
    """What the rungs share: the evaluator, the engines so far, the records, the best engine and its graph."""

    config: Config
    ev: Evaluator
    engines: list[EngineResult]
    rungs: list[Rung]
    best: EngineResult
    graph: Path
    final: EngineResult | None = None

    @property
    def primary(self) -> str:
        return self.ev.primary

    def add(self, rung: Rung, engine: EngineResult | None) -> None:
        """Record a rung; its engine joins the results and becomes the best when it is."""
        self.rungs.append(rung)
        if engine is None:
            return
        self.engines.append(engine)
        if engine.tolerance_ok and self.final is None:
            self.final = engine


def _check_tune(config: Config) -> None:
    """Everything the ladder needs from the config, said before anything runs."""
    check(config.tolerance, "quantlab tune needs a tolerance to aim for: add a [tolerance] section (e.g. top1 = 0.01)")
    check(
        config.tune.target in config.ptq.targets,
        f"tune.target '{config.tune.target}' is not among ptq.targets ({', '.join(config.ptq.targets)}): add it",
    )
    if config.tune.qat != "off":
        from quantlab.qat.train import qat_source

        qat_source(config)  # a QAT source the config cannot give: say so before anything runs


def _sweep(config: Config, progress: Any) -> _Ladder:
    """Rung 1: PTQ with every calibrator, every engine compared; the best of ``tune.target``."""
    from quantlab.ptq import run_ptq

    t0 = time.perf_counter()
    ptq = run_ptq(override(config, "ptq", report=False), progress=progress)  # the report comes at the end
    ev = Evaluator(config, ptq.run_dir)
    engines = [ev.evaluate(spec) for spec in ev.specs]
    compare = ev.result(engines)
    primary = ev.primary
    ranked = rank_engines([e for e in compare.int8 if e.target == config.tune.target], primary)
    passing = [e for e in ranked if e.tolerance_ok]
    best = passing[0] if passing else ranked[0]
    detail = ", ".join(f"{e.calibrator} {e.metrics.get(primary)}" for e in ranked)
    rung = Rung("calibrator-sweep", "pass" if passing else "fail", primary, best.metrics.get(primary),
                ev.fp32.metrics.get(primary), best.name, f"{detail}; best {best.calibrator}: {_summary(best)}",
                seconds=time.perf_counter() - t0).measured(best)
    return _Ladder(config, ev, engines, [rung], best, ev.graph_path, best if passing else None)


def _recipes_rung(ladder: _Ladder, progress: Any) -> None:
    """Rung 2: PTQ after graph transforms; a better engine replaces the best, with the graph it comes from."""
    if not ladder.config.tune.recipes:
        ladder.add(Rung("recipes", "skipped", ladder.primary, detail="tune.recipes is empty"), None)
        return
    rung, recipe, recipe_graph = recipes(ladder.config, ladder.ev, ladder.best, progress)
    ladder.add(rung, recipe)
    if recipe is not None and _pick([ladder.best, recipe], ladder.primary) is recipe:
        ladder.best, ladder.graph = recipe, recipe_graph


def _partial_rung(ladder: _Ladder, progress: Any) -> None:
    """Rung 3: the most sensitive layers out of INT8, within the caps of ``[tune]``."""
    t = ladder.config.tune
    best = ladder.best
    if best.target == "ort-dynamic":
        ladder.add(Rung("partial", "skipped", ladder.primary, detail="ort-dynamic has no Q/DQ to keep in float: "
                        "set tune.target = \"ort-cpu\" for partial quantization"), None)
        return
    if t.max_float_layers == 0 or (t.max_float_share == 0 and best.target == "tensorrt"):
        ladder.add(Rung("partial", "skipped", ladder.primary,
                        detail="tune.max_float_layers = 0" if t.max_float_layers == 0 else "tune.max_float_share = 0"), None)
        return
    # ort-cpu engines are timed here: latency is their cap; tensorrt models are not meant for the CPU: the share is
    timed = best.target == "ort-cpu"
    rung, partial = partial_quantization(ladder.ev, best, t.max_float_layers, out=ladder.ev.run_dir / "int8" /
                                         f"partial.{best.target}.onnx", graph=ladder.graph,
                                         max_share=1.0 if timed else t.max_float_share,
                                         max_latency_increase=t.max_latency_increase if timed else None)
    ladder.add(rung, partial)


def _qat_step(ladder: _Ladder, progress: Any) -> None:
    """Rung 4: quantization-aware training, unless ``tune.qat`` is off."""
    if ladder.config.tune.qat == "off":
        ladder.add(Rung("qat", "skipped", ladder.primary, detail="tune.qat = \"off\""), None)
        return
    rung, engine = _qat_rung(ladder.config, ladder.ev, ladder.best, ladder.ev.run_dir, progress)
    ladder.add(rung.measured(engine), engine)


_RUNGS = (("recipes", _recipes_rung), ("partial", _partial_rung), ("qat", _qat_step))


def run_tune(config: Config, *, progress: Any = None) -> TuneResult:
    """PTQ, compare, then escalate only as far as needed; writes tune.json and the report."""
    _check_tune(config)
    ladder = _sweep(config, progress)
    for name, step in _RUNGS:
        if ladder.final is None:
            step(ladder, progress)
        else:
            ladder.add(Rung(name, "skipped", ladder.primary, detail="not needed: the tolerance already holds"), None)
    ev = ladder.ev
    compare = ev.result(ladder.engines)
    compare.layers = getattr(ev, "layers", None)
    final = ladder.final
    result = TuneResult(ev.run_dir, config.model.display_name, ladder.primary, ladder.rungs,
                        final.name if final else None, compare)
    _write(ev.run_dir, result, compare)
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
    seen: dict[str, str] = {}  # the transforms that applied -> the recipe that quantized that model
    for recipe in config.tune.recipes:
        label = "+".join(ordered(recipe))
        t1 = time.perf_counter()
        cfg = override(config, "ptq", transforms=tuple(recipe), targets=(config.tune.target,), out=str(folder),
                       run_name=label, report=False, latency_runs=0)
        _, done = transform_model(cfg, prepared, sorted(cfg.ptq.exclude))  # cached: run_ptq reuses it
        if not any(t.applied for t in done):
            notes.append(f"{label}: not applicable ({'; '.join(t.detail for t in done)})")
            continue
        applied = "+".join(t.name for t in done if t.applied)
        if applied in seen:  # a transform that did not apply leaves the model of an earlier recipe
            idle = ", ".join(t.name for t in done if not t.applied)
            notes.append(f"{label}: the model of {seen[applied]} ({idle} does not apply), not quantized again")
            continue
        seen[applied] = label
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
                detail, seconds=time.perf_counter() - t0).measured(final)
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
