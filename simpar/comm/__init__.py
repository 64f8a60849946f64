"""How simulated devices talk: the ``Comm`` interface and its two backends.

* :mod:`.threads` — an in-process world, one thread per rank (notebooks, tests);
* :mod:`.mpi` — one process per rank under ``mpiexec`` (mpi4py buffer methods);
* :mod:`.mesh` — ``ParallelConfig`` and ``Mesh``: the sub-communicators of a
  dp x tp x pp (x ep) grid.

:func:`run` starts a function on every rank of whichever world is available.

Trust (README "Communication"): the ranks of a collective must make the same
call (op, dtype, shape), checked always with a fingerprint in the arrival
exchange; :meth:`Comm.agree` checks any small value the same way; a NaN in a
max/min all-reduce is NaN on every rank; a deadlock raises
:class:`DeadlockError` naming what each rank waits for (threads: exactly, at
once; MPI: a watchdog, ``SIMPAR_WATCHDOG_S``); an MPI failure is printed once.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from .. import sim
from .base import (DTYPES, REDUCE_OPS, Comm, DeadlockError, Request, WorldAborted,
                   check_enabled, watchdog_seconds)
from .threads import ThreadComm, launch

BACKENDS = ("auto", "threads", "mpi")

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                       "MV2_COMM_WORLD_SIZE")


def launcher_size() -> int:
    """Number of ranks the MPI launcher started (1 when not under a launcher)."""
    for var in _LAUNCHER_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def init(backend: str = "auto") -> str:
    """Pick the backend: MPI when an MPI launcher started more than one rank,
    otherwise the in-process threads world.  Returns ``"mpi"`` or ``"threads"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "mpi" if launcher_size() > 1 else "threads"
    if backend == "mpi":
        import importlib.util
        if importlib.util.find_spec("mpi4py") is None:
            raise RuntimeError("the MPI backend needs mpi4py: pip install 'simpar[mpi]'")
    return backend


def run(fn: Callable[[Comm], Any], world_size: int | None = None, backend: str = "auto",
        cluster: sim.ClusterSpec | None = None, timeout: float | None = None,
        check: bool | None = None) -> list:
    """Run ``fn(comm)`` on every rank and return all ranks' results (on every rank).

    Threads: ``world_size`` threads (default 4), see :func:`launch`.  MPI: the
    launcher's ranks; ``world_size``, if given, must match.  Under MPI a failing
    rank aborts the whole job rather than leaving the others waiting, and the
    error is printed once per job, by the failing rank; ``timeout`` (seconds)
    is enforced by the watchdog (a rank waiting past it ends the job with a
    report of every rank's pending operation), as is ``SIMPAR_WATCHDOG_S``.
    A rank whose ``fn`` returns while others still wait in a collective gets,
    with them, a ``ValueError`` naming it as finished.
    """
    backend = init(backend)
    if backend == "threads":
        return launch(fn, 4 if world_size is None else world_size, cluster, timeout, check)
    import sys
    from . import mpi
    comm = mpi.world(cluster, check)
    mpi.abort_on_exception()
    mpi.set_timeout(timeout)
    try:
        if world_size is not None and world_size != comm.size:
            raise ValueError(f"world_size={world_size} but mpiexec started {comm.size} ranks")
        result = fn(comm)
        return comm._gather_results(result)
    except BaseException:
        mpi.fail(*sys.exc_info())
        raise


__all__ = ["Comm", "ThreadComm", "Request", "WorldAborted", "DeadlockError", "watchdog_seconds", "launch", "run", "init",
           "launcher_size", "DTYPES", "REDUCE_OPS", "check_enabled"]
