"""Execute every notebook and write it back with its outputs: ``python -m simpar notebooks``.

The notebooks under ``notebooks/`` are built from their sources in
``notebooks/build/*.md`` (``notebooks/build/build.py``); this command builds each,
runs it top to bottom in a scratch folder (so whatever it writes stays out of the
repository) and saves it with its outputs, so that the repository shows every
figure and result without running anything.  The outputs are deterministic
(seeded runs, the simulated clock, figures drawn by :func:`simpar.viz.show`
without a version stamp): running the command again changes nothing, and
``tests/test_notebooks.py`` checks that the committed outputs are current.
"""
from __future__ import annotations

import importlib.util
import os
import time

from .figures import repository_figures


def builder():
    """The notebook builder, ``notebooks/build/build.py`` of this checkout (None
    when simpar is not run from a source checkout)."""
    figures = repository_figures()
    if figures is None:
        return None
    path = figures.parent / "notebooks" / "build" / "build.py"
    spec = importlib.util.spec_from_file_location("simpar_notebook_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parser():
    from ..cli import Parser
    ap = Parser("python -m simpar notebooks", __doc__)
    ap.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                    help="run only the notebooks whose name starts with one of these "
                         "(e.g. 02); None: every notebook")
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    b = builder()
    if b is None:
        ap.error("not running from a source checkout (notebooks/ not found)")
    chosen = b.sources(args.only or ())
    if not chosen:
        ap.error(f"no notebook matches {args.only}; notebooks: "
                 f"{[s.stem for s in b.sources()]}")
    for source in chosen:
        t0 = time.perf_counter()
        path = b.build(source, run=True)
        print(f"wrote {os.path.relpath(path)} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
