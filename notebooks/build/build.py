"""Builds the notebooks under ``notebooks/`` from their sources in ``notebooks/build/``.

    python -m simpar notebooks                   # every notebook, executed, with its outputs
    python notebooks/build/build.py 02 --run     # the same for the notebooks named "02..."
    python notebooks/build/build.py              # every notebook, without outputs

A source, ``notebooks/build/<name>.md``, is the notebook written as a Markdown
document: every fenced ````` ```python ````` block is a code cell and the text between
two blocks is a markdown cell (a line ``<!-- cell -->`` splits it into two).  So a
notebook reads, and is reviewed, as one page of prose and code; the ``.ipynb`` next
to it is generated, with stable cell ids, and ``tests/test_notebooks.py`` checks that
it is up to date, that it runs, and that its saved outputs are what it prints now.

Executed notebooks are deterministic: they run in a scratch folder with one BLAS
thread and the Agg backend (figures appear only through ``simpar.viz.show``,
byte-stable PNGs), without timing metadata, so running them again changes nothing.
"""
from __future__ import annotations

import copy
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SOURCES = Path(__file__).resolve().parent
NOTEBOOKS = SOURCES.parent
FENCE, END, SPLIT = "```python", "```", "<!-- cell -->"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def parse(text: str) -> list[tuple[str, str]]:
    """``[(kind, source), ...]`` with kind ``"markdown"`` or ``"code"``; empty
    markdown between two code blocks is no cell."""
    cells, lines, in_code = [], [], False

    def flush(kind: str) -> None:
        source = "\n".join(lines).strip()
        if source or kind == "code":
            cells.append((kind, source))
        lines.clear()

    for line in text.splitlines():
        if not in_code and line.strip() == FENCE:
            flush("markdown")
            in_code = True
        elif in_code and line.strip() == END:
            flush("code")
            in_code = False
        elif not in_code and line.strip() == SPLIT:
            flush("markdown")
        else:
            lines.append(line)
    if in_code:
        raise ValueError("a ```python block is not closed")
    flush("markdown")
    return cells


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """The notebook of ``cells``; cell ids ``cell-0``, ``cell-1``, … so that a
    rebuilt notebook only differs where its source did."""
    new = {"markdown": new_markdown_cell, "code": new_code_cell}
    nb = new_notebook(cells=[new[kind](source) for kind, source in cells],
                      metadata={"kernelspec": dict(KERNEL)})
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    return nb


def target(source: Path) -> Path:
    """``notebooks/build/02_x.md`` → ``notebooks/02_x.ipynb``."""
    return NOTEBOOKS / (source.stem + ".ipynb")


#: the kernel's environment: what CI runs with, so outputs are the same everywhere
EXECUTION_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                 "SIMPAR_CHECK": "1"}


def execute(nb: nbformat.NotebookNode, folder: str | None = None,
            timeout: int = 120) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom (in place) in ``folder`` (default: a scratch folder,
    so whatever it writes stays out of the repository); returns it."""
    import nbclient
    saved = {k: os.environ.get(k) for k in EXECUTION_ENV}
    os.environ.update(EXECUTION_ENV)                    # the kernel inherits them
    try:
        with tempfile.TemporaryDirectory() as scratch:
            cwd = folder or scratch
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    record_timing=False,
                                    resources={"metadata": {"path": cwd}}).execute(cwd=cwd)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merged_streams(cell.outputs)
    return nb


def merged_streams(outs: list) -> list:
    """Consecutive stream outputs of one stream joined into one: how a cell's
    printing is cut into chunks depends on timing, what it printed does not."""
    merged = []
    for o in outs:
        if merged and o.output_type == "stream" and merged[-1].output_type == "stream" \
                and merged[-1].name == o.name:
            merged[-1].text += o.text
        else:
            merged.append(o)
    return merged


# numbers at rounding level (relative errors like 2.2e-16) may differ in the last
# bit between CPUs; the check of saved outputs compares them as "tiny"
_TINY = re.compile(r"\b\d(\.\d+)?e-(1[1-9]|[2-9]\d|\d{3})\b")


def outputs(nb: nbformat.NotebookNode) -> list:
    """What the code cells of ``nb`` showed, comparable between two runs:
    ``[(source, [(output type, text or PNG)...])...]``."""
    shown = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outs = []
        for o in merged_streams(copy.deepcopy(cell.get("outputs", []))):
            if o.output_type == "stream":
                outs.append((o.name, _TINY.sub("tiny", o.text)))
            elif o.output_type == "error":
                outs.append(("error", o.ename + ": " + o.evalue))
            else:
                data = o.get("data", {})
                outs.append((o.output_type, data.get("image/png") or
                             _TINY.sub("tiny", data.get("text/plain", ""))))
        shown.append((cell.source, outs))
    return shown


def build(source: Path, run: bool = False) -> Path:
    """Write the notebook of ``source`` (executed first if ``run``); returns its path."""
    nb = notebook(parse(source.read_text(encoding="utf-8")))
    if run:
        execute(nb)
    path = target(source)
    nbformat.write(nb, str(path))
    return path


def sources(prefixes=()) -> list[Path]:
    """The notebook sources, all or those whose name starts with one of ``prefixes``."""
    found = sorted(SOURCES.glob("[0-9]*.md"))
    return [s for s in found if not prefixes or s.name.startswith(tuple(prefixes))]


def main(argv: list[str]) -> None:
    run = "--run" in argv
    chosen = sources([a for a in argv if a != "--run"])
    if not chosen:
        raise SystemExit(f"no notebook source matches {argv}; sources: "
                         f"{[s.name for s in sources()]}")
    for source in chosen:
        print("wrote", build(source, run))


if __name__ == "__main__":
    main(sys.argv[1:])
