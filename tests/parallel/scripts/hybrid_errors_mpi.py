"""Bad hybrid layouts under MPI (4 ranks): every case of
:data:`tests.parallel.hybrid_checks.BAD_LAYOUTS` on a sub-communicator of the
world size it needs; rank 0 prints ``case <name> rank <r> <message>`` for every
member — an error on every rank (with ``[events 0]``: before the first message),
no hang."""
from simpar.comm import mpi
from tests.parallel.hybrid_checks import BAD_LAYOUTS, build_or_error


def main() -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for name, case, _ in BAD_LAYOUTS:
        if case["config"] is None:              # a ParallelConfig error: no communicator
            continue
        n = case["world"]
        group = world.split(0 if world.rank < n else 1, world.rank, name="case")
        msg = f"case {name} rank {group.rank} {build_or_error(group, case)}" \
            if world.rank < n else None
        for line in world.gather_objects(msg):      # one printer: lines do not interleave
            if world.rank == 0 and line is not None:
                print(line.replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
