"""examples/quickstart.ipynb runs top to bottom (executed in a kernel, as a user would), so it cannot rot."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.notebook
def test_quickstart_notebook_executes(tmp_path):
    import nbformat  # the dev extra installs them: a missing one fails here, loudly
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "identical after unpatch: True" in outputs and "reloaded outputs identical: True" in outputs
    assert "of dense" in outputs and "faster" in outputs
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert images, "the plot cell drew nothing"
