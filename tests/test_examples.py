"""The Colab notebook and the quickstart run, so they cannot rot."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colab_notebook_executes(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    monkeypatch.setenv("KERAS_SNAPSHOT_NOTEBOOK_SMOKE", "1")
    path = os.path.join(ROOT, "examples", "colab_snapshot_ensemble.ipynb")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    run_dir = tmp_path / "notebook_run"
    assert (run_dir / "ensemble.keras").exists()
    assert (run_dir / "saved_model").exists()
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "SavedModel serves the same probabilities." in outputs


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ensemble:   test error" in result.stdout
    assert (tmp_path / "quickstart_ensemble.keras").exists()
