"""One conformance suite for every backend.

Each ``check_*`` takes a communicator and raises ``AssertionError`` on a wrong
answer.  ``tests/comm/test_threads.py`` runs them in a threads world;
``tests/comm/test_mpi.py`` runs this file under ``mpiexec -n N``::

    mpiexec -n 3 python tests/comm/conformance.py

which prints ``ok <name>`` per check on rank 0 and exits non-zero on failure.
Expected values are computed independently from what each rank contributes
(every rank can rebuild every other rank's input from its rank number).
"""
from __future__ import annotations

import itertools
import sys

import numpy as np

from simpar import sim
from simpar.comm.base import DTYPES


def contribution(rank: int, shape, dtype) -> np.ndarray:
    """What ``rank`` puts in: distinct, rank-dependent, exactly representable."""
    n = int(np.prod(shape))
    return ((np.arange(n) % 7) * 3 + rank * 11 - 5).astype(dtype).reshape(shape)


def check_all_reduce(comm):
    for dtype in DTYPES:
        # small ones ride in the arrival exchange; (200, 3) moves after it (> INLINE_BYTES)
        for shape in [(5,), (3, 4), (2, 3, 2), (), (200, 3)]:
            x = contribution(comm.rank, shape, dtype)
            parts = [contribution(r, shape, dtype) for r in range(comm.size)]
            np.testing.assert_array_equal(comm.all_reduce(x), sum(parts[1:], parts[0]))
            np.testing.assert_array_equal(comm.all_reduce(x, op="max"), np.max(parts, axis=0))
            np.testing.assert_array_equal(comm.all_reduce(x, op="min"), np.min(parts, axis=0))
            assert comm.all_reduce(x).dtype == dtype
            out = np.empty_like(x)
            got = comm.all_reduce(x, out=out)
            assert got is out
            np.testing.assert_array_equal(out, sum(parts[1:], parts[0]))
            y = x.copy()
            comm.all_reduce(y, op="max", out=y)                 # in place
            np.testing.assert_array_equal(y, np.max(parts, axis=0))


def check_nan_propagation(comm):
    """A NaN on one rank is NaN on every rank, for sum, max and min, blocking
    and not (MPI's MAX/MIN alone give rank-dependent answers); inf is a value."""
    p = comm.size
    for dtype in (np.float64, np.float32):
        for op in ("max", "min", "sum"):
            for culprit, pad in itertools.product(range(p), (0, 2000)):
                # pad: 2000 more zeros, so that the message moves after the arrival
                x = np.array([1.0 + comm.rank, 2.0, -3.0, np.inf] + [0.0] * pad, dtype)
                if comm.rank == culprit:
                    x[0] = np.nan                       # element 0: NaN on one rank only
                got = comm.all_reduce(x, op=op)[:4]
                assert np.isnan(got[0]), (op, culprit, got)
                assert not np.isnan(got[1:]).any(), (op, culprit, got)
                want = {"max": [2.0, -3.0, np.inf], "min": [2.0, -3.0, np.inf],
                        "sum": [2.0 * p, -3.0 * p, np.inf]}[op]
                np.testing.assert_array_equal(got[1:], want)
                y = x.copy()
                comm.all_reduce(y, op=op, out=y)          # in place
                np.testing.assert_array_equal(y[:4], got)
                np.testing.assert_array_equal(comm.iall_reduce(x, op=op).wait()[:4], got)
                # every rank holds the same answer, bit for bit
                table = comm.all_gather(got.view(np.int64 if dtype == np.float64 else np.int32)[None])
                assert (table == table[:1]).all(), table
    # integers are untouched by the NaN logic
    np.testing.assert_array_equal(comm.all_reduce(np.array([comm.rank]), op="max"), [p - 1])


def check_all_gather(comm):
    for shape in [(2, 3, 4), (20, 3, 4)]:              # inline, and moved after the arrival
        parts = [contribution(r, shape, np.float64) for r in range(comm.size)]
        x = parts[comm.rank]
        for axis in (0, 1, 2, -1):
            want = np.concatenate(parts, axis=axis)
            np.testing.assert_array_equal(comm.all_gather(x, axis=axis), want)
            out = np.full_like(want, np.nan)
            assert comm.all_gather(x, axis=axis, out=out) is out
            np.testing.assert_array_equal(out, want)
    # a scalar per rank gathers to a vector
    np.testing.assert_array_equal(comm.all_gather(np.array(float(comm.rank))),
                                  np.arange(comm.size, dtype=float))


def check_reduce_scatter(comm):
    p = comm.size
    for axis, shape in [(0, (2 * p, 3)), (1, (3, 2 * p, 2)), (2, (2, 3, p)), (-1, (4, p)),
                        (0, (40 * p, 3)), (1, (3, 40 * p, 2))]:       # the last two: not inline
        parts = [contribution(r, shape, np.float64) for r in range(p)]
        total = sum(parts[1:], parts[0])
        want = np.split(total, p, axis=axis)[comm.rank]
        got = comm.reduce_scatter(parts[comm.rank], axis=axis)
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous
        out = np.full_like(want, np.nan)
        assert comm.reduce_scatter(parts[comm.rank], axis=axis, out=out) is out
        np.testing.assert_array_equal(out, want)


def check_broadcast(comm):
    for root, shape in itertools.product(range(comm.size), [(3, 2), (300, 2)]):
        x = contribution(comm.rank, shape, np.int64)
        want = contribution(root, shape, np.int64)
        np.testing.assert_array_equal(comm.broadcast(x, root=root), want)
        comm.broadcast(x, root=root, out=x)              # in place, as MPI_Bcast
        np.testing.assert_array_equal(x, want)


def check_all_to_all_uneven(comm):
    p = comm.size
    # rank s sends (s + d) % 3 rows to rank d; row values encode (source, dest, row)
    def rows(s, d):
        k = (s + d) % 3
        return np.array([[s, d, i, s * 100 + d * 10 + i] for i in range(k)], np.float64).reshape(k, 4)
    counts = [(comm.rank + d) % 3 for d in range(p)]
    x = np.concatenate([rows(comm.rank, d) for d in range(p)], axis=0)
    got, recv_counts = comm.all_to_all(x, counts)
    want = np.concatenate([rows(s, comm.rank) for s in range(p)], axis=0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(recv_counts, [(s + comm.rank) % 3 for s in range(p)])
    # 3-d rows too
    x3 = np.full((p, 2, 2), comm.rank, np.int32)
    got3, _ = comm.all_to_all(x3, [1] * p)
    np.testing.assert_array_equal(got3[:, 0, 0], np.arange(p))


def check_send_recv(comm):
    p = comm.size
    if p == 1:
        return
    right, left = (comm.rank + 1) % p, (comm.rank - 1) % p
    # ring with non-blocking ops (blocking sends in a ring could deadlock under MPI)
    r = comm.irecv((4, 3), np.float32, left, tag=7)
    s = comm.isend(contribution(comm.rank, (4, 3), np.float32), right, tag=7)
    got = r.wait()
    s.wait()
    np.testing.assert_array_equal(got, contribution(left, (4, 3), np.float32))
    # blocking pairs, two tags in flight, matched by tag
    if comm.rank == 0:
        comm.send(np.arange(3.0), 1, tag=1)
        comm.send(np.arange(5.0), 1, tag=2)
    elif comm.rank == 1:
        b = comm.recv((5,), np.float64, 0, tag=2)
        a = comm.recv((3,), np.float64, 0, tag=1)
        np.testing.assert_array_equal(a, np.arange(3.0))
        np.testing.assert_array_equal(b, np.arange(5.0))
    # receives match messages in the order they were posted, not waited for (MPI rule)
    if comm.rank == 0:
        comm.send(np.full(2, 1.0), 1, tag=4)
        comm.send(np.full(2, 2.0), 1, tag=4)
    elif comm.rank == 1:
        first = comm.irecv((2,), np.float64, 0, tag=4)
        second = comm.irecv((2,), np.float64, 0, tag=4)
        np.testing.assert_array_equal(second.wait(), [2.0, 2.0])
        np.testing.assert_array_equal(first.wait(), [1.0, 1.0])
    # a received array is fresh: writing to the sent array afterwards changes nothing
    if comm.rank == 0:
        x = np.ones(4)
        comm.send(x, 1, tag=3)
        x[:] = -1
    elif comm.rank == 1:
        got = comm.recv((4,), np.float64, 0, tag=3)
        np.testing.assert_array_equal(got, np.ones(4))
    comm.barrier()


def check_non_contiguous(comm):
    base = contribution(comm.rank, (4, 6), np.float64)
    view = base[:, ::2]                 # not contiguous: must be sent as its values
    assert not view.flags.c_contiguous
    parts = [contribution(r, (4, 6), np.float64)[:, ::2] for r in range(comm.size)]
    np.testing.assert_array_equal(comm.all_reduce(view), sum(parts[1:], parts[0]))
    np.testing.assert_array_equal(comm.all_gather(view.T, axis=0),
                                  np.concatenate([q.T for q in parts], axis=0))
    if comm.size > 1:
        if comm.rank == 0:
            comm.send(view, 1, tag=9)
        elif comm.rank == 1:
            np.testing.assert_array_equal(comm.recv((4, 3), np.float64, 0, tag=9), parts[0])


def check_split(comm):
    p = comm.size
    sub = comm.split(color=comm.rank % 2, key=-comm.rank)      # reversed order inside
    members = [r for r in range(p) if r % 2 == comm.rank % 2]
    assert sub.size == len(members)
    assert sub.world_ranks == tuple(sorted(members, reverse=True))
    assert sub.world_ranks[sub.rank] == comm.rank
    total = sub.all_reduce(np.array([float(comm.rank)]))
    assert total[0] == sum(members)
    subsub = sub.split(color=0, key=sub.rank)
    assert subsub.size == sub.size
    np.testing.assert_array_equal(subsub.all_gather(np.array([comm.rank])),
                                  sorted(members, reverse=True))


def check_barrier_and_clock(comm):
    """Simulated times equal the alpha-beta formulas of DESIGN.md §6 exactly."""
    t = comm.tracer
    link = comm.link
    p = comm.size
    t.reset()                                 # start from simulated time 0 on every rank
    comm.barrier()
    t0 = t.sim_now
    x = np.zeros((8, 16))                     # 1 KiB
    n = x.nbytes
    comm.all_reduce(x)
    t1 = t0 + sim.collective_time("all_reduce", n, p, link)
    assert t.sim_now == t1, (t.sim_now, t1)
    assert t.sim_now == t0 + (2 * (p - 1) * link.alpha + 2 * n * (p - 1) / p * link.beta if p > 1 else 0)
    comm.all_gather(x)
    t2 = t1 + sim.collective_time("all_gather", n * p, p, link)
    assert t.sim_now == t2
    comm.reduce_scatter(np.zeros((p * 8, 16)))
    t3 = t2 + sim.collective_time("reduce_scatter", p * n, p, link)
    assert t.sim_now == t3
    assert t3 == t2 + ((p - 1) * link.alpha + p * n * (p - 1) / p * link.beta if p > 1 else 0)
    y, _ = comm.all_to_all(np.zeros((p * (comm.rank + 1), 16)), [comm.rank + 1] * p)
    t4 = t3 + sim.collective_time("all_to_all", p * p * 16 * 8, p, link)   # largest holder
    assert t.sim_now == t4, (t.sim_now, t4)
    n_max = p * p * 16 * 8
    assert t4 == t3 + ((p - 1) * link.alpha + n_max * (p - 1) / p * link.beta if p > 1 else 0)
    ev = t.events[-1]
    assert (ev.name, ev.sim_start, ev.sim_end) == ("all_to_all", t3, t4)
    if p > 1:
        l01 = t.cluster.link((comm.world_ranks[0], comm.world_ranks[1]))
        # rank 0 computes 1 ms of simulated work, then sends to rank 1
        if comm.rank == 0:
            with t.compute("work", flops=1e-3 * t.cluster.device.flops):
                pass
            comm.send(x, 1, tag=5)
            assert t.sim_now == t4 + 1e-3       # the sender does not wait
        elif comm.rank == 1:
            comm.recv(x.shape, x.dtype, 0, tag=5)
            sent_at = t4 + 1e-3
            assert t.sim_now == sent_at + l01.alpha + n * l01.beta
        comm.barrier()
        # a collective starts at the latest member's time
        latest = t4 + 1e-3 + l01.alpha + n * l01.beta
        assert t.sim_now == latest + sim.collective_time("barrier", 0, p, link)
    return t.sim_now


CHECKS = [check_all_reduce, check_nan_propagation, check_all_gather, check_reduce_scatter, check_broadcast,
          check_all_to_all_uneven, check_send_recv, check_non_contiguous, check_split,
          check_barrier_and_clock]


def main() -> None:
    """Run every check under MPI; print the simulated end times for the
    cross-backend comparison."""
    import simpar
    from simpar.comm import mpi
    cluster = sim.a100_cluster(devices_per_node=2)
    comm = mpi.world(cluster)
    mpi.abort_on_exception()
    for check in CHECKS:
        out = check(comm)
        comm.barrier()
        if comm.rank == 0:
            print(f"ok {check.__name__}", flush=True)
        if check is check_barrier_and_clock:
            times = comm.gather_objects(repr(out))
            if comm.rank == 0:
                print("simtimes " + " ".join(times), flush=True)
    del simpar


if __name__ == "__main__":
    sys.exit(main())
