"""The MPI backend: one process per rank, mpi4py **buffer** methods only.

Rule (checked by a test): every call on an mpi4py communicator in this file
uses the upper-case buffer methods (``Iallreduce``, ``Isend``, ...).  The
pickle-based lower-case methods are about 10x slower at 1 MiB and appear only
on lines marked ``# pickle-ok: cold path``.

Waiting politely (DESIGN.md §3): MPICH busy-polls inside blocking calls, so
with more ranks than cores the waiting ranks steal the CPU from the working
ones.  When ranks outnumber cores, messages and the arrival point of every
collective are started non-blocking and waited for by testing in a loop that
gives the core away (``sched_yield``) for up to 2 ms, then ``Test`` + 0.2 ms
naps.  Measured with 4 ranks on 2 cores: plain spinning on ``Test`` made a
1 KiB all-reduce 0.7 ms (longer spins made it worse: the spinner starves the
peer it waits for); yielding brought it to ~0.12 ms, while two ranks waiting in
``recv`` still leave the working ranks their full speed.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .. import trace
from .base import Comm

_SPIN_SECONDS = 2e-3
_NAP_SECONDS = 2e-4
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _mpi():
    from mpi4py import MPI
    return MPI


_OPS: dict = {}


def _op(op: str):
    if not _OPS:
        MPI = _mpi()
        _OPS.update(sum=MPI.SUM, max=MPI.MAX, min=MPI.MIN, in_place=MPI.IN_PLACE)
    return _OPS[op]


def ranks_per_node(comm) -> int:
    MPI = _mpi()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = local.Get_size()
    local.Free()
    return n


def polite_default(comm) -> bool:
    """Wait politely when this node runs more ranks than it has cores
    (``SIMPAR_POLITE=0/1`` overrides)."""
    env = os.environ.get("SIMPAR_POLITE")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return ranks_per_node(comm) > (os.cpu_count() or 1)


class MPIComm(Comm):
    backend = "mpi"

    def __init__(self, mpi_comm, tracer: trace.Tracer, world_ranks=None, name: str = "world",
                 check=None, polite: bool | None = None) -> None:
        rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        if world_ranks is None:
            world_ranks = range(size)
        super().__init__(rank, size, world_ranks, tracer, name, check)
        self._c = mpi_comm
        self._meta = mpi_comm.Dup()          # envelopes travel on their own channel
        self.polite = polite_default(mpi_comm) if polite is None else polite

    def _wait(self, req) -> None:
        """Wait for a request: blocking when ranks <= cores; otherwise test it in
        a loop that yields the core to any runnable rank (``sched_yield``) for
        up to 2 ms, then naps 0.2 ms between tests."""
        if not self.polite:
            req.Wait()
            return
        t_end = time.perf_counter() + _SPIN_SECONDS
        while time.perf_counter() < t_end:
            if req.Test():
                return
            _yield()
        while not req.Test():
            time.sleep(_NAP_SECONDS)

    # ---------------------------------------------------------- collectives
    # Arrival (the clock exchange) is waited for politely; the data collective
    # that follows is blocking, since every member is already there.  (MPICH's
    # non-blocking collectives progress only inside Test calls: measured 10-20x
    # slower than the blocking ones with 4 ranks on 2 cores.)
    def _raw_arrive(self, vec, sig):
        out = np.empty_like(vec)
        if self.polite:
            self._wait(self._c.Iallreduce(vec, out, op=_op("max")))
        else:
            self._c.Allreduce(vec, out, op=_op("max"))
        return out

    def _raw_all_reduce(self, x, op, out):
        self._c.Allreduce(_op("in_place") if out is x else x, out, op=_op(op))
        return out

    def _raw_all_gather(self, x):
        out = np.empty((self.size,) + x.shape, x.dtype)
        self._c.Allgather(x, out)
        return out

    def _raw_reduce_scatter(self, x):
        out = np.empty((x.shape[0] // self.size,) + x.shape[1:], x.dtype)
        self._c.Reduce_scatter_block(x, out, op=_op("sum"))
        return out

    def _raw_broadcast(self, x, root):
        buf = x.copy() if self.rank == root else np.empty_like(x)
        self._c.Bcast(buf, root=root)
        return buf

    def _raw_barrier(self):
        pass    # the arrival exchange just before already waited for every member

    def _raw_all_to_all_counts(self, counts):
        recv = np.empty_like(counts)
        if self.polite:
            self._wait(self._c.Ialltoall(counts, recv))
        else:
            self._c.Alltoall(counts, recv)
        return recv

    def _raw_all_to_all(self, x, send_counts, recv_counts):
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((int(recv_counts.sum()),) + x.shape[1:], x.dtype)
        sc, rc = send_counts * row, recv_counts * row
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
        send = [x, (sc.astype(np.int32), sd.astype(np.int32))]
        recv = [out, (rc.astype(np.int32), rd.astype(np.int32))]
        self._c.Alltoallv(send, recv)
        return out

    # ------------------------------------------------------- point-to-point
    def _raw_isend(self, x, dst, tag, meta):
        return ((self._meta if meta else self._c).Isend(x, dest=dst, tag=tag), x)

    def _raw_irecv(self, buf, src, tag, meta):
        return ((self._meta if meta else self._c).Irecv(buf, source=src, tag=tag), buf)

    def _raw_wait(self, handle):
        req, _keepalive = handle
        self._wait(req)

    # --------------------------------------------------------------- groups
    def _raw_split(self, color, key, new_rank, world_ranks, name):
        sub = self._c.Split(color, key)
        return MPIComm(sub, self.tracer, world_ranks, name, self.check, self.polite)

    def _raw_gather_objects(self, obj):
        return self._c.allgather(obj)          # pickle-ok: cold path (results, error reports)


# ---------------------------------------------------------------- the job
def abort_on_exception() -> None:
    """Under mpiexec, an uncaught exception on one rank ends the whole job.

    By default mpi4py leaves the other ranks waiting forever; this hook prints
    the traceback, then calls ``MPI.COMM_WORLD.Abort(1)``.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        abort_job()

    sys.excepthook = hook


def abort_job() -> None:
    """End every rank of the job (after giving the launcher time to forward stderr)."""
    MPI = _mpi()
    sys.stderr.write(f"simpar: rank {MPI.COMM_WORLD.Get_rank()} failed; aborting the job\n")
    sys.stderr.flush()
    sys.stdout.flush()
    time.sleep(0.3)
    MPI.COMM_WORLD.Abort(1)


def world(cluster=None, check=None) -> MPIComm:
    """The world communicator of this MPI job (a fresh tracer, activated)."""
    MPI = _mpi()
    tracer = trace.Tracer(MPI.COMM_WORLD.Get_rank(), cluster)
    trace.activate(tracer)
    return MPIComm(MPI.COMM_WORLD, tracer, check=check)
