"""16-bit messages (bfloat16, float16): every collective and point-to-point call
carries them; sums are float32 sums rounded once (the same bits on both
backends); the simulated clock counts 2 bytes an element.  Run by
``test_half_dtypes.py`` on threads and under ``mpiexec``."""
from __future__ import annotations

import sys

import numpy as np

from simpar.comm.base import HALF_DTYPES


def _x(rank: int, dt):
    return np.random.default_rng(rank).standard_normal((4, 6)).astype(dt)


def check(comm) -> list:
    out = []
    for dt in HALF_DTYPES:
        x = _x(comm.rank, dt)
        want = sum(_x(r, dt).astype(np.float32) for r in range(comm.size)).astype(dt)
        s = comm.all_reduce(x)
        assert s.dtype == dt and np.array_equal(s.view(np.uint16), want.view(np.uint16)), dt
        ev = comm.tracer.select("comm", "all_reduce")[-1]
        assert ev.nbytes == 2 * x.size, ev.nbytes                 # 2 bytes an element
        m = comm.all_reduce(x, "max")
        assert np.array_equal(m.astype(np.float32),
                              np.max([_x(r, dt).astype(np.float32) for r in range(comm.size)], 0))
        y = x.copy()
        y[1, 2] = np.nan if comm.rank == comm.size - 1 else y[1, 2]
        assert np.isnan(comm.all_reduce(y, "max")[1, 2])          # NaN anywhere: NaN
        g = comm.all_gather(x, axis=1)
        assert g.dtype == dt and np.array_equal(
            g.view(np.uint16), np.concatenate([_x(r, dt) for r in range(comm.size)], 1)
            .view(np.uint16))
        if 4 % comm.size == 0:
            k = 4 // comm.size
            rs = comm.reduce_scatter(x, axis=0)
            assert rs.dtype == dt and np.array_equal(
                rs.view(np.uint16), want[comm.rank * k:(comm.rank + 1) * k].view(np.uint16))
        b = comm.broadcast(x, 0)
        assert np.array_equal(b.view(np.uint16), _x(0, dt).view(np.uint16))
        a2a, _ = comm.all_to_all(x[:comm.size], np.ones(comm.size, np.int64))
        assert np.array_equal(a2a.view(np.uint16),
                              np.stack([_x(r, dt)[comm.rank] for r in range(comm.size)])
                              .view(np.uint16))
        if comm.size > 1:
            if comm.rank == 0:
                comm.send(x, 1, tag=3)
            elif comm.rank == 1:
                r = comm.recv(x.shape, dt, 0, tag=3)
                assert np.array_equal(r.view(np.uint16), _x(0, dt).view(np.uint16))
        out.append(s.view(np.uint16).tobytes().hex())
    return out


if __name__ == "__main__":
    from simpar.comm import mpi
    world = mpi.world()
    mpi.abort_on_exception()
    res = check(world)
    if world.rank == 0:
        print("half " + " ".join(res), flush=True)
    sys.exit(0)
