"""The Colab notebook runs top to bottom on CPU (issue: Colab notebook and TPU pod launch recipe).

notebooks/flexdraft_colab.ipynb is executed with nbclient in a fresh python3 kernel, on the CPU
path (tiny random target trained in-process, every decoding mode, the benchmark): no cell may
error, greedy outputs must match AR in every mode, and the benchmark table and its plots must be
among the outputs. The install cell is skipped because the package is importable (no network).
"""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from flexdraft_jax.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "flexdraft_colab.ipynb")
TABLE_HEADER = report.format_table({"rows": []}).splitlines()[0]  # "mode  batch  tau  tok/s ..."


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o.get("output_type") == "stream":
            parts.append(o["text"])
        elif "data" in o:
            parts.append(o["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("FLEXDRAFT_WORKDIR", str(tmp_path / "work"))
    # The kernel imports this checkout's package, not one the environment has installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell if one fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(_text(c.outputs) for c in code)
    print(text)
    assert "flexdraft_jax from" in text and "cpu device(s)" in text
    assert "config tiny" in text
    assert "decoding mesh: one device of 1 cpu device(s)" in text  # the mesh it chose
    for mode in ("ar", "sequential", "parallel", "flex", "paper"):
        assert any(
            line.split()[:1] == [mode] and line.rstrip().endswith("True")
            for line in text.splitlines()
        ), f"no matching greedy line for {mode}"
    assert TABLE_HEADER in text
    assert text.count(" yes ") + text.count(" yes\n") >= 5 and " NO " not in text
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # speedup and acceptance (and step costs)
