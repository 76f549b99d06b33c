"""Draw the per-epoch curves of ``qat_gpu.py`` runs: one panel per model, fixed vs learned ranges.

    python benchmarks/plot_qat.py benchmarks/qat_gpu_2026-12-01.json benchmarks/qat_gpu_2026-12-01.png

The JSON holds ``runs``: each with ``run`` (a name), ``start`` (the PTQ metric) and ``metrics`` (the
metric after each epoch).  The panels and their runs are listed in ``PANELS``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [
    ("MiniLM-L6: mean cosine", 0.99, [("mlm-fixed", "fixed ranges"), ("mlm-lsq-a3", "LSQ, range_lr 1e-3"),
                                      ("mlm-lsq-a2", "LSQ, range_lr 1e-2")]),
    ("PP-OCRv6 detector: pixel IoU", 0.95, [("det-fixed", "fixed ranges"), ("det-lsq-a3", "LSQ, range_lr 1e-3"),
                                            ("det-lsq-a2", "LSQ, range_lr 1e-2")]),
    ("EfficientNet-Lite0: top-1 agreement", None, [("lite-fixed", "fixed ranges"), ("lite-lsq-a3", "LSQ, range_lr 1e-3"),
                                                   ("lite-lsq-a2", "LSQ, range_lr 1e-2")]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="qat_gpu results JSON")
    ap.add_argument("out", help="PNG to write")
    args = ap.parse_args()
    from matplotlib.figure import Figure

    runs = {r["run"]: r for r in json.loads(Path(args.results).read_text(encoding="utf-8"))["runs"]}
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (title, goal, items) in zip(axes, PANELS):
        start = runs[items[0][0]]["start"]
        for (key, label), style in zip(items, ["-o", "-s", "-^"]):
            m = runs[key]["metrics"]
            ax.plot(range(0, len(m) + 1), [start, *m], style, ms=3, lw=1.2, label=label)
        if goal:
            ax.axhline(goal, color="k", ls="--", lw=0.8, label=f"goal {goal}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (0: the minmax PTQ start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("QAT from a minmax start on one H200: metric after each epoch", fontsize=10)
    fig.savefig(args.out, dpi=80, metadata={"Software": None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
