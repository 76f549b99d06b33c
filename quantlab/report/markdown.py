"""``summary.md``: the report in a few tables, for CI logs and pull-request comments."""

from __future__ import annotations

from typing import Any

from quantlab.report.run import limit_note

WORST_SHOWN = 10


def _v(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(fraction: float | None) -> str:
    if fraction is None:
        return "-"
    return "0%" if fraction == 0 else (f"{fraction * 100:.1e}%" if fraction < 1e-4 else f"{fraction * 100:.3g}%")


def _table(head: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    right = right or set()
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The summary as GitHub-flavoured Markdown."""
    r = report["run"]
    out = [f"# {r['model']}: INT8 calibration report", ""]
    out.append(f"{_v(r.get('samples'))} calibration samples, {_v(r.get('calibrated_tensors'))} calibrated tensors, "
               f"calibrators {', '.join(r['calibrators'])}, targets {', '.join(r['targets'])}; "
               f"run written {r['date']}; quantlab {r['quantlab']}.")
    if r.get("kept_float"):
        out.append(f"Kept in float: {len(r['kept_float'])} node(s)"
                   + (" that write or read fill values (e.g. an attention mask's -3.4e38)" if r.get("fill_value_tensors") else "")
                   + ": " + ", ".join(f"`{n}`" for n in r["kept_float"]) + ".")
    for t in r.get("transforms") or []:
        out.append(f"Transform {t['name']}: {t['detail']}.")
    if r.get("transforms"):
        out.append("The INT8 models quantize the transformed FP32 graph (`model_fp32_transformed.onnx`); engines are "
                   "compared with the untransformed `model_fp32.onnx`.")
    out.append("")
    w = report.get("winner")
    if w:
        out += [f"**Winner: {w['calibrator']} on {w['target']}.** {w['detail']}.", ""]
        out += [f"- {n}" for n in w.get("notes", [])] + ([""] if w.get("notes") else [])
    eng = report["engines"]
    if eng["source"] == "compare":
        verdict = "within tolerance" if eng.get("ok") else "**OUT OF TOLERANCE**"
        out += [f"Accuracy check on {_v(eng.get('samples'))} samples: {verdict}.", ""]
        for row in eng["rows"]:
            for f in row["failures"]:
                out.append(f"- {row['name']}: {f['metric']} {_v(f.get('value'))} "
                           f"(reference {_v(f.get('reference'))}, {f['rule']} {_v(f.get('limit'))})")
        if any(row["failures"] for row in eng["rows"]):
            out.append("")
    out += ["## Engines", ""]
    cols = eng["columns"]
    rows = []
    for row in eng["rows"]:
        name = row["name"] + (" (winner)" if row.get("winner") else "")
        cells = [_v(row["values"].get(k)) for k, _ in cols]
        if eng["source"] == "compare":
            cells.append("-" if row["ok"] is None else ("ok" if row["ok"] else "fail"))
        rows.append([name, *cells])
    head = ["engine", *[h for _, h in cols]] + (["tolerance"] if eng["source"] == "compare" else [])
    out += _table(head, rows, set(range(1, len(cols) + 1)))
    if eng["source"] != "compare":
        out += ["", "Agreement with FP32 on the first calibration batch; run `quantlab compare` for accuracy."]
    elif eng.get("picture"):
        pic = eng["picture"]
        out += ["", f"![FP32 (green) against INT8 boxes of {' and '.join(pic.get('engines') or [])}]({pic['file']})"]
    target = report.get("primary_target")
    if report.get("calibrators") and target in report["calibrators"]:
        out += ["", f"## Calibrators (histogram SQNR on {target})", ""]
        out += _table(["calibrator", "mean SQNR dB", "worst SQNR dB", "worst tensor", "mean clipped"],
                      [[c["calibrator"], _db(c["mean_sqnr_db"]), _db(c["min_sqnr_db"]), f"`{c['worst_tensor']}`",
                        _pct(c["mean_clipped"])] for c in report["calibrators"][target]], {1, 2, 4})
        notes = [n for c in report["calibrators"][target] if (n := limit_note(c))]
        if notes:
            out += ["", *notes]
    layers = report.get("layers")
    if layers:
        out += ["", f"## Most sensitive layers ({layers.get('engine')})", ""]
        out += _table(["node", "op", "sensitivity", "own SQNR dB", "accumulated SQNR dB"],
                      [[f"`{x.get('node')}`", _v(x.get("op")), _v(x.get("sensitivity")), _db(x.get("own_sqnr_db")),
                        _db(x.get("accumulated_sqnr_db"))] for x in layers["rows"][:WORST_SHOWN]], {2, 3, 4})
    tensors = report.get("tensors") or []
    if tensors and target:
        cals = list(tensors[0]["quality"][target])
        out += ["", f"## Worst tensors (histogram SQNR dB on {target})", ""]
        out += _table(["#", "tensor", *cals],
                      [[str(t["rank"]), f"`{t['tensor']}`", *[_db(t["quality"][target][c]["sqnr_db"]) for c in cals]]
                       for t in tensors[:WORST_SHOWN]], {0, *range(2, 2 + len(cals))})
    tune = report.get("tune")
    if tune:
        out += ["", f"## Escalation: {'passed' if tune.get('ok') else 'did not pass'}, final engine "
                    f"{tune.get('final_engine') or 'none'}", ""]
        out += _table(["rung", "status", "metric", "value", "reference", "engine", "float layers", "batch-1 ms", "MB", "s",
                       "detail"],
                      [[_v(x.get("rung")), _v(x.get("status")), _v(x.get("metric")), _v(x.get("value")), _v(x.get("reference")),
                        _v(x.get("engine")), _v(", ".join(x.get("float_layers") or []) or None), _v(x.get("latency_ms")),
                        _v(x.get("size_mb")), _v(x.get("seconds")), _v(x.get("detail"))]
                       for x in tune.get("rungs") or []], {3, 4, 7, 8, 9})
    qat = report.get("qat")
    if qat and qat.get("metrics"):
        out += ["", f"## QAT: {qat.get('primary')} from {_v(qat.get('start'))} ({qat.get('start_engine')}) to "
                    f"{_v(qat.get('final'))} (epoch {qat.get('best_epoch')} of {len(qat['metrics'])}, stopped: {qat.get('stop')})", "",
                "Per epoch: " + ", ".join(_v(m) for m in qat["metrics"])]
    out += ["", "Full report: `index.html` in the run folder (data: `report.json`).", ""]
    return "\n".join(out)
