"""The report's plots, drawn with matplotlib's Agg canvas and saved byte-reproducibly.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, so a notebook's backend
is left alone) inside one fixed style, and saved without any date or software stamp:

* PNG (histograms): the Agg pixels reduced to an adaptive palette with Pillow, which writes no
  timestamp; a quarter of the size of matplotlib's RGBA PNG for the same pixels;
* SVG (bar charts): ``svg.hashsalt`` fixed so that clip-path ids repeat, glyphs as paths (no font
  needed to view it), ``Date`` metadata removed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from quantlab.stats import TensorStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from quantlab.report.run import TensorQuality

# colour-blind safe (Okabe-Ito), one per calibrator; others cycle through the rest
CALIBRATOR_COLOURS = {"minmax": "#0072B2", "percentile": "#E69F00", "entropy": "#D55E00", "mse": "#009E73"}
_SPARE_COLOURS = ("#CC79A7", "#56B4E9", "#000000", "#F0E442")
HIST_COLOUR = "#9aa7b4"
NEG_COLOUR = "#4b5866"

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "path",
    "svg.hashsalt": "quantlab-report",
    "path.simplify": True,
}


def colour(label: str) -> str:
    """A fixed colour for a calibrator label (``"percentile 99.9"`` shares percentile's)."""
    base = label.split(" ", 1)[0]
    if base in CALIBRATOR_COLOURS:
        return CALIBRATOR_COLOURS[base]
    return _SPARE_COLOURS[sum(map(ord, label)) % len(_SPARE_COLOURS)]


@contextmanager
def report_style() -> Iterator[None]:
    """matplotlib's defaults plus :data:`STYLE`, whatever the user's matplotlibrc says."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: "Figure", dpi: int = 100, colours: int = 96) -> bytes:
    """The figure as a palette PNG: same figure, same bytes."""
    from PIL import Image

    fig.canvas.draw()
    if dpi != fig.dpi:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    else:
        image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True
    )
    return out.getvalue()


def svg_bytes(fig: "Figure") -> bytes:
    """The figure as SVG without a date, reproducible through the fixed ``svg.hashsalt``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _last_bin(st: TensorStats) -> int:
    nonzero = np.flatnonzero(st.hist)
    return int(nonzero[-1]) if nonzero.size else 0


def draw_histogram(ax: "Axes", st: TensorStats, lines: Sequence[tuple[str, "TensorQuality"]], target: str,
                   legend: bool = True, compact: bool = False) -> None:
    """The ``|x|`` histogram of ``st`` on log counts, one labelled vertical line per threshold."""
    hist = st.hist.astype(np.float64)
    last = _last_bin(st)
    upper = max([(last + 1) * st.bin_width] + [q.amax for _, q in lines]) * 1.04 or 1.0
    # merge bins so that about 256 steps remain: lighter images, same shape
    stop = min(st.nbins, int(math.ceil(upper / st.bin_width)) if st.bin_width else 1)
    group = max(1, int(2 ** math.floor(math.log2(max(stop / 256, 1)))))
    stop = int(math.ceil(stop / group) * group)
    counts = np.pad(hist, (0, max(0, stop - hist.size)))[:stop].reshape(-1, group).sum(axis=1)
    neg = np.pad(st.hist_neg.astype(np.float64), (0, max(0, stop - hist.size)))[:stop].reshape(-1, group).sum(axis=1)
    edges = np.arange(counts.size + 1) * st.bin_width * group
    floor = 0.7
    ax.stairs(np.maximum(counts, floor), edges, baseline=floor, fill=True, color=HIST_COLOUR,
              label=None if compact else "|x|, all elements")
    if neg.any() and not compact:
        ax.stairs(np.maximum(neg, floor), edges, baseline=floor, color=NEG_COLOUR, linewidth=0.8,
                  label="|x| of x < 0")
    ax.set_yscale("log")
    ax.set_ylim(floor, max(counts.max(), 1.0) * 3)
    ax.set_xlim(0, edges[-1] if st.bin_width else 1.0)
    styles = ("-", "--", "-.", ":")
    for i, (label, q) in enumerate(lines):
        sqnr = "-" if q.sqnr_db is None else f"{q.sqnr_db:.1f} dB"
        text = f"{label}: amax {q.amax:.4g}, clipped {_percent(q.clipped)}, SQNR {sqnr}"
        ax.axvline(q.amax, color=colour(label), linestyle=styles[i % len(styles)],
                   linewidth=1.0 if compact else 1.6, label=text)
    if compact:
        ax.tick_params(labelsize=6, length=2, pad=1)
        ax.set_yticks([])
        ax.minorticks_off()
        return
    ax.set_xlabel("|x|, activation magnitude (tensor units)")
    ax.set_ylabel("elements per bin (log)")
    ax.set_title(f"{st.name}   min {st.min:.4g}, max {st.max:.4g}, {st.count:,} elements; SQNR on {target}",
                 loc="left", fontsize=9)
    if legend:
        ax.legend(loc="upper right", frameon=True, framealpha=0.9)


def _percent(fraction: float) -> str:
    if fraction == 0:
        return "0%"
    if fraction < 1e-4:
        return f"{fraction * 100:.1e}%"
    return f"{fraction * 100:.3g}%"


def histogram_png(st: TensorStats, lines: Sequence[tuple[str, "TensorQuality"]], target: str,
                  compact: bool = False) -> bytes:
    """One tensor's histogram as PNG: 820 x 300 px, or a 240 x 70 px thumbnail when ``compact``."""
    with report_style():
        fig = new_figure(2.4, 0.7) if compact else new_figure(8.2, 3.0)
        if compact:
            fig.set_layout_engine("none")
            ax = fig.add_axes((0.02, 0.22, 0.96, 0.76))
        else:
            ax = fig.add_subplot()
        draw_histogram(ax, st, lines, target, compact=compact)
        return png_bytes(fig, colours=32 if compact else 96)


def bar_chart_svg(labels: Sequence[str], values: Sequence[float | None], *, title: str, xlabel: str,
                  colour_of_bars: str = "#0072B2", others: dict[str, Sequence[float | None]] | None = None,
                  reference: float | None = None, reference_label: str | None = None) -> bytes:
    """Horizontal bars, the first label on top; ``others`` adds one marker series per name."""
    n = len(labels)
    with report_style():
        fig = new_figure(8.2, 0.9 + 0.22 * max(n, 1))
        ax = fig.add_subplot()
        y = np.arange(n)
        vals = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ax.barh(y, np.nan_to_num(vals), color=colour_of_bars, height=0.7, label=None if not others else title)
        for name, series in (others or {}).items():
            sv = np.array([np.nan if v is None else v for v in series], dtype=np.float64)
            ax.plot(sv, y, linestyle="none", marker="o", markersize=4, color=colour(name), label=name)
        for yi, v in zip(y, vals):
            if not np.isnan(v):
                ax.annotate(f"{v:.3g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        if reference is not None:
            ax.axvline(reference, color="#555555", linestyle="--", linewidth=1, label=reference_label)
        ax.set_yticks(y, [_shorten(s) for s in labels], fontsize=7)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlabel(xlabel)
        ax.set_title(title, loc="left")
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        if others or reference_label:
            ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
        return svg_bytes(fig)


def _shorten(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
