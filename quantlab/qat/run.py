"""QAT of a PTQ run folder: what ``quantlab qat`` and ``tune``'s QAT rung run.

A run folder written by ``quantlab ptq`` holds what QAT starts from: the statistics of the one
calibration pass (``stats.npz``), the prepared FP32 graph (``model_fp32.onnx``) and, per
calibrator, the ``tensorrt`` Q/DQ model (``int8/<calibrator>.tensorrt.onnx``).  :func:`qat_run`
turns the chosen calibrator's statistics into ranges, trains (:func:`quantlab.qat.run_qat`) with
the quantizers where that Q/DQ model has them, scores the start and every epoch with the same
evaluation harness as ``quantlab compare`` (FP32 outputs on the evaluation set, the primary metric,
``[tolerance]``), stops at the tolerance or on a plateau, and writes into the run folder:

* ``int8/qat.tensorrt.onnx``: the best epoch's Q/DQ model, listed in ``manifest.json`` as engine
  ``int8:qat.tensorrt`` so ``quantlab compare`` and ``quantlab report`` take it up;
* ``qat.json``: the start and per-epoch metrics (the primary one, and every metric of each epoch
  under ``per_epoch``), losses, the stop reason, the learned ranges' movement, the checks.

Nothing is written until the checks that need no training have passed (device, statistics,
calibrator, training data), and the model and ``qat.json`` are each written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantlab.artefacts import Artefact, dumps_json, update_manifest, write_text
from quantlab.compare.harness import EngineResult, EngineSpec, Evaluator, default_run_dir, read_manifest
from quantlab.compare.metrics import higher_is_better
from quantlab.config import CALIBRATOR_NAMES, Config
from quantlab.errors import check

MODEL = "int8/qat.tensorrt.onnx"
ENGINE = "int8:qat.tensorrt"


@dataclass
class QatRunResult:
    """What :func:`qat_run` did: truthy when the QAT model meets the tolerance (when there is one)
    and passes TensorRT's Q/DQ rules."""

    run_dir: Path
    calibrator: str
    primary: str
    reference: float | None
    start: EngineResult | None
    final: EngineResult
    qat: Any  # QatResult
    seconds: float
    per_epoch: list[dict[str, float]] = field(default_factory=list)

    @property
    def tolerance_ok(self) -> bool | None:
        return self.final.tolerance_ok

    def __bool__(self) -> bool:
        return self.final.tolerance_ok is not False and bool(self.qat)

    @property
    def worse_than_start(self) -> bool:
        """Whether no epoch beat the PTQ model QAT started from (on the primary metric)."""
        if self.start is None:
            return False
        a, b = self.final.metrics.get(self.primary), self.start.metrics.get(self.primary)
        if a is None or b is None:
            return False
        return bool(a < b if higher_is_better(self.primary) else a > b)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; measured times are left to :meth:`timing` (``timing.json``)."""
        q = self.qat.to_dict()
        q["path"] = MODEL
        for key in ("seconds", "epoch_seconds"):
            q.pop(key)
        return {
            "calibrator": self.calibrator, "primary": self.primary, "fp32": self.reference,
            "start": None if self.start is None else {"engine": self.start.name, "value": self.start.metrics.get(self.primary)},
            "final": {"engine": ENGINE, "value": self.final.metrics.get(self.primary),
                      "tolerance_ok": self.final.tolerance_ok,
                      "failures": [f.explain() for f in self.final.failures]},
            "ok": bool(self), "worse_than_start": self.worse_than_start, "qat": q, "per_epoch": self.per_epoch,
        }

    def timing(self) -> dict[str, Any]:
        return {"seconds": self.qat.to_dict()["seconds"], "epoch_seconds": self.qat.epoch_seconds,
                "total_seconds": round(self.seconds, 3)}

    def __str__(self) -> str:
        p, q = self.primary, self.qat
        start = "-" if self.start is None else f"{self.start.metrics.get(p):.4f} ({self.start.name})"
        final = self.final.metrics.get(p)
        lines = [
            f"QAT of {self.run_dir.name} from {self.calibrator} ranges ({q.source} graph, {q.device}): {p}",
            f"  start {start}  ->  QAT {final:.4f} (epoch {q.best_epoch} of {q.epochs}), FP32 {self.reference}",
            "  per epoch: " + ", ".join(f"{m:.4f}" for m in q.metrics),
            f"  {q.steps} steps in {sum(q.epoch_seconds) / 60:.1f} min, {q.seconds.get('train_step', 0) * 1000:.0f} ms/step; "
            f"stopped: {q.stop}; quantizers {q.mapped} of {q.quantizers} from quantlab's ranges; TensorRT rules: {q.tensorrt_rules}",
        ]
        if q.ranges.get("learned"):
            r = q.ranges
            lines.append(f"  learned ranges ({r['mode']}): {r['learned']} quantizers, step / start: median "
                         f"{r['median_ratio']:.3f}, from {r['min_ratio']:.3f} to {r['max_ratio']:.3f}")
        if self.worse_than_start:
            lines.append(f"  QAT did not beat its PTQ start: {self.start.name} stays the better model of the two")
        if q.device == "cpu":
            lines.append(f"  on the CPU: {q.seconds.get('train_step', 0.0):.1f} s per step; one H200 ran the bundled "
                         "models' steps in 0.07-0.3 s (README, QAT measured on the GPU): use --device cuda there")
        if self.final.tolerance_ok is None:
            lines.append("no [tolerance] to judge by")
        elif self.final.tolerance_ok:
            lines.append("tolerance met")
        else:
            lines.append("tolerance NOT met: " + "; ".join(f.explain() for f in self.final.failures))
        lines.append(f"model: {self.run_dir / MODEL}")
        return "\n".join(lines)


def default_calibrator(config: Config, run: Path) -> str:
    """The calibrator QAT starts from: the best ``tensorrt`` engine of the run's ``compare.json``,
    else the first configured calibrator whose ``tensorrt`` model the run holds."""
    compare = run / "compare.json"
    if compare.is_file():
        data = json.loads(compare.read_text(encoding="utf-8"))
        primary = data.get("primary")
        rows = [e for e in data.get("engines", []) if e.get("target") == "tensorrt"
                and e.get("calibrator") in CALIBRATOR_NAMES and e.get("metrics", {}).get(primary) is not None]
        if rows:
            sign = 1 if higher_is_better(primary) else -1
            return max(rows, key=lambda e: sign * e["metrics"][primary])["calibrator"]
    for name in config.ptq.calibrators:
        if (run / "int8" / f"{name}.tensorrt.onnx").is_file():
            return name
    return config.ptq.calibrators[0]


def qat_run(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    calibrator: str | None = None,
    evaluator: Evaluator | None = None,
    progress: Any = None,
    on_epoch: Callable[[Any], None] | None = None,
) -> QatRunResult:
    """QAT of the run folder ``run_dir`` (default: the config's); see the module docstring."""
    from quantlab.compare.tolerance import evaluate as judge
    from quantlab.qat.train import qat_source, run_qat

    t0 = time.perf_counter()
    run = Path(run_dir) if run_dir is not None else default_run_dir(config)
    name, train, amax = _checked_inputs(config, run, calibrator)
    source = qat_source(config)
    placement = run / "int8" / f"{name}.tensorrt.onnx"

    ev = evaluator or Evaluator(config, run)
    if ev.fp32 is None:
        ev.evaluate(ev.specs[0], latency=False)
    primary = ev.primary
    start = None
    if placement.is_file():
        start = ev.evaluate(EngineSpec(f"int8:{name}.tensorrt", "int8", placement.relative_to(run).as_posix(), name,
                                       "tensorrt"), latency=False)
    history: list[EngineResult] = []

    def evaluate(path: Path) -> float:
        e = ev.evaluate(EngineSpec("qat-epoch", "int8", str(path)), latency=False)
        history.append(e)
        v = e.metrics.get(primary)
        return float("nan") if v is None else float(v)

    def good_enough(_: float) -> bool:
        return bool(ev.tolerance) and bool(history) and not judge(ev.tolerance, history[-1].metrics, ev.fp32.metrics)

    qat = run_qat(
        config, amax=amax, out=run / MODEL, train=train, evaluate=evaluate, good_enough=good_enough, progress=progress,
        model=run / "model_fp32.onnx", placement=placement if (source == "onnx" and placement.is_file()) else None,
        higher_is_better=higher_is_better(primary), on_epoch=on_epoch,
    )
    final = ev.evaluate(EngineSpec(ENGINE, "int8", MODEL, "qat", "tensorrt"))
    per_epoch = [{k: v for k, v in e.metrics.items() if isinstance(v, (int, float))} for e in history]
    result = QatRunResult(run, name, primary, ev.fp32.metrics.get(primary), start, final, qat,
                          time.perf_counter() - t0, per_epoch)
    _write_records(run, result)
    return result


def _checked_inputs(config: Config, run: Path, calibrator: str | None) -> tuple[str, Any, dict[str, float]]:
    """The checks that need no training, before anything is written: the device, the run folder's
    statistics and FP32 model, the calibrator, the first training batch.  Returns the calibrator,
    the training batches and the calibrator's ranges (amax by tensor)."""
    from quantlab.calibrators import get_calibrator
    from quantlab.model import input_specs
    from quantlab.qat.train import _resolve_device, activation_amax, qat_source, training_data
    from quantlab.stats import StatsSet

    _resolve_device(config.qat.device)  # no GPU for --device cuda: say so before anything loads
    read_manifest(run)
    check((run / "stats.npz").is_file(),
          f"run folder '{run}' has no stats.npz: QAT starts from a PTQ run's statistics; run quantlab ptq first")
    fp32 = run / "model_fp32.onnx"
    check(fp32.is_file(), f"run folder '{run}' has no model_fp32.onnx: run quantlab ptq again")
    name = calibrator or default_calibrator(config, run)
    check(name in CALIBRATOR_NAMES, f"unknown calibrator '{name}': choose one of {', '.join(CALIBRATOR_NAMES)}")
    qat_source(config)
    train = training_data(config, input_specs(fp32))
    first = next(iter(train), None)  # reads (and checks) the first batch before anything is written
    check(first is not None, "the QAT training data is empty: point [qat] data (or [data] calib) at a folder with samples")
    stats = StatsSet.load(run / "stats.npz")
    amax = activation_amax(stats, get_calibrator(name, percentile=config.ptq.percentile))
    return name, train, amax


def _write_records(run: Path, result: QatRunResult) -> None:
    """``qat.json`` and the ``qat`` entry of ``timing.json``, each written atomically, and the manifest."""
    timing_path = run / "timing.json"
    timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
    timing["qat"] = result.timing()
    for file, payload in (("qat.json", result.to_dict()), ("timing.json", timing)):
        tmp = run / f".{file}.tmp"
        write_text(tmp, dumps_json(payload))
        tmp.replace(run / file)
    update_manifest(run, [Artefact(MODEL, "model-int8-qdq", "qat", "tensorrt"), Artefact("qat.json", "qat"),
                          Artefact("timing.json", "timing")])


__all__ = ["ENGINE", "MODEL", "QatRunResult", "default_calibrator", "qat_run"]
