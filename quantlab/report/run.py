"""A run folder as a Python object: what the HTML report, ``summary.md`` and notebooks all read.

``load_run(path)`` reads a run folder written by ``quantlab ptq`` (and, when present, the
``compare.json``, ``latency.json`` and ``tune.json`` of ``quantlab compare`` and ``quantlab tune``).
Every file but ``manifest.json`` is optional.

Per tensor and calibrator the threshold is the calibrator's ``amax`` (exactly as the Q/DQ models
got it, through :func:`quantlab.qdq.targets.compute_ranges`).  Two numbers say what that threshold
costs, both read off the ``|x|`` histograms of ``stats.npz`` without running the model:

* the **clipped mass**: the fraction of elements beyond the quantization range ``[lo, hi]`` (the bins
  whose lower edge is at or past the bound: exact, as every calibrator's threshold is a bin edge or
  ``max|x|``);
* the **SQNR**: each bin stands for its centre ``c_k = (k + 1/2) w`` with its count (``+c_k`` for the
  positive histogram, ``-c_k`` for the negative one, never beyond the observed min and max); the centre is fake-quantized with the target's
  scheme (S8 symmetric ``s = amax / 127``, or U8 ``s = (hi - lo) / 255`` with zero-point
  ``round(-lo / s)``), saturating at the ends, and

      SQNR = 10 log10( sum_k h_k c_k^2 / sum_k h_k (c_k - q(c_k))^2 )      [dB]

  The bin-centre approximation is the one the ``mse`` calibrator makes; bins are at least 8 times
  narrower than the quantization step for any threshold a calibrator returns.

Which calibrator won: by the primary metric of ``compare.json`` when the run has one (its ``best``
engine), otherwise by the mean histogram SQNR over the calibrated tensors of the primary target
(``tensorrt`` when the run has it).  :attr:`Run.winner` says which basis it used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantlab.errors import QuantlabError, check
from quantlab.stats import StatsSet, TensorStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from quantlab.calibrators import Calibrator
    from quantlab.calibrators.entropy import EntropySearch
    from quantlab.qdq.targets import TensorRange

# SQNR values are capped here (an exact quantization has infinite SQNR), as in ``summary.json``.
SQNR_CAP_DB = 999.0


@dataclass(frozen=True)
class TensorQuality:
    """What one threshold does to one tensor's distribution (see the module docstring)."""

    amax: float
    lo: float
    hi: float
    clipped: float  # fraction of elements outside [lo, hi]
    sqnr_db: float | None  # None for an all-zero tensor (no signal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "amax": _round(self.amax, 7), "lo": _round(self.lo, 7), "hi": _round(self.hi, 7),
            "clipped": _round(self.clipped, 9), "sqnr_db": _round(self.sqnr_db, 2),
        }


@dataclass(frozen=True)
class Winner:
    """The calibrator that won, on which target, and on what evidence."""

    calibrator: str
    target: str
    engine: str | None  # the compare.json engine name when the verdict comes from compare.json
    basis: str  # "compare" or "histogram-sqnr"
    detail: str  # one sentence for people

    def to_dict(self) -> dict[str, Any]:
        return {"calibrator": self.calibrator, "target": self.target, "engine": self.engine,
                "basis": self.basis, "detail": self.detail}


def _round(value: float | None, digits: int) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    return float(f"{value:.{digits}g}") if digits > 4 else round(value, digits)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise QuantlabError(f"'{path}' is not readable JSON ({exc}): re-run the command that writes it") from None


def calibrator_label(calibrator: "str | Calibrator") -> str:
    """``"minmax"``, or ``"percentile 99.9"`` for a percentile calibrator."""
    if isinstance(calibrator, str):
        return calibrator
    p = getattr(calibrator, "percentile", None)
    return calibrator.name if p is None else f"{calibrator.name} {p:g}"


def limit_note(row: dict[str, Any]) -> str | None:
    """One sentence on what a calibrator's clip limit did, from a :meth:`Run.compare_calibrators` row.

    ``None`` when the calibrator has no limit or the limit moved no threshold.
    """
    worst = row.get("limited_worst")
    if not row.get("limited") or worst is None:
        return None
    fraction = worst["clipped_without_limit"]
    limit = worst.get("max_clipped")
    rule = f" (at most {limit:g} of the values clipped)" if limit is not None else ""
    return (f"{row['calibrator']} on {row['target']}: the clip limit{rule} moved {row['limited']} of {row['tensors']} "
            f"thresholds; the search alone would have clipped {fraction:.3%} of the values of {worst['tensor']}.")


def fake_quant_quality(st: TensorStats, lo: float, hi: float, symmetric: bool) -> tuple[float, float | None]:
    """``(clipped fraction, SQNR in dB)`` of quantizing ``st``'s histogram to ``[lo, hi]``.

    >>> st = TensorStats.from_array("t", np.array([0.25, 0.5, 0.75, 3.0]), nbins=8)
    >>> clipped, sqnr = fake_quant_quality(st, -1.0, 1.0, symmetric=True)
    >>> clipped, round(sqnr, 1)   # 3.0 saturates at 1.0
    (0.25, 4.1)
    >>> fake_quant_quality(st, -3.0, 3.0, symmetric=True)[0]   # the max itself is not clipped
    0.0
    """
    if st.count == 0 or st.range == 0.0:
        return 0.0, None
    lower = np.arange(st.nbins, dtype=np.float64) * st.bin_width
    centres = lower + 0.5 * st.bin_width
    # a bin's elements stand at its centre, but never beyond the observed extremes
    values = np.concatenate([np.minimum(centres, max(st.max, 0.0)), np.maximum(-centres, min(st.min, 0.0))])
    # elements certainly outside [lo, hi]: every bin whose lower edge is at or beyond the bound
    # (exact for every calibrator here: their thresholds are bin edges or max|x|)
    beyond = np.concatenate([(lower >= hi) & (hi < st.max), (lower >= -lo) & (lo > st.min)]) & np.tile(lower > 0, 2)
    counts = np.concatenate([st.hist_pos, st.hist_neg]).astype(np.float64)
    keep = counts > 0
    values, counts, beyond = values[keep], counts[keep], beyond[keep]
    if symmetric:
        scale = hi / 127.0 if hi > 0 else 1.0
        q = np.clip(np.round(values / scale), -128, 127) * scale
    else:
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zero_point = float(np.clip(np.round(-lo / scale), 0, 255))
        q = (np.clip(np.round(values / scale) + zero_point, 0, 255) - zero_point) * scale
    total = counts.sum()
    clipped = float(counts[beyond].sum() / total)
    signal = float(counts @ (values * values))
    noise = float(counts @ ((values - q) ** 2))
    if signal == 0.0:
        return clipped, None
    sqnr = SQNR_CAP_DB if noise == 0.0 else min(10.0 * math.log10(signal / noise), SQNR_CAP_DB)
    return clipped, sqnr


class Run:
    """A run folder, loaded lazily.  Build it with :func:`load_run`.

    Attributes:
        path: the run folder.
        manifest: ``manifest.json`` (always present).
        summary: ``summary.json`` or ``{}``.
        timing: ``timing.json`` or ``None`` (measured times: they differ run to run).
        config: ``config.json`` (the effective config) or ``None``.
        compare: ``compare.json`` (``quantlab compare``) or ``None``.
        latency: ``latency.json`` (``quantlab compare``) or ``None``.
        tune: ``tune.json`` (``quantlab tune``, the escalation ladder) or ``None``.
        qat: ``qat.json`` (``quantlab qat``: start, per-epoch metrics, stop) or ``None``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        check(
            self.path.is_dir(),
            f"run folder '{self.path}' does not exist: pass the folder 'quantlab ptq' wrote (reports/<run>) to --run",
        )
        check(
            (self.path / "manifest.json").is_file(),
            f"'{self.path}' holds no manifest.json, so it is not a quantlab run folder: "
            "pass the folder 'quantlab ptq' wrote (reports/<run>) or run 'quantlab ptq' first",
        )
        self.manifest: dict[str, Any] = _read_json(self.path / "manifest.json")
        self.summary: dict[str, Any] = self._optional("summary.json") or {}
        self.timing: dict[str, Any] | None = self._optional("timing.json")
        self.config: dict[str, Any] | None = self._optional("config.json")
        self.compare: dict[str, Any] | None = self._optional("compare.json")
        self.latency: dict[str, Any] | None = self._optional("latency.json")
        self.tune: dict[str, Any] | None = self._optional("tune.json")
        self.qat: dict[str, Any] | None = self._optional("qat.json")
        self._quality: dict[tuple[str, str], dict[str, TensorQuality]] = {}

    def _optional(self, name: str) -> Any:
        p = self.path / name
        return _read_json(p) if p.is_file() else None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.model!r})"

    # -- what the run was -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        m = self.manifest.get("model", {})
        return str(m.get("name") or self.summary.get("model") or self.path.name)

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.manifest.get("calibration", {}))

    @property
    def calibrators(self) -> list[str]:
        """The calibrators of the run (every known one when the manifest does not say)."""
        from quantlab.calibrators import CALIBRATORS

        return list(self.calibration.get("calibrators") or CALIBRATORS)

    @property
    def targets(self) -> list[str]:
        from quantlab.qdq.targets import TARGETS

        return [t for t in (self.calibration.get("targets") or TARGETS) if t in TARGETS]

    @property
    def percentile(self) -> float:
        return float(self.calibration.get("percentile") or 99.99)

    @property
    def primary_target(self) -> str:
        """The target the verdict and the worst-tensor ranking are about."""
        if self.compare and self.compare.get("best"):
            target = _engine_parts(self.compare["best"])[1]
            if target in self.targets:
                return target
        return "tensorrt" if "tensorrt" in self.targets else self.targets[0]

    @cached_property
    def stats(self) -> StatsSet:
        """The statistics of the calibration pass (``stats.npz``)."""
        p = self.path / "stats.npz"
        check(p.is_file(), f"'{self.path}' holds no stats.npz: re-run 'quantlab ptq' to write the statistics")
        return StatsSet.load(p)

    @property
    def has_stats(self) -> bool:
        return (self.path / "stats.npz").is_file()

    @cached_property
    def scales(self) -> list[dict[str, Any]]:
        """The rows of ``scales.json``: per calibrator and target, every activation and weight."""
        p = self.path / "scales.json"
        return list(_read_json(p)) if p.is_file() else []

    # -- thresholds and what they cost -------------------------------------------------------------

    def calibrator(self, calibrator: "str | Calibrator") -> "Calibrator":
        """A calibrator object; a name gets the run's own settings (its percentile)."""
        from quantlab.calibrators import get_calibrator

        return get_calibrator(calibrator, percentile=self.percentile) if isinstance(calibrator, str) else calibrator

    def ranges(self, calibrator: "str | Calibrator", target: str = "tensorrt") -> dict[str, "TensorRange"]:
        """``{tensor: TensorRange}`` for every calibrated tensor, as the Q/DQ model of ``target`` got it."""
        from quantlab.qdq.targets import TARGETS, compute_ranges

        check(target in TARGETS, f"unknown target '{target}': choose one of {', '.join(TARGETS)}")
        stats = self.stats
        ranges = compute_ranges(stats, self.calibrator(calibrator), TARGETS[target])
        return {name: ranges[name] for name in stats.tensors}

    def thresholds(self, calibrator: "str | Calibrator", target: str = "tensorrt") -> dict[str, float]:
        """``{tensor: amax}``: the calibrator's clipping threshold of every calibrated tensor.

        ``run.thresholds(get_calibrator("percentile", percentile=99.9))`` tries another percentile
        on the run's statistics, without running the model.
        """
        return {name: r.amax for name, r in self.ranges(calibrator, target).items()}

    def quality(self, calibrator: "str | Calibrator", target: str = "tensorrt") -> dict[str, TensorQuality]:
        """``{tensor: TensorQuality}``: threshold, clipped mass and histogram SQNR of every tensor."""
        from quantlab.qdq.targets import TARGETS

        key = (repr(self.calibrator(calibrator)), target)
        if key not in self._quality:
            symmetric = TARGETS[target].symmetric if target in TARGETS else True
            out = {}
            for name, r in self.ranges(calibrator, target).items():
                clipped, sqnr = fake_quant_quality(self.stats.tensors[name], r.lo, r.hi, symmetric)
                out[name] = TensorQuality(r.amax, r.lo, r.hi, clipped, sqnr)
            self._quality[key] = out
        return self._quality[key]

    def limited(self, calibrator: "str | Calibrator", target: str = "tensorrt") -> dict[str, "EntropySearch"] | None:
        """``{tensor: search}`` for the tensors whose threshold a clip limit moved (the ``entropy`` guard).

        ``None`` for a calibrator without a clip limit.  Each :class:`~quantlab.calibrators.entropy.EntropySearch`
        holds the threshold and the one the search would have given without the limit.
        """
        from quantlab.qdq.targets import TARGETS

        cal = self.calibrator(calibrator)
        search = getattr(cal, "search", None)
        if search is None:
            return None
        tgt = TARGETS[target]
        found = {name: search(st, unsigned=tgt.uses_unsigned(st.min)) for name, st in self.stats.tensors.items()}
        return {name: s for name, s in found.items() if s.limited}

    def compare_calibrators(self, calibrators: "list[str | Calibrator] | None" = None,
                            target: str | None = None) -> list[dict[str, Any]]:
        """One row per calibrator: mean and worst histogram SQNR over the tensors, mean clipped mass.

        Rows are sorted best first (highest mean SQNR).  For a calibrator with a clip limit,
        ``limited`` counts the thresholds it moved and ``limited_worst`` names the tensor the search
        alone would have clipped most (with that fraction); both ``None`` for the others.
        """
        target = target or self.primary_target
        rows = []
        for c in calibrators or self.calibrators:
            q = self.quality(c, target)
            sqnrs = [v.sqnr_db for v in q.values() if v.sqnr_db is not None]
            worst = min(q, key=lambda n: _sort_sqnr(q[n].sqnr_db)) if q else None
            limited = self.limited(c, target)
            most = max(sorted(limited), key=lambda n: limited[n].unlimited_clipped) if limited else None
            rows.append({
                "calibrator": calibrator_label(c), "target": target,
                "mean_sqnr_db": _round(float(np.mean(sqnrs)), 2) if sqnrs else None,
                "min_sqnr_db": _round(min(sqnrs), 2) if sqnrs else None,
                "worst_tensor": worst,
                "mean_clipped": _round(float(np.mean([v.clipped for v in q.values()])), 6) if q else None,
                "tensors": len(q),
                "limited": None if limited is None else len(limited),
                "limited_worst": None if most is None else {
                    "tensor": most, "clipped_without_limit": _round(limited[most].unlimited_clipped, 6),
                    "max_clipped": getattr(self.calibrator(c), "max_clipped", None),
                },
            })
        rows.sort(key=lambda r: -(r["mean_sqnr_db"] if r["mean_sqnr_db"] is not None else -math.inf))
        return rows

    @cached_property
    def winner(self) -> Winner | None:
        """The winning calibrator (see the module docstring); ``None`` without compare.json or stats."""
        if self.compare and self.compare.get("best"):
            best = str(self.compare["best"])
            calibrator, target = _engine_parts(best)
            primary = self.compare.get("primary") or "the primary metric"
            engine = next((e for e in self.compare.get("engines", []) if e.get("name") == best), {})
            value = (engine.get("metrics") or {}).get(primary)
            shown = f" ({primary} {value:.4g})" if isinstance(value, (int, float)) else ""
            return Winner(
                calibrator or best, target or self.primary_target, best, "compare",
                f"{best} is the best engine by {primary} on {self.compare.get('samples', '?')} evaluation "
                f"samples{shown} (compare.json)",
            )
        if not self.has_stats or not self.calibrators:
            return None
        rows = self.compare_calibrators()
        top = rows[0]
        return Winner(
            top["calibrator"], top["target"], None, "histogram-sqnr",
            f"{top['calibrator']} has the highest mean SQNR over the {top['tensors']} calibrated tensors "
            f"({top['mean_sqnr_db']:.1f} dB on {top['target']}), estimated from the calibration histograms; "
            "no compare.json yet: run 'quantlab compare' for measured accuracy",
        )

    def worst_tensors(self, n: int | None = 10, calibrator: "str | Calibrator | None" = None,
                      target: str | None = None) -> list[str]:
        """The ``n`` calibrated tensors with the lowest histogram SQNR (all when ``n`` is None).

        By default under the winning calibrator on the primary target.
        """
        if calibrator is None:
            won = self.winner.calibrator if self.winner else None
            # an engine of the escalation ladder (partial, qat) wins with no calibrator of its own
            calibrator = won if won in self.calibrators else self.calibrators[0]
        q = self.quality(calibrator, target or self.primary_target)
        order = sorted(q, key=lambda name: (_sort_sqnr(q[name].sqnr_db), name))
        return order if n is None else order[:n]

    # -- plots -------------------------------------------------------------------------------------

    def plot_histogram(self, tensor: str, ax: "Axes | None" = None,
                       calibrators: "list[str | Calibrator] | None" = None, target: str | None = None,
                       legend: bool = True) -> "Axes":
        """Draw the ``|x|`` histogram of ``tensor`` (log counts) with every calibrator's threshold.

        Without ``ax`` a new pyplot figure is made (for notebooks).  The legend gives, per
        calibrator, ``amax``, the clipped mass and the histogram SQNR on ``target``.
        """
        from quantlab.report.plots import draw_histogram

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(8, 3), layout="constrained")
        target = target or self.primary_target
        name = self.stats.folded.get(tensor, tensor)
        check(name in self.stats.tensors, f"unknown tensor '{tensor}': pick one of run.stats.names()")
        lines = []
        for c in calibrators or self.calibrators:
            q = self.quality(c, target)[name]
            lines.append((calibrator_label(c), q))
        draw_histogram(ax, self.stats.tensors[name], lines, target, legend=legend)
        return ax


def _engine_parts(engine: str) -> tuple[str | None, str | None]:
    """``"int8:entropy.ort-cpu"`` -> ``("entropy", "ort-cpu")``; ``(None, None)`` for fp32/fp16."""
    if not engine.startswith("int8:"):
        return None, None
    calibrator, _, target = engine[5:].partition(".")
    return calibrator, (target or None)


def _sort_sqnr(value: float | None) -> float:
    return math.inf if value is None else value


def load_run(path: str | os.PathLike[str]) -> Run:
    """Open a run folder (``reports/<run>``): one clear error when it is not one."""
    return Run(path)
