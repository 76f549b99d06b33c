"""Writing a run folder: atomically, deterministically, with a manifest of what it holds.

It knows nothing of the report: the command that finishes a run asks for it
(:func:`quantlab.report.write_report_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab.errors import check
from quantlab.textio import csv_text, dumps_json, write_text  # noqa: F401  (the writers of a run folder)


UNHASHED = ("timing", "report")  # files that show measured times or dates: listed without a digest


@dataclass(frozen=True)
class Artefact:
    """One file of a run: its path relative to the run folder and what it is."""

    path: str
    kind: str
    calibrator: str | None = None
    target: str | None = None

    def to_dict(self, root: Path) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind}
        if self.calibrator:
            d["calibrator"] = self.calibrator
        if self.target:
            d["target"] = self.target
        if self.kind not in UNHASHED:  # measured times differ run to run by nature
            data = (root / self.path).read_bytes()
            d["bytes"] = len(data)
            d["sha256"] = hashlib.sha256(data).hexdigest()
        return d


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final`` whole.

    On any error the temporary folder is removed and ``final`` is left as it was, so an interrupted
    or failed run never leaves a half-written run folder.
    """
    final = Path(final)
    check(not final.is_file(), f"output path '{final}' is a file: pass a folder to --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def update_manifest(run: Path, artefacts: list[Artefact]) -> None:
    """List ``artefacts`` in ``run/manifest.json`` (replacing entries with the same path), atomically."""
    path = run / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    new = {a.path for a in artefacts}
    kept = [a for a in manifest.get("artefacts", []) if a.get("path") not in new]
    manifest["artefacts"] = kept + [a.to_dict(run) for a in artefacts]
    tmp = run / f".manifest.json.tmp-{os.getpid()}"
    write_text(tmp, dumps_json(manifest))
    os.replace(tmp, path)
