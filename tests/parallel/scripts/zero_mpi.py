"""ZeRO equivalence under MPI: ``mpiexec -n N python zero_mpi.py NAME [NAME ...]``.

Runs each named case of :mod:`tests.parallel.zero_checks` (world size N) and
prints, on rank 0, ``worst <name> <error>`` (NaN-aware worst over the per-step
losses and final parameters against the single-device run).
"""
import sys

from simpar.comm import mpi
from simpar.testing import worst
from tests.parallel.hybrid_checks import errors
from tests.parallel.zero_checks import BY_NAME, reference_run, train_zero


def main(names) -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for name in names:
        case = BY_NAME[name]
        got = train_zero(world, case)
        if world.rank == 0:
            print(f"worst {name} {worst(errors(got, reference_run(case)))!r}", flush=True)
        world.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
