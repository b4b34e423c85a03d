"""Hygiene of the committed lessons (nbmake executes them; this checks how they are stored).

Every ``lessons/*.ipynb`` must be committed without outputs or execution counts (readable
diffs), open with a markdown cell saying what the learner will see, and honour the
``MINISPARSE_FAST`` switch that CI uses to run it quickly.
"""

import json
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))


def _load(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: nbformat {nb.get('nbformat')}, expected 4"
    return nb


def _source(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_there_are_lessons():
    assert NOTEBOOKS, f"no notebooks under {LESSONS}"


def test_lesson_names_are_numbered_and_unique():
    numbers = [p.name.split("_", 1)[0] for p in NOTEBOOKS]
    for p in NOTEBOOKS:
        n = p.name.split("_", 1)[0]
        assert len(n) == 2 and n.isdigit() and "_" in p.name, f"{p.name}: expected NN_name.ipynb"
    assert len(set(numbers)) == len(numbers), f"duplicate lesson numbers: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has outputs"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_markdown_title(path):
    cells = _load(path)["cells"]
    assert cells and cells[0]["cell_type"] == "markdown", f"{path.name}: first cell not markdown"
    assert _source(cells[0]).lstrip().startswith("#"), f"{path.name}: first cell has no title"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_fast_mode_switch(path):
    code = "\n".join(_source(c) for c in _load(path)["cells"] if c["cell_type"] == "code")
    assert 'os.environ.get("MINISPARSE_FAST") == "1"' in code, f"{path.name}: no fast switch"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_python_kernelspec(path):
    spec = _load(path).get("metadata", {}).get("kernelspec", {})
    assert spec.get("language", "python") == "python" and spec.get("name"), (
        f"{path.name}: missing kernelspec (nbmake needs a kernel name)"
    )
