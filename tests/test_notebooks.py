"""Every notebook under notebooks/ is generated from its source in notebooks/build/
(and is up to date with it), executes top to bottom in under 60 s, and is saved
with the outputs it shows when run (``python -m simpar notebooks``)."""
import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _builder():
    path = ROOT / "notebooks" / "build" / "build.py"
    spec = importlib.util.spec_from_file_location("notebook_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_builder_parses_cells():
    pytest.importorskip("nbformat")
    b = _builder()
    text = "# Title\n\ntext\n\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n<!-- cell -->\nend\n"
    assert b.parse(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"),
                             ("code", "y = 2"), ("markdown", "end")]
    with pytest.raises(ValueError, match="not closed"):
        b.parse("```python\nx = 1\n")


@pytest.mark.parametrize("source", _builder().sources() if importlib.util.find_spec("nbformat")
                         else [], ids=lambda p: p.name)
def test_notebook_is_built_from_its_source(source):
    """``python notebooks/build/build.py`` was run after the last edit of ``source``."""
    nbformat = pytest.importorskip("nbformat")
    b = _builder()
    built = b.notebook(b.parse(source.read_text(encoding="utf-8")))
    path = b.target(source)
    assert path.exists(), f"{path.name} missing: run python notebooks/build/build.py"
    on_disk = nbformat.read(path, as_version=4)
    assert [(c.cell_type, c.source) for c in on_disk.cells] == \
        [(c.cell_type, c.source) for c in built.cells], \
        f"{path.name} is stale: run python notebooks/build/build.py {source.stem[:2]}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_saved_outputs_are_current(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    b = _builder()
    saved = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    b.execute(nb, str(tmp_path))                # figures land in a scratch folder
    assert time.perf_counter() - t0 < 60, f"{path.name} took too long"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    assert len(b.outputs(nb)) == len(b.outputs(saved))
    for (src, now), (_, then) in zip(b.outputs(nb), b.outputs(saved)):
        assert now == then, (f"{path.name}: the saved outputs are stale (run python -m simpar "
                             f"notebooks --only {path.name[:2]}); cell:\n{src[:300]}")


def test_output_comparison_sees_changes_but_not_rounding():
    # negative control for the check above
    nbformat = pytest.importorskip("nbformat")
    b = _builder()

    def nb(text, png="iVBOR"):
        cell = nbformat.v4.new_code_cell("print(x)")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text),
                        nbformat.v4.new_output("display_data", data={"image/png": png})]
        return nbformat.v4.new_notebook(cells=[cell])
    assert b.outputs(nb("err 2.2e-16 loss 1.25\n")) == b.outputs(nb("err 4.4e-16 loss 1.25\n"))
    assert b.outputs(nb("err 2.2e-06\n")) != b.outputs(nb("err 4.4e-06\n"))
    assert b.outputs(nb("loss 1.25\n")) != b.outputs(nb("loss 1.26\n"))
    assert b.outputs(nb("a", "iVBOR1")) != b.outputs(nb("a", "iVBOR2"))
    one, two = nb("a\nb\n"), nb("a\n")                # printing cut in chunks: the same
    two.cells[0].outputs.insert(1, nbformat.v4.new_output("stream", name="stdout", text="b\n"))
    assert b.outputs(one) == b.outputs(two)
