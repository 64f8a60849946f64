"""Regenerate the committed figures: ``python -m simpar figures``.

Runs every demo (those that take a world: on 4 threads) and writes its figures into the
repository's ``figures/`` folder (``--out DIR`` chooses another; ``--only NAME ...``
draws only some).  This is the only command that writes into ``figures/``: the
demos themselves write into ``./out`` unless told otherwise.

The figures drawn on the simulated clock or from counted bytes and memory
(:data:`DETERMINISTIC`) are byte-identical from run to run; the timelines also
show this machine's wall clock, which differs every run.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

# figure -> the demo that draws it, and the options it is drawn with
FIGURES = {
    "demo_timeline.png": "overview",
    "tp_timeline.png": "tensor_parallel",
    "tp_comm_volume.png": "tensor_parallel",
    "tp_memory.png": "tensor_parallel",
    "pp_schedules.png": "pipeline_parallel",
    "pp_bubble.png": "pipeline_parallel",
    "pp_timeline.png": "pipeline_parallel",
    "ep_dispatch_timeline.png": "expert_parallel",
    "ep_load.png": "expert_parallel",
    "hybrid_loss.png": "hybrid",
    "zero_memory.png": "zero",
    "activation_memory.png": "memory",
    "mixed_precision_loss.png": "memory",
    "cp_ring_overlap.png": "context_parallel",
    "cp_ring_vs_ulysses.png": "context_parallel",
}
# the demos that run on a world of the user's choice (the others start their own)
WORLD_DEMOS = ("overview", "tensor_parallel", "pipeline_parallel", "expert_parallel")
# drawn only from the simulated clock, the tracer's byte counts, the memory
# ledger or a seeded training run: the same bytes every run
DETERMINISTIC = ("tp_comm_volume.png", "tp_memory.png", "pp_schedules.png", "pp_bubble.png",
                 "ep_load.png", "hybrid_loss.png", "zero_memory.png",
                 "activation_memory.png", "mixed_precision_loss.png",
                 "cp_ring_overlap.png", "cp_ring_vs_ulysses.png")


def repository_figures() -> Path | None:
    """``<checkout>/figures`` when simpar runs from a source checkout, else None."""
    root = Path(__file__).resolve().parents[2]
    return root / "figures" if (root / "figures").is_dir() and (root / "simpar").is_dir() else None


def draw(names, out: Path, quiet: bool = True) -> list[Path]:
    """Run the demos that draw ``names`` (4 threads) and copy those figures to ``out``."""
    import importlib
    demos = sorted({FIGURES[n] for n in names}, key=list(FIGURES.values()).index)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for demo in demos:
            module = importlib.import_module(f"simpar.demos.{demo}")
            sink = io.StringIO() if quiet else None
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                world = ["--world-size", "4", "--backend", "threads"] if demo in WORLD_DEMOS else []
                module.main(world + ["--out", tmp])
            for n in names:
                if FIGURES[n] == demo:
                    shutil.copyfile(os.path.join(tmp, n), out / n)
                    written.append(out / n)
                    print(f"wrote {out / n}", flush=True)
    return written


def parser():
    from ..cli import Parser
    ap = Parser("python -m simpar figures", __doc__)
    ap.add_argument("--out", default=None,
                    help="folder to write into (None: the repository's figures/)")
    ap.add_argument("--only", nargs="+", choices=sorted(FIGURES), metavar="NAME",
                    help="draw only these figures: " + ", ".join(FIGURES))
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else repository_figures()
    if out is None:
        ap.error("not running from a source checkout: give --out DIR")
    draw(args.only or list(FIGURES), out)


if __name__ == "__main__":
    main()
