"""Rank 1 raises while the others wait in a receive / a collective.
Under simpar.run the job must end (non-zero) instead of hanging."""
import sys

import numpy as np

import simpar


def main(comm):
    if comm.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if comm.rank == 0:
        comm.recv((3,), np.float64, src=1)      # never sent
    comm.barrier()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "run"
    if mode == "run":
        simpar.run(main)
    else:                                        # plain script: the excepthook aborts
        from simpar.comm import mpi
        comm = mpi.world()
        mpi.abort_on_exception()
        main(comm)
