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


def demo_parser(command: str, doc: str, cluster: str | None = "a100",
                cluster_help: str = "simulated cluster for the simulated clock",
                world: bool = True) -> argparse.ArgumentParser:
    """The parser of ``python -m simpar <command>``: ``--out``, and ``--world-size``
    and ``--backend`` (``world``: the demo runs on a world the user chooses) and
    ``--cluster`` (unless ``cluster`` is None); add your own."""
    from ..cli import Parser
    ap = Parser(f"python -m simpar {command}", doc)
    if world:
        ap.add_argument("--world-size", type=int, default=None, metavar="N",
                        help=f"devices in the threads world ({THREADS_DEFAULT} when not given; "
                             "under mpiexec: mpiexec's -n)")
        ap.add_argument("--backend", default="auto", choices=["auto", "threads", "mpi"],
                        help="auto: MPI under mpiexec with several processes, else threads")
    else:
        why = f"python -m simpar {command} starts threads worlds of its own sizes"
        ap.not_here.update({"--world-size": why, "--backend": why})
    if cluster is not None:
        ap.add_argument("--cluster", default=cluster, choices=sorted(sim.PRESETS),
                        help=cluster_help)
    else:
        ap.not_here["--cluster"] = f"python -m simpar {command} does not use a simulated clock"
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for figures and traces (git-ignored)")
    return ap


def at_least(minimum: int):
    """An argparse ``type``: an integer of at least ``minimum`` (else a clear usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def threads_only(command: str) -> None:
    """For a demo that starts its own threads worlds (of the sizes it shows):
    refuse to run under ``mpiexec`` with several processes, where every process
    would run the whole demo."""
    if launcher_size() > 1:
        if process_rank() == 0:
            print(f"error: python -m simpar {command} runs its own threads worlds (one "
                  "process); run it without mpiexec", file=sys.stderr, flush=True)
        raise SystemExit(2)


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
