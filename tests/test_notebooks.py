"""Notebooks: committed without outputs, and each executes end to end with nbmake at smoke size."""
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_notebooks_exist():
  names = [p.stem for p in NOTEBOOKS]
  assert "01_sinkhorn_and_the_birkhoff_polytope" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
  nb = json.loads(path.read_text())
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert not cell.get("outputs"), f"{path.name} cell {i} has stored outputs"
      assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  from nbmake.nb_run import NotebookRun
  monkeypatch.setenv("MHC_SMOKE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  result = NotebookRun(path, default_timeout=600).execute()
  assert result.error is None, f"{path.name}: {result.error.summary}\n{result.error.trace[-3000:]}"
