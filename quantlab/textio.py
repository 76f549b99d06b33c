"""Deterministic text files: JSON with sorted keys, CSV, UTF-8 with ``\\n`` line ends.

The lowest layer of the run folder: the writer (:mod:`quantlab.artefacts`), the report
(:mod:`quantlab.report`) and every command use it, and it imports nothing of quantlab.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


def dumps_json(obj: Any) -> str:
    """JSON with sorted keys and a trailing newline: the same object always gives the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line ends, creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """``header`` and ``rows`` as CSV text with ``\\n`` line ends."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
