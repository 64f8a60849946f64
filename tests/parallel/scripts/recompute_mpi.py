"""Recompute equivalence under MPI: ``mpiexec -n 4 python recompute_mpi.py NAME ...``.

For each layout of :mod:`tests.parallel.recompute_checks` rank 0 prints, for
every rank and mode, ``equal <rank> <mode> <True|False> <peak bytes> <name>``.
"""
import sys

from simpar.comm import mpi
from tests.parallel.recompute_checks import check_layout


def main(names) -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for name in names:
        every = world.gather_objects(check_layout(world, name))
        if world.rank == 0:
            for rank, res in enumerate(every):
                for mode, (equal, peak) in res.items():
                    print(f"equal {rank} {mode} {equal} {peak} {name}", flush=True)
        world.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
