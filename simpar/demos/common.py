"""What every demo shares: its command-line options, where it writes, what it
says before it starts (which world it runs, how much memory it will take), and
"am I the printing rank?"."""
from __future__ import annotations

import argparse
import os
import sys

from .. import sim
from ..comm import init, launcher_size

DEFAULT_OUT = "out"          # git-ignored; `python -m simpar figures` writes figures/
THREADS_DEFAULT = 4          # devices in the threads world when --world-size is not given
_LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def demo_parser(prog: str, doc: str, cluster: str = "a100",
                cluster_help: str = "simulated cluster for the simulated clock") -> argparse.ArgumentParser:
    """``--world-size``, ``--backend``, ``--cluster`` and ``--out``; add your own."""
    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=None,
                    help=f"devices in the threads world (default {THREADS_DEFAULT}; "
                         "under mpiexec: -n)")
    ap.add_argument("--backend", default="auto", choices=["auto", "threads", "mpi"])
    ap.add_argument("--cluster", default=cluster, choices=sorted(sim.PRESETS),
                    help=f"{cluster_help} (default {cluster})")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"folder for figures and traces (default ./{DEFAULT_OUT}, git-ignored)")
    return ap


def process_rank() -> int:
    """This process's rank in an MPI job (0 without one): only rank 0 prints."""
    if init() == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_rank()
    return 0


def available_memory() -> int:
    """Bytes of memory this machine can still give (``MemAvailable`` of
    ``/proc/meminfo``; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):       # pragma: no cover - exotic systems
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def world_plan(world_size: int | None, backend: str) -> tuple[str, int, str]:
    """``(backend, devices, note)``: the world a demo will run and, when it might
    surprise, a note saying so (``mpiexec -n 1`` runs a threads world)."""
    backend = init(backend)
    note = ""
    if backend == "mpi":
        n = launcher_size()
    else:
        n = THREADS_DEFAULT if world_size is None else world_size
        if any(v in os.environ for v in _LAUNCHER_VARS) and launcher_size() == 1:
            note = (f"note: mpiexec started 1 process, so this runs a {n}-device threads world "
                    f"inside it (one thread per device). For one process per device: "
                    f"mpiexec -n {n} ...")
    if n < 1:
        raise SystemExit(f"error: --world-size must be at least 1, got {n}")
    return backend, n, note


def estimate_bytes(n: int, model: tuple[float, float, float], processes: int = 1) -> float:
    """``base · processes + per_device · n + per_device_squared · n²``: a demo's
    memory model (each demo measured its three constants on this project's
    development machine; the ``n²`` term is state every device keeps for the whole
    world, e.g. a reference model of all experts)."""
    base, per_device, per_device_sq = model
    return base * processes + per_device * n + per_device_sq * n * n


def start(prog: str, args, memory: tuple[float, float, float]) -> int:
    """Say which world runs and how much memory it will take, before it runs;
    refuse (exit with a clear message) when the estimate exceeds the memory this
    machine has available.  Returns the number of devices."""
    backend, n, note = world_plan(args.world_size, args.backend)
    rank0 = process_rank() == 0
    processes = n if backend == "mpi" else 1
    need = estimate_bytes(n, memory, processes)
    have = available_memory()
    if rank0:
        if note:
            print(note)
        print(f"{prog}: starting {n} devices ({backend}); estimated memory {_gib(need)} "
              f"(available: {_gib(have)})", flush=True)
    if need > have:
        fits = max([k for k in range(1, n) if estimate_bytes(k, memory, min(processes, k)) <= have],
                   default=0)
        if rank0:
            print(f"error: {n} devices need an estimated {_gib(need)} of memory, more than the "
                  f"{_gib(have)} this machine has available; use at most {fits} devices "
                  f"(--world-size / mpiexec -n)", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return n


def progress(comm, text: str) -> None:
    """One line of progress from the world's rank 0 (long demos are never silent)."""
    if comm.rank == 0:
        print(text, flush=True)
