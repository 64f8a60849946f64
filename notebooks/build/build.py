"""Builds the notebooks under ``notebooks/`` from their sources in ``notebooks/build/``.

    python notebooks/build/build.py              # every notebook (written without outputs)
    python notebooks/build/build.py 02 --run     # the notebooks whose name starts "02", executed

A source, ``notebooks/build/<name>.md``, is the notebook written as a Markdown
document: every fenced ````` ```python ````` block is a code cell and the text between
two blocks is a markdown cell (a line ``<!-- cell -->`` splits it into two).  So a
notebook reads, and is reviewed, as one page of prose and code; the ``.ipynb`` next
to it is generated, with stable cell ids, and ``tests/test_notebooks.py`` checks that
it is up to date and that it runs.
"""
from __future__ import annotations

import sys
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


def build(source: Path, run: bool = False) -> Path:
    """Write the notebook of ``source`` (executed first if ``run``); returns its path."""
    nb = notebook(parse(source.read_text(encoding="utf-8")))
    if run:
        import nbclient
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
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
