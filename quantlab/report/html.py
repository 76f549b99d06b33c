"""``index.html``: one self-contained page (inline CSS, images as data URIs, no script, no network).

The page opens on the verdict (which calibrator won, which layers hurt), then the engines' accuracy
and latency, the calibrators side by side, per-layer bar charts with the worst layers first, the
histograms of the worst tensors (the others as thumbnails in a collapsed section), the scale and
zero-point tables, the escalation ladder when there is one, and what was run.
"""

from __future__ import annotations

from html import escape
from typing import Any

from quantlab.report.plots import bar_chart_svg, colour, data_uri, dot_chart_svg, histogram_png
from quantlab.report.run import Run, calibrator_label, limit_note

BARS_SHOWN = 25  # layers per bar chart; the full list is in a table under it

CSS = """
:root { --fg: #1d232a; --muted: #5b6670; --line: #d8dee4; --bg2: #f5f7f9; --good: #1a7f37; --bad: #c62828; --win: #fff4d6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1180px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.sub, .note { color: var(--muted); margin: 2px 0 8px; }
nav { margin: 10px 0 4px; font-size: 13px; }
nav a { margin-right: 14px; color: #0b5cad; text-decoration: none; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 12px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--bg2); }
.card h3 { margin: 0 0 6px; font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
.card .big { font-size: 26px; font-weight: 700; }
.card ol { margin: 4px 0 0; padding-left: 20px; }
.card li { font-size: 13px; }
.ok { color: var(--good); font-weight: 600; } .fail { color: var(--bad); font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.n { white-space: normal; min-width: 5.2em; hyphens: none; }
small.fail { display: block; font-size: 11px; white-space: normal; line-height: 1.1; }
#engines-table td:first-child { white-space: nowrap; }
tr.win td { background: var(--win); }
tr.win td:first-child { font-weight: 700; }
td.t { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; max-width: 460px; }
.scroll { overflow-x: auto; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; }
details { margin: 8px 0; }
details > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; vertical-align: baseline; }
img.thumb { width: 240px; height: 70px; display: block; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0; }
dt { color: var(--muted); } dd { margin: 0; word-break: break-all; }
pre { background: var(--bg2); padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return escape(str(value))


def _pct(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    if fraction == 0:
        return "0%"
    if fraction < 1e-4:
        return f"{fraction * 100:.1e}%"
    return f"{fraction * 100:.3g}%"


def _db(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _swatch(label: str) -> str:
    return f'<span class="swatch" style="background:{colour(label)}"></span>{escape(label)}'


def _img(uri: str, alt: str, width: int, height: int, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} src="{uri}" alt="{escape(alt)}" width="{width}" height="{height}">'


def _svg_size(svg: bytes) -> tuple[int, int]:
    """Pixel size of a matplotlib SVG (its width/height are in pt: 1 pt = 4/3 px)."""
    import re

    head = svg[:600].decode("utf-8", "replace")
    w = re.search(r'width="([\d.]+)pt"', head)
    h = re.search(r'height="([\d.]+)pt"', head)
    return (round(float(w.group(1)) * 4 / 3), round(float(h.group(1)) * 4 / 3)) if w and h else (820, 400)


def _svg_img(svg: bytes, alt: str) -> str:
    w, h = _svg_size(svg)
    return _img(data_uri(svg, "image/svg+xml"), alt, w, h)


def _verdict(report: dict[str, Any]) -> str:
    w = report.get("winner")
    cards = []
    if w:
        basis = "measured: compare.json" if w["basis"] == "compare" else "estimated from calibration histograms"
        cards.append(
            f'<div class="card" id="winner"><h3>Calibrator that won ({escape(basis)})</h3>'
            f'<div class="big">{_swatch(w["calibrator"])} on {escape(w["target"])}</div>'
            f'<p class="note">{escape(w["detail"])}.</p>'
            + "".join(f'<p class="note">{escape(n)}</p>' for n in w.get("notes", [])) + "</div>"
        )
    else:
        cards.append('<div class="card"><h3>Calibrator that won</h3><p>No statistics and no compare.json: nothing to judge.</p></div>')
    tensors = report.get("tensors") or []
    layers = report.get("layers")
    if layers:
        items = "".join(
            f'<li><code>{escape(str(r.get("node")))}</code> ({escape(str(r.get("op")))}): sensitivity '
            f'{_fmt(r.get("sensitivity"))}, own SQNR {_db(r.get("own_sqnr_db"))} dB</li>'
            for r in layers["rows"][:5]
        )
        cards.append(f'<div class="card"><h3>Layers that hurt most ({escape(str(layers.get("engine")))})</h3><ol>{items}</ol></div>')
    elif tensors and w:
        target = report.get("primary_target")
        items = "".join(
            f'<li><code>{escape(t["tensor"])}</code>: {_db(t["quality"][target][w["calibrator"]]["sqnr_db"])} dB, '
            f'clipped {_pct(t["quality"][target][w["calibrator"]]["clipped"])}</li>'
            for t in tensors[:5] if w["calibrator"] in t["quality"].get(target, {})
        )
        cards.append(f'<div class="card"><h3>Tensors that hurt most (SQNR under {escape(w["calibrator"])})</h3><ol>{items}</ol></div>')
    eng = report["engines"]
    if eng["source"] == "compare":
        status = '<span class="ok">within tolerance</span>' if eng.get("ok") else '<span class="fail">OUT OF TOLERANCE</span>'
        fails = [f'{escape(r["name"])}: {escape(f["metric"])} {_fmt(f.get("value"))} ({escape(f["rule"])} {_fmt(f.get("limit"))})'
                 for r in eng["rows"] for f in r["failures"]]
        more = "<ol>" + "".join(f"<li>{f}</li>" for f in fails[:6]) + "</ol>" if fails else ""
        cards.append(f'<div class="card"><h3>Accuracy check ({_fmt(eng.get("samples"))} samples)</h3>'
                     f'<div class="big">{status}</div>{more}</div>')
    else:
        rules = [r for r in eng["rows"] if r["values"].get("tensorrt_rules") not in (None, "n/a")]
        bad = [r["name"] for r in rules if r["values"]["tensorrt_rules"] != "pass"]
        status = (f'<span class="fail">TensorRT rules fail: {escape(", ".join(bad))}</span>' if bad
                  else '<span class="ok">every model passes its checks</span>')
        cards.append('<div class="card"><h3>Checks</h3>'
                     f'<div>{status}</div><p class="note">No compare.json: agreement with FP32 below is on the first '
                     'calibration batch only. Run <code>quantlab compare</code> for accuracy on labelled data.</p></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _engines(report: dict[str, Any]) -> str:
    eng = report["engines"]
    cols = eng["columns"]
    head = "<tr><th>engine</th>" + "".join(f'<th class="n">{escape(h)}</th>' for _, h in cols)
    has_ok = eng["source"] == "compare"
    head += "<th>tolerance</th></tr>" if has_ok else "</tr>"
    rows = []
    for r in eng["rows"]:
        cells = []
        for key, _ in cols:
            v = r["values"].get(key)
            text = _fmt(v, 3 if key.endswith("_ms") else 4)
            if key.endswith("_ms") and r.get("slower_than_fp32") and v is not None:
                text += '<small class="fail">slower than FP32</small>'
            cells.append(f'<td class="n">{text}</td>')
        ok = ""
        if has_ok:
            ok = "<td>–</td>" if r["ok"] is None else ('<td class="ok">ok</td>' if r["ok"] else
                  '<td class="fail">' + escape(", ".join(f["metric"] for f in r["failures"]) or "fail") + "</td>")
        name = escape(r["name"]) + (" ★" if r.get("winner") else "")
        rows.append(f'<tr class="{"win" if r.get("winner") else ""}"><td>{name}</td>{"".join(cells)}{ok}</tr>')
    if eng["source"] == "compare":
        note = (f'From compare.json: {_fmt(eng.get("samples"))} evaluation samples ({_fmt(eng.get("labelled"))} labelled), '
                f'task {escape(str(eng.get("task")))}, backend {escape(str(eng.get("backend")))}; primary metric '
                f'<b>{escape(str(eng.get("primary")))}</b>; cosine and SQNR: the worst output against FP32. Latencies: '
                'median per batch size from latency.json (measured: they vary run to run).')
        tol = eng.get("tolerance") or {}
        if tol:
            note += " Tolerance: " + "; ".join(
                f"{escape(m)} " + ", ".join(f"{escape(k)} {_fmt(v)}" for k, v in rule.items()) for m, rule in sorted(tol.items())
            ) + "."
    else:
        note = ("From summary.json: every INT8 engine against FP32 on the first calibration batch (no labels). "
                "FP16 is not evaluated until <code>quantlab compare</code> runs. Latency: timing.json, batch 1, "
                "median, measured on the machine that ran the PTQ (ort-cpu engines only).")
    return (f'<p class="note">{note}</p><div class="scroll"><table id="engines-table">{head}{"".join(rows)}</table></div>'
            '<p class="note">★ the winner.</p>')


def _detections(report: dict[str, Any], run: Run) -> str:
    """The FP32-vs-INT8 boxes picture ``quantlab compare`` draws for an NMS detector, when there is one."""
    picture = (report["engines"].get("picture") or {}) if report["engines"]["source"] == "compare" else {}
    path = run.path / str(picture.get("file", ""))
    if not picture or not path.is_file():
        return ""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
    engines = picture.get("engines") or []
    note = (f'FP32 boxes (green) and the INT8 boxes of the best and the worst engine ({escape(", ".join(engines))}) on the '
            f'evaluation images where the worst disagrees most with FP32 ({escape(", ".join(picture.get("images") or []))}): '
            'blue a box that matches FP32 (same class, IoU at least compare.box_iou), orange a box FP32 did not find, '
            'thin red an FP32 box the engine missed.')
    return (f'<h2 id="detections">Detections: FP32 against INT8</h2><p class="note">{note}</p>'
            f'{_img(data_uri(path.read_bytes(), "image/png"), "FP32 and INT8 detections", width, height)}')


def _calibrators(report: dict[str, Any]) -> str:
    out = []
    w = report.get("winner") or {}
    for target, rows in report["calibrators"].items():
        body = "".join(
            f'<tr class="{"win" if r["calibrator"] == w.get("calibrator") else ""}"><td>{_swatch(r["calibrator"])}</td>'
            f'<td class="n">{_db(r["mean_sqnr_db"])}</td><td class="n">{_db(r["min_sqnr_db"])}</td>'
            f'<td class="t">{escape(str(r["worst_tensor"]))}</td><td class="n">{_pct(r["mean_clipped"])}</td></tr>'
            for r in rows
        )
        notes = "".join(f'<p class="note">{escape(n)}</p>' for r in rows if (n := limit_note(r)))
        out.append(
            f"<h3>{escape(target)}</h3><table class=\"calibrators\"><tr><th>calibrator</th><th class=\"n\">mean SQNR, dB</th>"
            f'<th class="n">worst SQNR, dB</th><th>worst tensor</th><th class="n">mean clipped</th></tr>{body}</table>{notes}'
        )
    return ('<p class="note">Estimated from the calibration histograms, per calibrated tensor: SQNR of fake-quantizing '
            "the distribution with the calibrator's threshold (clipping included), and the fraction of elements clipped. "
            "Higher SQNR is better; the mean is over tensors, in dB.</p>" + "".join(out))


def _layers(report: dict[str, Any]) -> str:
    parts = []
    layers = report.get("layers")
    if layers:
        rows = layers["rows"]
        if layers.get("skipped"):
            parts.append(f'<p class="note">Analysed: {escape(str(layers.get("engine")))}, the best engine that is a Q/DQ copy '
                         f'of the FP32 graph; not analysed: {escape(", ".join(layers["skipped"]))}.</p>')
        sens = [r for r in rows if r.get("sensitivity") is not None][:BARS_SHOWN]
        if sens:
            svg = bar_chart_svg([f'{r["node"]} ({r["op"]})' for r in sens], [r["sensitivity"] for r in sens],
                                title=f"Sensitivity per layer, {layers.get('engine')} (most sensitive first)",
                                xlabel=f"sensitivity: {layers['score']}" + (" (lower is worse)" if layers["lower_is_worse"] else ""),
                                colour_of_bars="#c62828")
            parts.append(f"<figure>{_svg_img(svg, 'sensitivity per layer')}</figure>")
        own = sorted((r for r in rows if r.get("own_sqnr_db") is not None), key=lambda r: (r["own_sqnr_db"], r["node"]))[:BARS_SHOWN]
        if own:
            svg = dot_chart_svg([f'{r["node"]} ({r["op"]})' for r in own],
                                {"own": [r["own_sqnr_db"] for r in own], "accumulated": [r.get("accumulated_sqnr_db") for r in own]},
                                title=f"SQNR per layer, {layers.get('engine')} (worst first)",
                                xlabel="SQNR of the layer's output vs FP32, dB (higher is better)",
                                colours={"own": "#0072B2", "accumulated": "#D55E00"})
            parts.append(f"<figure>{_svg_img(svg, 'SQNR per layer')}</figure>")
        body = "".join(
            f'<tr><td class="t">{escape(str(r.get("node")))}</td><td>{escape(str(r.get("op")))}</td>'
            f'<td class="n">{_fmt(r.get("sensitivity"))}</td><td class="n">{_db(r.get("own_sqnr_db"))}</td>'
            f'<td class="n">{_db(r.get("accumulated_sqnr_db"))}</td><td class="t">{escape(str(r.get("output")))}</td></tr>'
            for r in rows
        )
        parts.append(f"<details><summary>All {len(rows)} layers (by sensitivity)</summary><div class=\"scroll\"><table id=\"layers-table\">"
                     '<tr><th>node</th><th>op</th><th class="n">sensitivity</th><th class="n">own SQNR, dB</th>'
                     f'<th class="n">accumulated SQNR, dB</th><th>output</th></tr>{body}</table></div></details>')
    tensors = report.get("tensors") or []
    w = report.get("winner")
    target = report.get("primary_target")
    if tensors and w and target:
        shown = tensors[:BARS_SHOWN]
        cals = list(tensors[0]["quality"][target])
        win = w["calibrator"] if w["calibrator"] in cals else cals[0]
        series = {c: [t["quality"][target][c]["sqnr_db"] for t in shown] for c in cals}
        svg = dot_chart_svg([t["tensor"] for t in shown], series,
                            title=f"Histogram SQNR per tensor on {target}, worst {len(shown)} of {len(tensors)} under {win}",
                            xlabel="SQNR of the tensor's quantization, dB (higher is better)", highlight=win)
        parts.append(f"<figure>{_svg_img(svg, 'histogram SQNR per tensor')}</figure>")
    return "".join(parts) or '<p class="note">No per-layer data in this run.</p>'


def _quality_table(t: dict[str, Any], winner: str | None) -> str:
    targets = list(t["quality"])
    head = "<tr><th>calibrator</th>" + "".join(
        f'<th class="n">amax ({escape(tg)})</th><th class="n">clipped</th><th class="n">SQNR, dB</th>' for tg in targets) + "</tr>"
    body = ""
    for c in t["quality"][targets[0]]:
        cells = "".join(
            f'<td class="n">{_fmt(t["quality"][tg][c]["amax"])}</td><td class="n">{_pct(t["quality"][tg][c]["clipped"])}</td>'
            f'<td class="n">{_db(t["quality"][tg][c]["sqnr_db"])}</td>' for tg in targets)
        body += f'<tr class="{"win" if c == winner else ""}"><td>{_swatch(c)}</td>{cells}</tr>'
    return f"<table>{head}{body}</table>"


def _histograms(report: dict[str, Any], run: Run) -> str:
    tensors = report.get("tensors") or []
    if not tensors:
        return '<p class="note">The run folder holds no stats.npz: no histograms.</p>'
    target = report["primary_target"]
    w = (report.get("winner") or {}).get("calibrator")
    worst = set(report["worst"])
    stats = run.stats
    parts = [f'<p class="note">Histogram of |x| over the calibration set (counts on a log scale), with the threshold '
             f"of every calibrator; worst tensors first (lowest SQNR under {escape(str(w))} on {escape(target)}). "
             "Values beyond a threshold are clipped to it.</p>"]
    rest = []
    for t in tensors:
        name = t["tensor"]
        lines = [(calibrator_label(c), run.quality(c, target)[name]) for c in run.calibrators]
        folded = f' Also the range of: {escape(", ".join(t["folded"]))}.' if t["folded"] else ""
        if name in worst:
            png = histogram_png(stats.tensors[name], lines, target)
            parts.append(
                f'<figure id="t{t["rank"]}">{_img(data_uri(png, "image/png"), f"histogram of {name}", 900, 320)}'
                f'<figcaption>#{t["rank"]} <code>{escape(name)}</code>.{folded}{_quality_table(t, w)}</figcaption></figure>'
            )
        else:
            rest.append(t)
    if rest:
        cals = list(rest[0]["quality"][target])
        head = ("<tr><th>#</th><th>tensor</th><th>histogram</th>"
                + "".join(f'<th class="n">{_swatch(c)}<br>SQNR dB / clipped</th>' for c in cals) + "</tr>")
        body = ""
        for t in rest:
            name = t["tensor"]
            lines = [(calibrator_label(c), run.quality(c, target)[name]) for c in run.calibrators]
            png = histogram_png(stats.tensors[name], lines, target, compact=True)
            q = t["quality"][target]
            body += (f'<tr><td class="n">{t["rank"]}</td><td class="t">{escape(name)}</td>'
                     f'<td>{_img(data_uri(png, "image/png"), f"histogram of {name}", 240, 70, "thumb")}</td>'
                     + "".join(f'<td class="n">{_db(q[c]["sqnr_db"])} / {_pct(q[c]["clipped"])}</td>' for c in cals) + "</tr>")
        parts.append(f"<details><summary>The other {len(rest)} tensors (thumbnails, same order)</summary>"
                     f'<div class="scroll"><table id="other-tensors">{head}{body}</table></div></details>')
    return "".join(parts)


def _scales(report: dict[str, Any]) -> str:
    scales = report.get("scales") or {}
    if not scales:
        return '<p class="note">The run folder holds no scales.json.</p>'
    parts = ['<p class="note">What the Q/DQ models deploy: per activation the calibrator\'s amax, the scale and the '
             "zero-point; per weight the range of its per-channel scales. Also in scales.csv.</p>"]
    for target, tables in scales.items():
        acts = tables["activations"]
        cals = sorted({c for r in acts for c in r["by"]} | {c for r in tables["weights"] for c in r["by"]})
        head = "<tr><th>tensor</th><th>dtype</th>" + "".join(f'<th class="n">{_swatch(c)}<br>amax / scale / zp</th>' for c in cals) + "</tr>"
        body = "".join(
            f'<tr><td class="t">{escape(r["tensor"])}</td><td>{escape(str(r.get("dtype")))}</td>'
            + "".join(
                f'<td class="n">{_fmt(r["by"][c]["amax"])} / {_fmt(r["by"][c]["scale"])} / {_fmt(r["by"][c]["zero_point"])}</td>'
                if c in r["by"] else "<td>–</td>" for c in cals) + "</tr>"
            for r in acts
        )
        parts.append(f'<details><summary>{escape(target)}: {len(acts)} activations</summary><div class="scroll">'
                     f'<table class="scales" id="scales-{escape(target)}">{head}{body}</table></div></details>')
        if tables["weights"]:
            whead = "<tr><th>weight</th><th class=\"n\">channels</th>" + "".join(
                f'<th class="n">{_swatch(c)}<br>scale min / max</th>' for c in cals) + "</tr>"
            wbody = "".join(
                f'<tr><td class="t">{escape(r["tensor"])}</td><td class="n">{_fmt(r.get("channels"))}</td>'
                + "".join(f'<td class="n">{_fmt(r["by"][c]["min_scale"])} / {_fmt(r["by"][c]["max_scale"])}</td>'
                          if c in r["by"] else "<td>–</td>" for c in cals) + "</tr>"
                for r in tables["weights"]
            )
            parts.append(f'<details><summary>{escape(target)}: {len(tables["weights"])} weights (per-channel)</summary>'
                         f'<div class="scroll"><table class="scales">{whead}{wbody}</table></div></details>')
    return "".join(parts)


def _tune(report: dict[str, Any]) -> str:
    tune = report.get("tune")
    if not tune:
        return ""
    ok = '<span class="ok">passed</span>' if tune.get("ok") else '<span class="fail">did not pass</span>'
    body = ""
    for i, r in enumerate(tune.get("rungs") or [], 1):
        status = r.get("status")
        cls = {"pass": "ok", "fail": "fail"}.get(status, "")
        floats = ", ".join(r.get("float_layers") or []) or "–"
        body += (f'<tr><td class="n">{i}</td><td>{escape(str(r.get("rung")))}</td><td class="{cls}">{escape(str(status))}</td>'
                 f'<td>{escape(str(r.get("metric")))}</td><td class="n">{_fmt(r.get("value"))}</td>'
                 f'<td class="n">{_fmt(r.get("reference"))}</td><td>{escape(str(r.get("engine") or "–"))}</td>'
                 f'<td class="t">{escape(floats)}</td><td class="n">{_fmt(r.get("latency_ms"))}</td>'
                 f'<td class="n">{_fmt(r.get("size_mb"))}</td><td class="n">{_fmt(r.get("seconds"))}</td>'
                 f'<td>{escape(str(r.get("detail") or ""))}</td></tr>')
    return (f'<h2 id="tune">Escalation</h2><p>The ladder {ok}; final engine: '
            f'<b>{escape(str(tune.get("final_engine") or "none"))}</b>.</p>'
            '<div class="scroll"><table id="tune-table"><tr><th class="n">step</th><th>rung</th><th>status</th><th>metric</th>'
            '<th class="n">value</th><th class="n">reference</th><th>engine</th><th>layers kept in float</th><th class="n">batch-1 ms</th><th class="n">MB</th><th class="n">s</th><th>detail</th></tr>'
            f"{body}</table></div>")


def _qat(report: dict[str, Any]) -> str:
    q = report.get("qat")
    if not q or not q.get("metrics"):
        return ""
    from quantlab.report.plots import curve_svg

    primary = str(q.get("primary"))
    svg = curve_svg(q["metrics"], start=q.get("start"), title=f"QAT: {primary} after each epoch", ylabel=primary,
                    best=q.get("best_epoch"))
    met = {True: '<span class="ok">tolerance met</span>', False: '<span class="fail">tolerance not met</span>'}.get(
        q.get("tolerance_ok"), "no tolerance")
    return (f'<h2 id="qat">Quantization-aware training</h2><p>From the {escape(str(q.get("calibrator")))} ranges '
            f'({escape(str(q.get("start_engine") or "no PTQ engine"))}: {_fmt(q.get("start"))}) on '
            f'{escape(str(q.get("device")))}, learned ranges: {escape(str(q.get("learn_ranges")))}; '
            f'{len(q["metrics"])} epoch(s), stopped: {escape(str(q.get("stop")))}; kept epoch {_fmt(q.get("best_epoch"))}: '
            f'{_fmt(q.get("final"))} (FP32 {_fmt(q.get("fp32"))}), {met}.</p>'
            f'<div id="qat-curve">{_svg_img(svg, f"QAT {primary} per epoch")}</div>')


def _transforms_text(transforms: list[dict[str, Any]]) -> str:
    if not transforms:
        return "none"
    lines = "; ".join(f'{t["name"]}: {t["detail"]}' for t in transforms)
    return (f"{lines}. The INT8 models quantize the transformed FP32 graph (model_fp32_transformed.onnx); "
            "engines are compared with the untransformed model_fp32.onnx")


def _run_info(report: dict[str, Any]) -> str:
    r = report["run"]
    items = [
        ("model", r["model"]), ("source", r.get("source")), ("model sha256", r.get("sha256")),
        ("calibration data", r.get("data") or "not recorded (no config.json)"),
        ("calibration samples", r.get("samples")), ("calibrators", ", ".join(r["calibrators"])),
        ("percentile", r["percentile"]), ("targets", ", ".join(r["targets"])),
        ("tensors", f'{_fmt(r.get("calibrated_tensors"))} calibrated (+{_fmt(r.get("folded_tensors"))} folded into them)'),
        ("kept in float", (", ".join(r.get("kept_float") or []) or "none")
         + (f' (fill values such as an attention mask\'s -3.4e38 in {", ".join(r["fill_value_tensors"])})'
            if r.get("fill_value_tensors") else "")),
        ("transforms", _transforms_text(r.get("transforms") or [])),
        ("quantlab", r["quantlab"]), (f'versions ({r["versions_from"]})', ", ".join(f"{k} {v}" for k, v in r["versions"].items())),
        ("run folder written", r["date"]), ("files", ", ".join(r["files"])),
    ]
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{_fmt(v)}</dd>" for k, v in items)
    cfg = ""
    if r.get("config"):
        import json

        cfg = f"<details><summary>Effective config</summary><pre>{escape(json.dumps(r['config'], indent=2, sort_keys=True))}</pre></details>"
    return f"<dl>{dl}</dl>{cfg}"


def render_html(report: dict[str, Any], run: Run) -> str:
    """The whole page; ``run`` supplies the statistics the histograms are drawn from."""
    from quantlab.report.plots import report_style

    with report_style():
        return _render(report, run)


def _render(report: dict[str, Any], run: Run) -> str:
    r = report["run"]
    sections = [
        ("engines", "Accuracy and latency", _engines(report) + _detections(report, run)),
        ("calibrators", "Calibrators compared", _calibrators(report) if report["calibrators"] else '<p class="note">No statistics.</p>'),
        ("layers", "Per-layer SQNR and sensitivity", _layers(report)),
        ("tensors", "Histograms of the worst tensors", _histograms(report, run)),
        ("scales", "Scales and zero-points", _scales(report)),
    ]
    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t, _ in sections)
    if report.get("tune"):
        nav += '<a href="#tune">Escalation</a>'
    if (report.get("qat") or {}).get("metrics"):
        nav += '<a href="#qat">QAT</a>'
    nav += '<a href="#run">What was run</a>'
    body = "".join(f'<h2 id="{k}">{escape(t)}</h2>{html}' for k, t, html in sections)
    title = f"{r['model']}: INT8 calibration report"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{escape(title)}</h1>"
        f'<p class="sub">{_fmt(r.get("samples"))} calibration samples, {_fmt(r.get("calibrated_tensors"))} calibrated tensors, '
        f'calibrators {escape(", ".join(r["calibrators"]))}, targets {escape(", ".join(r["targets"]))}; '
        f'run written {escape(r["date"])}; quantlab {escape(str(r["quantlab"]))}</p>'
        f"<nav>{nav}</nav>\n{_verdict(report)}\n{body}\n{_tune(report)}\n{_qat(report)}\n"
        f'<h2 id="run">What was run</h2>{_run_info(report)}\n</body></html>\n'
    )
