"""Context-parallel attention under MPI: ``mpiexec -n N python context_mpi.py``.

Every layer case of :mod:`tests.parallel.context_checks` with cp = N (the world),
then every error case; rank 0 prints ``worst <case> <error>`` and every rank
prints ``case <name> <message>``.
"""
import sys

from simpar.comm import mpi
from simpar.testing import worst
from tests.parallel.context_checks import (ERROR_CASES, LAYER_CASES, core_checks, error_case,
                                           layer_errors)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")          # one write: ranks' lines do not interleave
    sys.stdout.flush()


def main() -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for scheme, balanced, block in LAYER_CASES:
        err = worst(layer_errors(world, scheme, balanced, block))
        if world.rank == 0:
            say(f"worst {scheme}-{balanced}-{block} {err!r}")
        world.barrier()
    for what, ok in core_checks(world).items():
        say(f"formula {world.rank} {what}: {'ok' if ok else 'MISMATCH'}")
        world.barrier()
    for case in ERROR_CASES:
        msg = error_case(world, case)
        say(f"case {world.rank} {case}: {msg}".replace("\n", " "))
        world.barrier()


if __name__ == "__main__":
    main()
