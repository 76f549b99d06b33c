"""``quantlab gate``: an accuracy regression gate for CI.

It quantizes and compares (or reuses a run with ``run_dir``), then checks every gated INT8 engine
(``[gate] engines``) against

1. the ``[tolerance]`` rules (the same ones ``quantlab compare`` applies), and
2. the stored baseline (``[gate] baseline``): no gated metric may be more than ``[gate] regression``
   worse than the baseline's value for the same engine.

Exit codes: 0 the gate passes, 1 it fails (the explanation names the metric, by how much, and the
most sensitive layers), 2 a user error.  It writes ``gate.json`` and ``gate.junit.xml`` (one test
case per engine and rule, which CI systems show natively) into the run folder.
``update_baseline=True`` records the current results as the new baseline instead of comparing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from quantlab.artefacts import dumps_json, write_text
from quantlab.compare.harness import CompareResult, EngineResult, read_manifest
from quantlab.compare.metrics import higher_is_better
from quantlab.config import Config
from quantlab.errors import QuantlabError, check

BASELINE_FORMAT = 1


@dataclass
class GateCheck:
    """One engine x rule outcome (a JUnit test case)."""

    engine: str
    name: str
    ok: bool
    message: str = ""


@dataclass
class GateResult:
    """What the gate decided; truthy when it passes."""

    run_dir: Path
    model: str
    engines: list[str]
    checks: list[GateCheck]
    baseline: str | None
    baseline_updated: bool = False
    worst_layers: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "ok": bool(self), "engines": self.engines, "baseline": self.baseline,
            "baseline_updated": self.baseline_updated, "metrics": self.metrics,
            "checks": [{"engine": c.engine, "name": c.name, "ok": c.ok, "message": c.message} for c in self.checks],
            "worst_layers": self.worst_layers,
        }

    def junit(self) -> str:
        cases = []
        for c in self.checks:
            body = "" if c.ok else f"<failure message={quoteattr(c.message)}>{escape(c.message)}</failure>"
            cases.append(f'    <testcase classname={quoteattr("quantlab.gate." + self.model)} '
                         f'name={quoteattr(c.engine + ": " + c.name)}>{body}</testcase>')
        failures = len(self.failures)
        head = (f'<testsuites tests="{len(self.checks)}" failures="{failures}">\n'
                f'  <testsuite name={quoteattr("quantlab gate " + self.model)} tests="{len(self.checks)}" '
                f'failures="{failures}" errors="0">')
        return '<?xml version="1.0" encoding="utf-8"?>\n' + "\n".join([head, *cases, "  </testsuite>", "</testsuites>"]) + "\n"

    def __str__(self) -> str:
        verdict = "PASS" if self else "FAIL"
        lines = [f"quantlab gate {verdict}: {self.model}, engines {', '.join(self.engines)}"]
        if self.baseline_updated:
            lines.append(f"baseline written: {self.baseline}")
        for c in self.checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.engine}: {c.name}" + ("" if c.ok else f": {c.message}"))
        if not self and self.worst_layers:
            lines.append("most sensitive layers (output SQNR with only that layer quantized):")
            for r in self.worst_layers:
                lines.append(f"  {r['node']} ({r['op']}): {r.get('sensitivity')} dB, own SQNR {r.get('own_sqnr_db')} dB")
            lines.append("try: quantlab tune (partial quantization keeps such layers in float)")
        lines.append(f"gate results: {self.run_dir / 'gate.json'}, {self.run_dir / 'gate.junit.xml'}")
        return "\n".join(lines)


def _gated(result: CompareResult, wanted: tuple[str, ...]) -> list[EngineResult]:
    if "all" in wanted:
        engines = result.int8
    else:
        engines = []
        names = {e.name: e for e in result.int8}
        for w in wanted:
            if w == "best":
                check(result.best is not None, "the run has no INT8 engine to gate: run quantlab ptq with a calibrator")
                engines.append(result.best)
            else:
                check(w in names, f"gate.engines names '{w}', which the run does not have: choose best, all or one of "
                                  f"{', '.join(names)}")
                engines.append(names[w])
    check(bool(engines), "the run has no INT8 engine to gate: run quantlab ptq with a calibrator")
    return list({e.name: e for e in engines}.values())


def load_baseline(path: Path, model_sha256: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"baseline '{path}' is not valid JSON ({exc}): regenerate it with --update-baseline") from None
    check(
        isinstance(data, dict) and data.get("format") == BASELINE_FORMAT and isinstance(data.get("engines"), dict),
        f"'{path}' is not a quantlab gate baseline: regenerate it with quantlab gate --update-baseline",
    )
    check(
        data.get("model_sha256") == model_sha256,
        f"baseline '{path}' was recorded for another model ({data.get('model', '?')}): point --baseline at this "
        "model's baseline or regenerate it with --update-baseline",
    )
    return data


def check_gate(
    config: Config,
    compare: CompareResult,
    *,
    baseline: str | Path | None = None,
    update_baseline: bool = False,
    write: bool = True,
) -> GateResult:
    """Apply the gate to a comparison; write gate.json, gate.junit.xml (and the baseline when asked)."""
    run = compare.run_dir
    manifest = read_manifest(run)
    sha = manifest.get("model", {}).get("sha256", "")
    gated = _gated(compare, config.gate.engines)
    base_path = Path(baseline) if baseline is not None else config.resolve(config.gate.baseline)
    base = None if update_baseline else load_baseline(base_path, sha)
    checks: list[GateCheck] = []
    metrics_of = {e.name: {m: e.metrics.get(m) for m in sorted({*compare.tolerance, compare.primary})} for e in gated}
    for e in gated:
        broken = {(f.metric, f.rule): f for f in e.failures}
        for metric, rules in sorted(compare.tolerance.items()):
            for rule, limit in sorted(rules.items()):
                f = broken.get((metric, rule))
                checks.append(GateCheck(e.name, f"tolerance {metric} {rule} {limit:g}", f is None,
                                        "" if f is None else f.explain()))
        if base is not None:
            stored = base["engines"].get(e.name)
            if stored is None:
                checks.append(GateCheck(e.name, "baseline", False,
                                        f"the baseline has no entry for {e.name}: update it with --update-baseline"))
                continue
            for metric, old in sorted(stored.items()):
                new = e.metrics.get(metric)
                if old is None:
                    continue
                if new is None:
                    checks.append(GateCheck(e.name, f"regression {metric}", False, f"{metric} is no longer computed"))
                    continue
                worse = (old - new) if higher_is_better(metric) else (new - old)
                ok = worse <= config.gate.regression + 1e-12
                msg = "" if ok else (f"{metric} {new:.4f} vs baseline {old:.4f}: {worse:.4f} worse, allowed "
                                     f"{config.gate.regression:g}")
                checks.append(GateCheck(e.name, f"regression {metric}", ok, msg))
    if not checks:
        checks.append(GateCheck(",".join(e.name for e in gated), "tolerance", True,
                                "no [tolerance] set and no baseline: nothing to gate"))
    rows = (compare.layers or {}).get("rows", [])[:5]
    result = GateResult(run, compare.model, [e.name for e in gated], checks, str(base_path), update_baseline,
                        [{k: r.get(k) for k in ("node", "op", "sensitivity", "own_sqnr_db")} for r in rows],
                        metrics_of)
    if write:
        _write(run / "gate.json", dumps_json(result.to_dict()))
        _write(run / "gate.junit.xml", result.junit())
        if update_baseline:
            data = {
                "format": BASELINE_FORMAT, "model": compare.model, "model_sha256": sha, "primary": compare.primary,
                "engines": {e.name: {m: e.metrics.get(m) for m in sorted({*compare.tolerance, compare.primary})}
                            for e in gated},
            }
            _write(base_path, dumps_json(data))
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_text(tmp, text)
    tmp.replace(path)


def run_gate(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    baseline: str | Path | None = None,
    update_baseline: bool = False,
    progress: Any = None,
) -> GateResult:
    """Quantize (unless ``run_dir`` names an existing run), compare, and apply the gate."""
    from quantlab.compare import run_compare
    from quantlab.config import override

    config = override(config, "ptq", latency_runs=0, report=False)  # compare writes the report
    if run_dir is None:
        from quantlab.ptq import run_ptq

        run = run_ptq(config, progress=progress).run_dir
    else:
        run = Path(run_dir)
    compare = run_compare(config, run)
    return check_gate(config, compare, baseline=baseline, update_baseline=update_baseline)
