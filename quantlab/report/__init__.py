"""Reports of a run folder: ``index.html`` for people, ``summary.md`` for CI, ``report.json`` for tools.

>>> from quantlab.report import load_run, write_report            # doctest: +SKIP
>>> run = load_run("reports/efficientnet-lite0")                   # doctest: +SKIP
>>> run.winner, run.worst_tensors(5)                                 # doctest: +SKIP
>>> write_report(run.path)                                           # doctest: +SKIP
PosixPath('reports/efficientnet-lite0/index.html')

The notebooks in ``notebooks/`` and the HTML report use the same :class:`Run` object.
"""

from __future__ import annotations

from quantlab.report.build import REPORT_FILES, build_report, write_report, write_report_files
from quantlab.report.run import Run, TensorQuality, Winner, calibrator_label, fake_quant_quality, load_run

__all__ = [
    "REPORT_FILES",
    "Run",
    "TensorQuality",
    "Winner",
    "build_report",
    "calibrator_label",
    "fake_quant_quality",
    "load_run",
    "write_report",
    "write_report_files",
]
