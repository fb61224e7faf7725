"""Every notebook runs top to bottom offline; committed notebooks carry no outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_numbered_in_order_from_01():
    numbers = [p.stem[:2] for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)) and numbers[0] == "01"
    assert {"01", "02", "03", "04", "05", "06", "07", "08"} <= set(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    env_backup = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    try:
        client = NotebookClient(book, timeout=600, kernel_name="python3", allow_errors=False,
                                resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    produced = [c for c in book.cells if c.cell_type == "code" and c.outputs]
    assert produced, "the notebook ran but showed nothing"
