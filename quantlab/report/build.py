"""From a run folder to ``report.json``, ``summary.md`` and ``index.html``, written atomically.

:func:`build_report` gathers everything the report shows into one JSON-ready dict (it is written as
``report.json``); :mod:`quantlab.report.html` and :mod:`quantlab.report.markdown` render that dict.
Only the latencies (from ``timing.json`` and ``latency.json``) differ between two reports of the same
run folder: everything else is byte-identical.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from quantlab import __version__
from quantlab.textio import dumps_json
from quantlab.errors import check
from quantlab.report.run import Run, _round, calibrator_label, load_run

REPORT_FORMAT = "quantlab-report-1"
# libraries whose versions change results or the report
DEPENDENCIES = ("numpy", "onnx", "onnxruntime", "scipy", "matplotlib", "numba", "torch")
WORST_DEFAULT = 12
REPORT_FILES = ("index.html", "summary.md", "report.json")


def _versions(run: Run) -> tuple[dict[str, str], str]:
    recorded = run.manifest.get("versions")
    if isinstance(recorded, dict) and recorded:
        return {str(k): str(v) for k, v in sorted(recorded.items())}, "recorded by the run"
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out, "environment that wrote this report"


def _run_date(run: Run) -> str:
    for source in (run.manifest, run.config or {}):
        for key in ("created", "date"):
            if isinstance(source.get(key), str):
                return source[key]
    stamp = (run.path / "manifest.json").stat().st_mtime
    return _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _run_info(run: Run) -> dict[str, Any]:
    versions, versions_from = _versions(run)
    model = run.manifest.get("model", {})
    cal = run.calibration
    data = None
    if run.config:
        d = run.config.get("data") or {}
        data = d.get("calib") if isinstance(d, dict) else None
    stats = run.stats if run.has_stats else None
    kept = run.summary.get("kept_float") or {}
    return {
        "model": run.model,
        "source": model.get("source"),
        "sha256": model.get("sha256"),
        "data": data,
        "samples": cal.get("samples", stats.samples if stats else None),
        "calibrators": run.calibrators,
        "percentile": run.percentile,
        "targets": run.targets,
        "calibrated_tensors": len(stats.tensors) if stats else run.summary.get("calibrated_tensors"),
        "folded_tensors": len(stats.folded) if stats else run.summary.get("folded_tensors"),
        "kept_float": kept.get("nodes") or [],
        "transforms": [{k: t.get(k) for k in ("name", "applied", "detail")} for t in run.summary.get("transforms") or []],
        "fill_value_tensors": kept.get("fill_value_tensors") or [],
        "quantlab": run.manifest.get("quantlab", __version__),
        "report_quantlab": __version__,
        "versions": versions,
        "versions_from": versions_from,
        "date": _run_date(run),
        "config": run.config,
        "files": sorted(p.name for p in run.path.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.name not in REPORT_FILES),
    }


def _latency(run: Run, engine: str) -> dict[str, float | None]:
    """``{"b1_ms": ..., "b8_ms": ..., "throughput": ...}`` from latency.json (median per batch size)."""
    table = ((run.latency or {}).get("engines") or {}).get(engine) or {}
    out: dict[str, float | None] = {}
    sizes = sorted(table, key=lambda s: int(s) if str(s).isdigit() else 0)
    for size in sizes:
        out[f"b{size}_ms"] = _round(table[size].get("median_ms"), 3)
    if sizes:
        out["throughput"] = _round(table[sizes[-1]].get("throughput"), 4)
    return out


def _engines_from_compare(run: Run, best: str | None) -> dict[str, Any]:
    cmp = run.compare or {}
    engines = cmp.get("engines") or []
    primary = cmp.get("primary")
    metric_keys: list[str] = []
    for e in engines:
        for k in e.get("metrics") or {}:
            if k not in metric_keys:
                metric_keys.append(k)
    known = ("top1", "top5", "top1_agreement", "top5_overlap", "kl")
    metric_keys.sort(key=lambda k: (k != primary, known.index(k) if k in known else len(known), k))
    has_outputs = any(e.get("outputs") for e in engines)
    slower = set((run.latency or {}).get("slower_than_fp32") or [])
    lat_keys: list[str] = []
    rows = []
    for e in engines:
        values: dict[str, Any] = {k: _round((e.get("metrics") or {}).get(k), 6) for k in metric_keys}
        if has_outputs:
            outs = (e.get("outputs") or {}).values()
            cos = [o["cosine"] for o in outs if o.get("cosine") is not None]
            sq = [o["sqnr_db"] for o in outs if o.get("sqnr_db") is not None]
            values["output_cosine"] = _round(min(cos), 6) if cos else None
            values["output_sqnr_db"] = _round(min(sq), 2) if sq else None
        if e.get("precision") == "fp32":
            # the reference against itself has no error, so no SQNR (older compare.json files hold the 999 dB cap)
            for k in ("sqnr_db", "output_sqnr_db"):
                if k in values:
                    values[k] = None
        values["size_mb"] = _round(e.get("size_mb"), 3)
        lat = _latency(run, e["name"])
        for k in lat:
            if k not in lat_keys:
                lat_keys.append(k)
        values.update(lat)
        rows.append({
            "name": e["name"], "precision": e.get("precision"), "calibrator": e.get("calibrator"),
            "target": e.get("target"), "values": values, "ok": e.get("tolerance_ok"),
            "failures": e.get("failures") or [], "winner": e["name"] == best, "slower_than_fp32": e["name"] in slower,
        })
    heads = {"top1": "top-1", "top5": "top-5", "top1_agreement": "top-1 agreement", "top5_overlap": "top-5 overlap",
             "kl": "KL vs FP32", "output_cosine": "cosine vs FP32", "output_sqnr_db": "SQNR vs FP32, dB",
             "size_mb": "size, MB", "throughput": "samples/s"}
    columns = [[k, heads.get(k, k)] for k in metric_keys]
    if has_outputs:
        columns += [["output_cosine", heads["output_cosine"]], ["output_sqnr_db", heads["output_sqnr_db"]]]
    columns.append(["size_mb", heads["size_mb"]])
    for k in sorted((k for k in lat_keys if k.endswith("_ms")), key=lambda k: int(k[1:-3]) if k[1:-3].isdigit() else 0):
        columns.append([k, f"batch {k[1:-3]} ms"])
    if "throughput" in lat_keys:
        columns.append(["throughput", heads["throughput"]])
    return {
        "source": "compare", "primary": primary, "samples": cmp.get("samples"), "labelled": cmp.get("labelled"),
        "task": cmp.get("task"), "backend": cmp.get("backend"), "tolerance": cmp.get("tolerance"),
        "ok": cmp.get("ok"), "best": cmp.get("best"), "columns": columns, "rows": rows, "picture": cmp.get("picture"),
        "timed": [k for k, _ in columns if k.startswith("b") and k.endswith("_ms")] + (["throughput"] if "throughput" in lat_keys else []),
    }


def _engines_from_summary(run: Run, winner_calibrator: str | None, winner_target: str | None) -> dict[str, Any]:
    lat = ((run.timing or {}).get("latency_ms_batch1") or {})
    rows = [{
        "name": "fp32", "precision": "fp32", "calibrator": None, "target": None,
        "values": {"cosine": 1.0, "sqnr_db": None, "top1_agreement": 1.0, "qdq": None, "tensorrt_rules": None,
                   "b1_ms": _round(lat.get("fp32"), 3)},
        "ok": None, "failures": [], "winner": False, "slower_than_fp32": False,
    }]
    fp32_ms = lat.get("fp32")
    for e in run.summary.get("engines") or []:
        name = f"int8:{e['calibrator']}.{e['target']}"
        ms = lat.get(e.get("path"))
        rules = e.get("tensorrt_rules")
        rows.append({
            "name": name, "precision": "int8", "calibrator": e["calibrator"], "target": e["target"],
            "values": {"cosine": e.get("cosine"), "sqnr_db": e.get("sqnr_db"), "top1_agreement": e.get("top1_agreement"),
                       "qdq": f"{e.get('quantize_nodes')}/{e.get('dequantize_nodes')}", "tensorrt_rules": rules,
                       "b1_ms": _round(ms, 3)},
            "ok": None if rules in (None, "n/a") else rules == "pass", "failures": [],
            "winner": (e["calibrator"], e["target"]) == (winner_calibrator, winner_target),
            "slower_than_fp32": bool(ms and fp32_ms and ms > fp32_ms),
        })
    columns = [["cosine", "cosine vs FP32"], ["sqnr_db", "SQNR vs FP32, dB"], ["top1_agreement", "top-1 agreement"],
               ["qdq", "Q/DQ nodes"], ["tensorrt_rules", "TensorRT rules"], ["b1_ms", "batch 1 ms"]]
    return {"source": "summary", "primary": None, "samples": None, "columns": columns, "rows": rows,
            "timed": ["b1_ms"], "ok": None, "best": None}


def _tensors(run: Run) -> list[dict[str, Any]]:
    stats = run.stats
    folded: dict[str, list[str]] = {}
    for name, source in sorted(stats.folded.items()):
        folded.setdefault(source, []).append(name)
    order = run.worst_tensors(None)
    out = []
    for rank, name in enumerate(order, 1):
        st = stats.tensors[name]
        quality = {t: {calibrator_label(c): run.quality(c, t)[name].to_dict() for c in run.calibrators} for t in run.targets}
        out.append({
            "tensor": name, "rank": rank, "folded": folded.get(name, []),
            "min": _round(st.min, 7), "max": _round(st.max, 7), "count": st.count, "quality": quality,
        })
    return out


def _scales(run: Run) -> dict[str, Any]:
    """Per target: each activation's amax, scale and zero-point per calibrator; weights' scale range."""
    out: dict[str, Any] = {}
    for target in run.targets:
        acts: dict[str, dict[str, Any]] = {}
        weights: dict[str, dict[str, Any]] = {}
        for r in run.scales:
            if r.get("target") != target:
                continue
            if r.get("kind") == "activation":
                row = acts.setdefault(r["tensor"], {"tensor": r["tensor"], "dtype": r.get("dtype"),
                                                    "folded_into": r.get("folded_into"), "by": {}})
                row["dtype"] = row["dtype"] or r.get("dtype")
                row["by"][r["calibrator"]] = {"amax": _round(r.get("amax"), 7), "scale": _round(r.get("scale"), 7),
                                              "zero_point": r.get("zero_point")}
            elif r.get("kind") == "weight":
                scales = [s for s in (r.get("scale") or []) if s is not None]
                row = weights.setdefault(r["tensor"], {"tensor": r["tensor"], "dtype": r.get("dtype"),
                                                       "channels": r.get("channels"), "by": {}})
                row["by"][r["calibrator"]] = {"min_scale": _round(min(scales), 7) if scales else None,
                                              "max_scale": _round(max(scales), 7) if scales else None}
        if acts or weights:
            out[target] = {"activations": [acts[k] for k in sorted(acts)], "weights": [weights[k] for k in sorted(weights)]}
    return out


def _layers(run: Run) -> dict[str, Any] | None:
    layers = (run.compare or {}).get("layers")
    if not layers or not layers.get("rows"):
        return None
    rows = [dict(r) for r in layers["rows"]]
    score = str(layers.get("score") or "")
    # an SQNR score (dB, quantlab compare's default) is worse when lower; a metric drop when higher
    lower_is_worse = "sqnr" in score.lower() or "db" in score.lower().split()
    sign = 1.0 if lower_is_worse else -1.0
    by_sensitivity = sorted(rows, key=lambda r: (r.get("sensitivity") is None, sign * (r.get("sensitivity") or 0.0), r.get("node", "")))
    return {"engine": layers.get("engine"), "score": score or "drop of the primary metric with only this layer quantized",
            "lower_is_worse": lower_is_worse, "rows": by_sensitivity, "skipped": list(layers.get("skipped") or [])}


def _winner_notes(report: dict[str, Any], calibrator: str) -> list[str]:
    """Context for the verdict: the margin to the runner-up, and what summary.json measured."""
    notes = []
    rows = (report.get("calibrators") or {}).get(report.get("primary_target")) or []
    mine = next((r for r in rows if r["calibrator"] == calibrator), None)
    others = [r for r in rows if r["calibrator"] != calibrator and r["mean_sqnr_db"] is not None]
    if mine and mine["mean_sqnr_db"] is not None and others:
        best_other = max(others, key=lambda r: r["mean_sqnr_db"])
        margin = mine["mean_sqnr_db"] - best_other["mean_sqnr_db"]
        notes.append(f"Histogram SQNR on {mine['target']}: {calibrator} {mine['mean_sqnr_db']:.1f} dB, next best "
                     f"{best_other['calibrator']} {best_other['mean_sqnr_db']:.1f} dB ({margin:+.1f} dB); worst tensor "
                     f"under {calibrator}: {mine['min_sqnr_db']:.1f} dB.")
    engines = [r for r in report["engines"]["rows"] if r["precision"] == "int8" and r["values"].get("sqnr_db") is not None]
    if report["engines"]["source"] == "summary" and engines:
        top = max(engines, key=lambda r: (r["values"]["sqnr_db"], r["values"].get("cosine") or 0))
        ties = [r["name"] for r in engines if r["values"]["sqnr_db"] == top["values"]["sqnr_db"]]
        notes.append(f"Measured output SQNR vs FP32 on the first calibration batch (summary.json): best "
                     f"{' = '.join(ties)} at {top['values']['sqnr_db']:.2f} dB.")
    return notes


def _qat(run: Run) -> dict[str, Any] | None:
    """``quantlab qat``'s curve: the primary metric at the start (the PTQ engine) and after each epoch."""
    q = run.qat
    if not q:
        return None
    inner = q.get("qat") or {}
    return {
        "primary": q.get("primary"), "fp32": q.get("fp32"), "calibrator": q.get("calibrator"),
        "start": (q.get("start") or {}).get("value"), "start_engine": (q.get("start") or {}).get("engine"),
        "metrics": list(inner.get("metrics") or []), "losses": list(inner.get("losses") or []),
        "best_epoch": inner.get("best_epoch"), "stop": inner.get("stop"), "final": (q.get("final") or {}).get("value"),
        "tolerance_ok": (q.get("final") or {}).get("tolerance_ok"), "device": inner.get("device"),
        "learn_ranges": (inner.get("ranges") or {}).get("mode", "off"),
    }


def build_report(run: Run | str | os.PathLike[str], worst: int = WORST_DEFAULT) -> dict[str, Any]:
    """Everything the report shows, as a JSON-ready dict (written as ``report.json``)."""
    check(isinstance(worst, int) and worst >= 0, f"worst must be a whole number >= 0, got {worst!r}: pass e.g. --worst 12")
    if not isinstance(run, Run):
        run = load_run(run)
    winner = run.winner
    report: dict[str, Any] = {"format": REPORT_FORMAT, "run": _run_info(run), "winner": winner.to_dict() if winner else None}
    if run.compare:
        report["engines"] = _engines_from_compare(run, run.compare.get("best"))
    else:
        report["engines"] = _engines_from_summary(run, winner.calibrator if winner else None, winner.target if winner else None)
    report["primary_target"] = run.primary_target if run.targets else None
    if run.has_stats and run.calibrators:
        report["calibrators"] = {t: run.compare_calibrators(target=t) for t in run.targets}
        report["tensors"] = _tensors(run)
    else:
        report["calibrators"], report["tensors"] = {}, []
    report["worst"] = [t["tensor"] for t in report["tensors"][:worst]]
    if winner is not None:
        report["winner"]["notes"] = _winner_notes(report, winner.calibrator)
    report["scales"] = _scales(run)
    report["layers"] = _layers(run)
    report["tune"] = run.tune
    report["qat"] = _qat(run)
    return report


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: str | os.PathLike[str], worst: int = WORST_DEFAULT) -> Path:
    """Write ``report.json``, ``summary.md`` and ``index.html`` into the run folder; return index.html.

    Each file is written to a temporary file beside it and renamed into place, so a reader never
    sees a half-written report.  ``worst`` tensors get full-size histograms; the others get
    thumbnails in a collapsed section.
    """
    from quantlab.report.html import render_html
    from quantlab.report.markdown import render_markdown

    run = load_run(run_dir)
    report = build_report(run, worst)
    html = render_html(report, run)
    markdown = render_markdown(report)
    _atomic_write(run.path / "report.json", dumps_json(report).encode("utf-8"))
    _atomic_write(run.path / "summary.md", markdown.encode("utf-8"))
    _atomic_write(run.path / "index.html", html.encode("utf-8"))
    return run.path / "index.html"


__all__ = ["build_report", "write_report"]


REPORT_FILES = ("index.html", "summary.md", "report.json")


def write_report_files(run: Path) -> None:
    """The HTML/Markdown/JSON report of a run folder, listed in its manifest (without digests: they
    show the date)."""
    from quantlab.artefacts import Artefact, update_manifest

    write_report(run)
    update_manifest(run, [Artefact(name, "report") for name in REPORT_FILES])
