"""The Colab notebook: the .ipynb is the jupytext pair of its .py source, and every cell runs,
end to end on the CPU, in its smoke setting (a few training steps, small evaluations, no network).
"""

import json
import os
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "launch" / "colab" / "dino_demo.py"
NOTEBOOK = REPO / "launch" / "colab" / "dino_demo.ipynb"
WORKDIR = Path("runs/demo_notebook")  # the notebook's, relative to where it runs


def cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_ipynb_is_the_jupytext_pair_of_the_py_without_outputs():
    source, notebook = jupytext.read(SOURCE), jupytext.read(NOTEBOOK)
    assert cells(notebook) == cells(source), (
        "launch/colab/dino_demo.ipynb differs from dino_demo.py: run "
        "`jupytext --sync launch/colab/dino_demo.py`"
    )
    # Stored without outputs, so that diffs show only the code.
    code = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def kernel_env() -> dict[str, str]:
    """The notebook's environment: smoke mode on one CPU device, matplotlib's inline figures."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env.update(DINO_NOTEBOOK_SMOKE="1", JAX_PLATFORMS="cpu")
    # dino_jax from this checkout, installed (`pip install -e .`) or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Anything that tried the network would fail at once rather than wait.
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return env


def outputs_of(cell) -> tuple[str, int]:
    """(all text the cell printed, number of PNG figures it displayed)."""
    text, figures = [], 0
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            figures += "image/png" in out.data
            text.append(out.data.get("text/plain", ""))
    return "".join(text), figures


@pytest.mark.slow
def test_notebook_runs_every_cell_in_smoke_mode(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Which Python ran it: the kernel must be this environment's.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # the working directory
    )
    client.execute(env=kernel_env())  # raises CellExecutionError naming a failing cell

    printed = [outputs_of(cell) for cell in notebook.cells if cell.cell_type == "code"]
    text = "".join(t for t, _ in printed)
    assert printed[-1][0].strip() == sys.executable
    assert sum(figures for _, figures in printed) >= 2  # the loss curves, the attention maps
    assert "20-NN (T=0.07): top-1" in text
    assert "k-NN (k=20) of the trained teacher: top-1" in text
    assert "Jaccard of the 60%-mass masks on 32 images" in text

    workdir = tmp_path / WORKDIR
    for name in ("loss.png", "attention.png", "attention/jaccard.json", "teacher.pth"):
        assert (workdir / name).stat().st_size > 0, name
    knn = json.loads((workdir / "knn.json").read_text())
    assert (knn["train"]["examples"], knn["val"]["examples"]) == (256, 128)
    assert 0 <= knn["knn"]["20"]["top1"] <= knn["knn"]["20"]["top5"] <= 100
    # Smoke mode never downloads: the official-layout file is our teacher's, loaded back exactly.
    assert not (workdir / "dino_deitsmall16_pretrain.pth").exists()
    assert "max |difference| = 0.00e+00" in text
