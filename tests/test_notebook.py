"""notebooks/analysis.ipynb runs end to end in a real Jupyter kernel against a small real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_report import make_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_notebook_finds_its_run_by_parameter_or_environment():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    source = "".join(params["source"])
    assert 'os.environ.get("QUANTLAB_RUN", "../reports/efficientnet-lite0")' in source
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")  # stored without outputs


def test_analysis_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[dev]'")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed: pip install -e '.[dev]'")

    run_dir = make_run(tmp_path / "work", targets=("tensorrt",))
    monkeypatch.setenv("QUANTLAB_RUN", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"Run('{run_dir}', model='tiny')" in text
    assert "percentile 99.9" in text and "mean SQNR" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the worst tensors, then the percentile comparison
    assert not [o for o in outputs if o.output_type == "error"]
