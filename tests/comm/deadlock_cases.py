"""Programs that can never finish.  The threads backend must name the deadlock
at once (no timeout); under MPI the watchdog must report every rank's pending
operation and end the job.

``CASES`` maps a name to ``(world size, fn, needles)``: the report must contain
every needle.  Under ``mpiexec`` this file runs one case::

    SIMPAR_WATCHDOG_S=2 mpiexec -n 3 python tests/comm/deadlock_cases.py early_return
"""
from __future__ import annotations

import sys
import time

import numpy as np


def recv_never_sent(c):
    if c.rank == 0:
        c.recv((3,), np.float64, src=1, tag=5)


def early_return(c):
    if c.rank == 2:
        return
    c.all_reduce(np.ones(2))


def micro_batch_counts(c):
    """A two-stage pipeline: stage 0 thinks m=5, stage 1 thinks m=4."""
    m = 5 if c.rank == 0 else 4
    for i in range(m):
        if c.rank == 0:
            c.send(np.full(4, float(i)), 1, tag=1)
            c.recv((4,), np.float64, 1, tag=2)
        else:
            g = c.recv((4,), np.float64, 0, tag=1)
            c.send(g, 0, tag=2)
    c.all_reduce(np.ones(1))                     # the step's gradient sum


def recv_vs_collective(c):
    if c.rank == 0:
        c.recv((1,), np.float64, 1, tag=0)
    else:
        c.barrier()


def crossed_groups(c):
    """2 x 2 mesh: ranks 0, 3 enter their tp all-reduce first, ranks 1, 2 their
    dp one: a cycle (0 waits for 1 in tp, 1 for 3 in dp, 3 for 2 in tp, 2 for 0)."""
    from simpar.comm.mesh import Mesh, ParallelConfig
    mesh = Mesh(c, ParallelConfig(dp=2, tp=2))
    first, second = (mesh.tp, mesh.dp) if c.rank in (0, 3) else (mesh.dp, mesh.tp)
    first.all_reduce(np.ones(2))
    second.all_reduce(np.ones(2))


def slow_peer(c):
    """Rank 1 computes (never communicates) far longer than the watchdog."""
    if c.rank == 1:
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            time.sleep(0.01)
    c.barrier()


CASES = {
    "recv_never_sent": (2, recv_never_sent, ["rank 0: recv from rank 1 tag 5", "rank 1: finished"]),
    "early_return": (3, early_return, ["rank 0: all_reduce op=sum float64 (2,) on world",
                                       "waiting for rank 2", "rank 2: finished"]),
    "micro_batch_counts": (2, micro_batch_counts, ["rank 0: recv from rank 1 tag 2",
                                                   "rank 1: all_reduce", "waiting for rank 0"]),
    "recv_vs_collective": (3, recv_vs_collective, ["rank 0: recv from rank 1 tag 0",
                                                   "rank 1: barrier on world", "rank 2: barrier"]),
    "crossed_groups": (4, crossed_groups, ["rank 0: all_reduce op=sum float64 (2,) on tp (waiting for rank 1)",
                                           "rank 2: all_reduce op=sum float64 (2,) on dp (waiting for rank 0)"]),
}


def main() -> None:
    import simpar
    name = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else None
    _, fn, _ = CASES.get(name) or (None, slow_peer, None)
    simpar.run(fn, timeout=timeout)
    print("finished: no deadlock?!", flush=True)


if __name__ == "__main__":
    sys.exit(main())
