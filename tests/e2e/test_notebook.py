"""`examples/glmv_api.ipynb` runs top to bottom (nbclient, a fresh IPython kernel) against a live
`glmv serve` on the embedded demo model; every cell's own asserts must hold and no cell may raise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import GlmvServeProcess

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "glmv_api.ipynb"


def test_notebook_runs_against_a_live_server(
    live_glmv: GlmvServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    # The kernel inherits this environment: where the server is, and no key.
    monkeypatch.setenv("GLMV_BASE_URL", live_glmv.url)
    monkeypatch.delenv("GLMV_API_KEY", raising=False)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    outputs = {
        i: "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    }
    text = "\n".join(outputs.values())
    assert "model: glmv-demo" in text
    assert "random weights: False" in text
    assert "built-in schemas:" in text and "'invoice'" in text
    assert "flagged=" in text
    assert all(out.strip() for out in outputs.values()), "every code cell prints something"
