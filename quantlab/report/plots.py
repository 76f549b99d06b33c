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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from quantlab.stats import TensorStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class TensorQuality(Protocol):
    """What a plot reads of a threshold's effect on a tensor (:class:`quantlab.report.run.TensorQuality`
    has it): the threshold, the fraction of elements it clips, the SQNR of the fake-quantized tensor."""

    amax: float
    clipped: float
    sqnr_db: float | None


# colour-blind safe (Okabe-Ito), one per calibrator; others cycle through the rest
CALIBRATOR_COLOURS = {"minmax": "#0072B2", "percentile": "#E69F00", "entropy": "#D55E00", "mse": "#009E73",
                      "entropy-trt": "#CC79A7", "entropy-modelopt": "#56B4E9"}
_SPARE_COLOURS = ("#000000", "#8C6D31", "#7F3C8D")
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
    """A fixed colour for a calibrator label; variants such as ``"percentile 99.9"`` get spare colours."""
    if label in CALIBRATOR_COLOURS:
        return CALIBRATOR_COLOURS[label]
    return _SPARE_COLOURS[sum(map(ord, label)) % len(_SPARE_COLOURS)]


_style_depth = 0


@contextmanager
def report_style() -> Iterator[None]:
    """matplotlib's defaults plus :data:`STYLE`, whatever the user's matplotlibrc says (re-entrant)."""
    global _style_depth
    import matplotlib
    import matplotlib.style

    if _style_depth:
        yield
        return
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        _style_depth += 1
        try:
            yield
        finally:
            _style_depth -= 1


def _count_label(value: float, _pos: object = None) -> str:
    """Tick label of a count axis without mathtext: 1, 10, 100, 1k, 10k, 100k, 1M, ..."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def new_figure(width: float, height: float, layout: str | None = "constrained") -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
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
    # the fast octree palette: a tenth of median cut's time with zlib's search on top, and on these
    # flat-coloured charts a smaller file (EfficientNet-Lite0's worst histogram: 11.7 against 14.7 kB)
    image.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(out, format="PNG")
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


def _binned(st: TensorStats, upper: float, steps: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, negative counts, edges)`` up to ``upper``, neighbouring bins merged to about ``steps``."""
    stop = min(st.nbins, int(math.ceil(upper / st.bin_width))) if st.bin_width else 1
    group = max(1, int(2 ** math.floor(math.log2(max(stop / steps, 1)))))
    stop = int(math.ceil(stop / group) * group)

    def merge(h: np.ndarray) -> np.ndarray:
        h = h.astype(np.float64)
        return np.pad(h, (0, max(0, stop - h.size)))[:stop].reshape(-1, group).sum(axis=1)

    edges = np.arange(stop // group + 1) * (st.bin_width or 1.0) * group
    return merge(st.hist), merge(st.hist_neg), edges


def draw_histogram(ax: "Axes", st: TensorStats, lines: Sequence[tuple[str, "TensorQuality"]], target: str,
                   legend: bool = True) -> None:
    """The ``|x|`` histogram of ``st`` on log counts, one labelled vertical line per threshold."""
    upper = max([(_last_bin(st) + 1) * st.bin_width] + [q.amax for _, q in lines]) * 1.04 or 1.0
    counts, _, edges = _binned(st, upper)
    floor = 0.7
    ax.stairs(np.maximum(counts, floor), edges, baseline=floor, fill=True, color=HIST_COLOUR, label="|x| histogram")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(_count_label))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(floor, max(counts.max(), 1.0) * 3)
    ax.set_xlim(0, edges[-1])
    styles = ("-", "--", "-.", ":")
    for i, (label, q) in enumerate(lines):
        sqnr = "-" if q.sqnr_db is None else f"{q.sqnr_db:.1f} dB"
        text = f"{label}: amax {q.amax:.4g}\n   clipped {_percent(q.clipped)}, SQNR {sqnr}"
        ax.axvline(q.amax, color=colour(label), linestyle=styles[i % len(styles)], linewidth=1.6, label=text)
    ax.set_xlabel("|x|, activation magnitude (tensor units)")
    ax.set_ylabel("elements per bin (log)")
    ax.set_title(f"{st.name}\nmin {st.min:.4g}, max {st.max:.4g}, {st.count:,} elements; SQNR on {target}",
                 loc="left", fontsize=9)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="threshold per calibrator",
                  title_fontsize=8, alignment="left")


def draw_thumbnail(ax: "Axes", st: TensorStats, lines: Sequence[tuple[str, "TensorQuality"]]) -> None:
    """A small histogram: log10 counts drawn on a linear axis (no log locator: fast), thresholds, no text."""
    upper = max([(_last_bin(st) + 1) * st.bin_width] + [q.amax for _, q in lines]) * 1.04 or 1.0
    counts, _, edges = _binned(st, upper, steps=128)
    heights = np.log10(np.maximum(counts, 1.0)) + (counts > 0) * 0.15
    ax.stairs(heights, edges, fill=True, color=HIST_COLOUR)
    for label, q in lines:
        ax.axvline(q.amax, color=colour(label), linewidth=1.0)
    ax.set_xlim(0, edges[-1])
    ax.set_ylim(0, max(heights.max(), 1.0) * 1.05)
    ax.set_yticks([])
    ax.tick_params(labelsize=6, length=2, pad=1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))


def _percent(fraction: float) -> str:
    if fraction == 0:
        return "0%"
    if fraction < 1e-4:
        return f"{fraction * 100:.1e}%"
    return f"{fraction * 100:.3g}%"


def histogram_png(st: TensorStats, lines: Sequence[tuple[str, "TensorQuality"]], target: str,
                  compact: bool = False) -> bytes:
    """One tensor's histogram as PNG: 900 x 320 px, or a 240 x 70 px thumbnail when ``compact``."""
    with report_style():
        if compact:
            fig = new_figure(2.4, 0.7, layout=None)
            draw_thumbnail(fig.add_axes((0.02, 0.24, 0.96, 0.74)), st, lines)
            return png_bytes(fig, colours=32)
        fig = new_figure(9.0, 3.2, layout=None)
        draw_histogram(fig.add_axes((0.075, 0.14, 0.62, 0.72)), st, lines, target)
        return png_bytes(fig)


def _rows_figure(labels: Sequence[str], legend_row: bool) -> tuple["Figure", "Axes"]:
    """A figure for one row per label, margins computed from the label lengths (no layout engine:
    that is most of the drawing time of a chart with many labels); ``legend_row`` keeps room for a
    legend on the right."""
    n = max(len(labels), 1)
    top_in, bottom_in = 0.4, 0.5
    height = top_in + bottom_in + 0.2 * n
    width = 8.2
    left_in = 0.15 + 0.056 * max((len(_shorten(s)) for s in labels), default=4)
    right_in = 1.45 if legend_row else 0.35
    fig = new_figure(width, height, layout=None)
    ax = fig.add_axes((left_in / width, bottom_in / height, 1 - (left_in + right_in) / width, 0.2 * n / height))
    return fig, ax


def bar_chart_svg(labels: Sequence[str], values: Sequence[float | None], *, title: str, xlabel: str,
                  colour_of_bars: str = "#0072B2") -> bytes:
    """Horizontal bars from zero, the first label on top, each bar labelled with its value."""
    with report_style():
        fig, ax = _rows_figure(labels, legend_row=False)
        y = np.arange(len(labels))
        vals = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ax.barh(y, np.nan_to_num(vals), color=colour_of_bars, height=0.7)
        for yi, v in zip(y, vals):
            if not np.isnan(v):
                ax.annotate(f"{v:.3g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        _finish_rows(ax, labels, title, xlabel)
        ax.margins(x=0.08)
        return svg_bytes(fig)


def dot_chart_svg(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str, xlabel: str,
                  highlight: str | None = None, colours: dict[str, str] | None = None) -> bytes:
    """One row per label, one marker per series (a calibrator): differences stay visible where bars
    from zero would all look alike.  ``highlight`` is drawn larger; a grey line spans each row's values."""
    with report_style():
        fig, ax = _rows_figure(labels, legend_row=True)
        y = np.arange(len(labels))
        arrays = {k: np.array([np.nan if v is None else v for v in vals], dtype=np.float64) for k, vals in series.items()}
        if len(arrays) > 1:
            stacked = np.vstack(list(arrays.values()))
            lo = np.min(np.where(np.isnan(stacked), np.inf, stacked), axis=0)
            hi = np.max(np.where(np.isnan(stacked), -np.inf, stacked), axis=0)
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.hlines(y[ok], lo[ok], hi[ok], color="#c8d0d8", linewidth=2.5, zorder=1)
        markers = ("o", "s", "D", "^", "v", "P")
        for i, (name, vals) in enumerate(arrays.items()):
            big = name == highlight
            ax.plot(vals, y, linestyle="none", marker=markers[i % len(markers)], markersize=7 if big else 4.5,
                    color=(colours or {}).get(name) or colour(name), label=f"{name} (winner)" if big else name, zorder=3 if big else 2,
                    markeredgecolor="white" if big else "none", markeredgewidth=0.6)
        _finish_rows(ax, labels, title, xlabel)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, borderaxespad=0,
                  handletextpad=0.3)
        ax.margins(x=0.05)
        return svg_bytes(fig)


def curve_svg(values: Sequence[float], *, start: float | None, title: str, ylabel: str, best: int | None = None,
              goal: float | None = None) -> bytes:
    """A metric after each epoch as a line (epoch 0: ``start``, the model training began from), the
    ``best`` epoch marked and an optional ``goal`` as a dashed line."""
    from matplotlib.figure import Figure

    with report_style():
        fig = Figure(figsize=(6.0, 2.6), layout="constrained")
        ax = fig.add_subplot()
        xs = list(range(1, len(values) + 1))
        if start is not None:
            ax.plot([0, *xs[:1]], [start, *values[:1]], color="#9aa7b4", linestyle=":", linewidth=1.2)
            ax.plot([0], [start], marker="s", color="#4b5866", linestyle="none", label="start")
        ax.plot(xs, values, marker="o", markersize=3.5, color="#0072B2", linewidth=1.4, label="after each epoch")
        if best is not None and 1 <= best <= len(values):
            ax.plot([best], [values[best - 1]], marker="o", markersize=8, markerfacecolor="none", color="#D55E00",
                    linestyle="none", label=f"kept: epoch {best}")
        if goal is not None:
            ax.axhline(goal, color="#000000", linestyle="--", linewidth=0.8, label=f"tolerance {goal:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, loc="left")
        ax.grid(color="#dddddd", linewidth=0.6)
        ax.legend(loc="lower right", frameon=False, fontsize=7)
        return svg_bytes(fig)


def _finish_rows(ax: "Axes", labels: Sequence[str], title: str, xlabel: str) -> None:
    n = len(labels)
    ax.set_yticks(np.arange(n), [_shorten(s) for s in labels], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.grid(axis="y", color="#f0f0f0", linewidth=0.6)
    ax.set_axisbelow(True)


def _shorten(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
