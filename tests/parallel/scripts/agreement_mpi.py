"""The agreement cases under MPI (3 ranks): each case runs on a sub-communicator of
its world size; rank 0 prints ``case <name> rank <r> <error>`` for every member."""
from simpar.comm import mpi
from tests.parallel.agreement_cases import CASES, run_case


def main() -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for case, n, _ in CASES:
        group = world.split(0 if world.rank < n else 1, world.rank, name="case")
        msg = run_case(group, case) if world.rank < n else None
        for r, line in enumerate(world.gather_objects(msg)):
            if world.rank == 0 and line is not None:
                print(f"case {case.__name__} rank {r} " + line.replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
