"""Context-parallel hybrid layouts under MPI: ``mpiexec -n N python
context_hybrid_mpi.py NAME ...`` prints ``worst <name> <error>`` (rank 0) for each
layout of :mod:`tests.parallel.context_hybrid_checks`; with ``--errors`` every bad
layout instead, one ``case <name> <message>`` line per rank (from rank 0)."""
import sys

from simpar.comm import mpi
from simpar.testing import worst
from tests.parallel.context_hybrid_checks import BAD, CP_BY_NAME, bad_case
from tests.parallel.hybrid_checks import errors, reference_run, train_layout


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(args) -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    if args == ["--errors"]:
        for name in BAD:
            if BAD[name][0].world_size != world.size:
                continue
            for line in world.gather_objects(f"case {name}: {bad_case(world, name)}"):
                if world.rank == 0:
                    say(line.replace("\n", " "))
        return
    for name in args:
        lay = CP_BY_NAME[name]
        got = train_layout(world, lay)
        if world.rank == 0:
            say(f"worst {name}|{worst(errors(got, reference_run(lay)))!r}")
        world.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
