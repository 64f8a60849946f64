"""Hybrid equivalence under MPI: ``mpiexec -n N python hybrid_mpi.py NAME [NAME ...]``.

Runs each named layout of :mod:`tests.parallel.hybrid_checks` (world size N) and
prints, on rank 0, ``worst <name> <error>`` (NaN-aware worst over losses and
parameters) and ``simstep <name> <repr of the last simulated step>``.
"""
import sys

from simpar.comm import mpi
from simpar.testing import worst
from tests.parallel.hybrid_checks import BY_NAME, errors, reference_run, train_layout


def main(names) -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for name in names:
        lay = BY_NAME[name]
        got = train_layout(world, lay)
        if world.rank == 0:
            err = worst(errors(got, reference_run(lay)))
            print(f"worst {name} {err!r}", flush=True)
        world.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
