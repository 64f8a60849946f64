"""Failing ranks under mpiexec: the job ends and the error is printed once.

    mpiexec -n 3 python tests/comm/scripts/failures.py MODE

all      every rank raises the same error (a bad config)
one      rank 1 raises while the others wait in a collective
two      ranks 1 and 2 raise different errors
script   a plain script (no simpar.run): rank 2 raises, the excepthook ends the job
"""
import sys

import numpy as np

import simpar
from simpar.comm.mesh import Mesh, ParallelConfig


def main(comm):
    mode = sys.argv[1]
    if mode == "all":
        Mesh(comm, ParallelConfig(dp=2, tp=2))
    if mode == "one" and comm.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "two" and comm.rank in (1, 2):
        raise (KeyError if comm.rank == 1 else IndexError)(f"rank {comm.rank} fails")
    comm.all_reduce(np.ones(2))
    comm.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "script":
        from simpar.comm import mpi
        comm = mpi.world()
        mpi.abort_on_exception()
        if comm.rank == 2:
            raise RuntimeError("rank 2 fails on purpose")
        comm.barrier()
    else:
        simpar.run(main)
