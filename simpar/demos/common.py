"""What every demo shares: its command-line options and "am I the printing rank?"."""
from __future__ import annotations

import argparse

from .. import sim
from ..comm import init


def demo_parser(prog: str, doc: str, cluster: str = "a100",
                cluster_help: str = "simulated cluster for the simulated clock") -> argparse.ArgumentParser:
    """``--world-size``, ``--backend``, ``--cluster`` and ``--out``; add your own."""
    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=None,
                    help="devices in the threads world (default 4; under mpiexec: -n)")
    ap.add_argument("--backend", default="auto", choices=["auto", "threads", "mpi"])
    ap.add_argument("--cluster", default=cluster, choices=sorted(sim.PRESETS),
                    help=f"{cluster_help} (default {cluster})")
    ap.add_argument("--out", default="figures", help="folder for figures (default ./figures)")
    return ap


def process_rank() -> int:
    """This process's rank in an MPI job (0 without one): only rank 0 prints."""
    if init() == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_rank()
    return 0
