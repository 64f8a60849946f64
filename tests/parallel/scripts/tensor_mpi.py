"""Every tensor-parallel check under MPI, for tp = 1, 2, 3, 4 in one 4-rank job.

    mpiexec -n 4 python tests/parallel/scripts/tensor_mpi.py

For each tp size the world is split into groups of tp consecutive ranks (named
"tp"); ranks left over (rank 3 when tp = 3) sit that size out.  Prints
``ok tp=<t> <check>`` per check and ``simtime tp=<t> <repr>`` for the GPT step.
"""
import sys

from simpar.comm import mpi
from tests.parallel.tensor_checks import CHECKS, check_gpt


def main() -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for t in (1, 2, 3, 4):
        groups = world.size // t
        color = world.rank // t if world.rank < groups * t else groups
        tp = world.split(color, world.rank, name="tp")
        if color < groups:
            for check in CHECKS:
                out = check(tp)
                if tp.rank == 0 and color == 0:
                    print(f"ok tp={t} {check.__name__}", flush=True)
                if check is check_gpt and tp.rank == 0 and color == 0:
                    print(f"simtime tp={t} {out!r}", flush=True)
        world.barrier()


if __name__ == "__main__":
    sys.exit(main())
