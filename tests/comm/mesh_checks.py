"""Mesh checks shared by the threads test and the MPI script.

Expected groups are built from the definition ``rank = tp + tp*(dp + dp*pp)``
by brute force over all ranks, independently of ``Mesh``.
"""
import itertools
import sys

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig


def factorisations(n):
    for dp, tp in itertools.product(range(1, n + 1), repeat=2):
        if n % (dp * tp) == 0:
            pp = n // (dp * tp)
            for ep in range(1, dp + 1):
                if dp % ep == 0:
                    yield ParallelConfig(dp=dp, tp=tp, pp=pp, ep=ep)


def expected_groups(cfg, rank):
    coords = {}
    for pp in range(cfg.pp):
        for dp in range(cfg.dp):
            for tp in range(cfg.tp):
                coords[tp + cfg.tp * (dp + cfg.dp * pp)] = (dp, tp, pp)
    dp, tp, pp = coords[rank]
    same = lambda pred: tuple(r for r in sorted(coords) if pred(*coords[r]))
    return {
        "tp": same(lambda d, t, p: d == dp and p == pp),
        "dp": same(lambda d, t, p: t == tp and p == pp),
        "pp": same(lambda d, t, p: d == dp and t == tp),
        "ep": same(lambda d, t, p: t == tp and p == pp and d // cfg.ep == dp // cfg.ep),
        "edp": same(lambda d, t, p: t == tp and p == pp and d % cfg.ep == dp % cfg.ep),
    }, (dp, tp, pp)


def check_mesh(comm, cfg):
    mesh = Mesh(comm, cfg)
    want, (dp, tp, pp) = expected_groups(cfg, comm.rank)
    c = mesh.coords
    assert (c.dp, c.tp, c.pp, c.ep) == (dp, tp, pp, dp % cfg.ep)
    for name, ranks in want.items():
        sub = getattr(mesh, name)
        assert sub.world_ranks == ranks, (name, sub.world_ranks, ranks)
        assert sub.world_ranks[sub.rank] == comm.rank
        # the sub-communicator really talks to exactly these ranks
        got = sub.all_reduce(np.array([comm.rank], dtype=np.int64))
        assert got[0] == sum(ranks), (name, got, ranks)
    assert (mesh.tp.rank, mesh.dp.rank, mesh.pp.rank) == (tp, dp, pp)


def main():
    from simpar.comm import mpi
    comm = mpi.world()
    mpi.abort_on_exception()
    n = 0
    for cfg in factorisations(comm.size):
        check_mesh(comm, cfg)
        n += 1
    comm.barrier()
    if comm.rank == 0:
        print(f"ok {n} meshes", flush=True)


if __name__ == "__main__":
    sys.exit(main())
