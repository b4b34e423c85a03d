"""lessons/render.py: the code hash that ties stored outputs to the committed code, and the
clean-up of what would only add noise to a committed notebook."""

import nbformat
import pytest

from lessons.render import _clean, _resolve, code_sha256


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) if kind == "code" else nbformat.v4.new_markdown_cell(s)
                for kind, s in cells]
    return nb


def test_hash_follows_code_cells_only():
    base = code_sha256(_nb(("code", "a = 1"), ("markdown", "# title"), ("code", "b = 2")))
    assert code_sha256(_nb(("code", "a = 1"), ("markdown", "# other"), ("code", "b = 2"))) == base
    assert code_sha256(_nb(("code", "a = 1"), ("code", "b = 3"))) != base
    # moving text across a cell boundary changes what runs in which cell: a different hash
    assert code_sha256(_nb(("code", "a = 1b = 2"))) != code_sha256(_nb(("code", "a = 1"),
                                                                     ("code", "b = 2")))


def test_clean_drops_widgets_and_progress_redraws():
    nb = _nb(("code", "train()"))
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="step 1\rstep 2\rstep 3\ndone\n"),
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "bar"}),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBOR"}),
    ]
    _clean(nb)
    assert "widgets" not in nb.metadata
    assert [o.output_type for o in nb.cells[0].outputs] == ["stream", "display_data"]
    assert nb.cells[0].outputs[0].text == "step 3\ndone\n"
    assert "image/png" in nb.cells[0].outputs[1].data


def test_resolve_names_a_lesson_or_says_what_it_expected():
    assert _resolve("01_autograd").name == "01_autograd.ipynb"
    assert _resolve("lessons/01_autograd.ipynb").name == "01_autograd.ipynb"
    with pytest.raises(SystemExit, match="no lesson 'nope'.*04_tiny_transformer"):
        _resolve("nope")
