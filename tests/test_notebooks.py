"""Every notebook under notebooks/ is generated from its source in notebooks/build/
(and is up to date with it), and executes top to bottom in under 60 s."""
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
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.chdir(tmp_path)                 # figures land in a scratch folder
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert time.perf_counter() - t0 < 60, f"{path.name} took too long"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
