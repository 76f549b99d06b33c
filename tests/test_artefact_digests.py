"""Byte-identical artefacts: a PTQ run of a tiny model matches the sha256 digests recorded in tests/golden/.

The run uses every calibrator and the three targets, so every writer of a run folder (statistics, FP32 and
FP16 models, Q/DQ models written by ONNX Runtime's quantizer and by the scale rewrite, the dynamic model,
calibration caches, scale tables, summary, manifest) is covered.  A change that alters any artefact's bytes
fails here; when the change is intended, regenerate the record with ``python tests/test_artefact_digests.py``
and say why in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "ptq_digests.json"


def _config_text() -> str:
    # relative paths: config.json (and so the manifest) must not depend on the temporary folder
    return """
[model]
onnx = "tiny.onnx"
[data]
calib = "calib"
batch_size = 5
[ptq]
calibrators = ["minmax", "percentile", "entropy", "mse", "entropy-trt", "entropy-modelopt"]
targets = ["tensorrt", "ort-cpu", "ort-dynamic"]
out = "reports"
run_name = "golden"
latency_runs = 0
report = false
"""


def ptq_digests(folder: Path) -> dict[str, str]:
    """Run PTQ on the tiny model in ``folder``; every hashed artefact's sha256 (and the manifest's own)."""
    import hashlib

    from conftest import conv_net, save_model, write_tiny_calib

    from quantlab.config import load_config
    from quantlab.ptq import run_ptq

    save_model(conv_net(), folder / "tiny.onnx")
    write_tiny_calib(folder / "calib")
    (folder / "quantlab.toml").write_text(_config_text())
    run = run_ptq(load_config(folder / "quantlab.toml")).run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    digests = {a["path"]: a["sha256"] for a in manifest["artefacts"] if "sha256" in a}
    digests["manifest.json"] = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    return dict(sorted(digests.items()))


def test_ptq_artefacts_match_the_recorded_digests(tmp_path):
    recorded = json.loads(GOLDEN.read_text())
    digests = ptq_digests(tmp_path)
    assert digests.keys() == recorded.keys()
    assert [k for k in digests if digests[k] != recorded[k]] == []


if __name__ == "__main__":  # regenerate the record: python tests/test_artefact_digests.py
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(ptq_digests(Path(tmp)), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
