"""The MPI backend: one process per rank, mpi4py **buffer** methods only.

Rule (checked by a test): every call on an mpi4py communicator in this file
uses the upper-case buffer methods (``Iallreduce``, ``Isend``, ...).  The
pickle-based lower-case methods are about 10x slower at 1 MiB and appear only
on lines marked ``# pickle-ok: cold path``.

Waiting politely (DESIGN.md §3): MPICH busy-polls inside blocking calls, so
with more ranks than cores the waiting ranks steal the CPU from the working
ones.  When ranks outnumber cores, messages and the arrival exchange of every
collective are started non-blocking and waited for by testing in a loop that
gives the core away (``sched_yield``) for up to 2 ms, then ``Test`` + 0.2 ms
naps.  Measured with 4 ranks on 2 cores: the working ranks run 1.6-1.8x faster
while two ranks wait in simpar's ``recv`` than in raw ``Recv``
(``benchmarks/collectives.py``); spinning on ``Test`` before yielding (20 or 100
tests) or shorter naps did not lower the latency of a 4-rank all-reduce
(1 KiB: ~220 µs every way, raw ~65 µs — the ranks' Python, four processes on two
cores, is what it waits for).  When every rank has a core, waits are MPI's own
blocking calls, the fastest.

**Watchdog** (DESIGN.md §3).  A thread of each rank (started when
``SIMPAR_WATCHDOG_S`` > 0, default 60, or by ``simpar.run(timeout=...)``) looks
every 0.1 s at what its rank waits for: a collective's arrival exchange or a
message, marked by the waiting code.  When a wait outlives the limit, or the run
its timeout, it asks every other rank, on a private duplicate of
``COMM_WORLD``, what it is waiting for (every rank's watchdog answers, also
while its rank computes), prints one report naming each rank's pending
operation and aborts the job.  A collective's data movement, which follows the
arrival exchange with every member present, is not watched (it cannot wait for
an absent member).

**One message per job.**  A rank that raises tells the others, waits a moment
for their notices, and only the first failing rank (the lowest, if several
fail together) prints its traceback; the others print nothing if their error
is the same, else one line; then the job is aborted.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

import math
import threading
import traceback

from .. import trace
from .base import HALF_DTYPES, Comm, watchdog_seconds

_SPIN_SECONDS = 2e-3
_NAP_SECONDS = 2e-4
_WATCH_PERIOD = 0.1             # seconds between the watchdog thread's looks
_TAG_PING, _TAG_REPLY, _TAG_FAIL, _TAG_PRINTING = 1, 2, 3, 4   # private control channel
_MSG_BYTES = 1024
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
        # what this rank waits in, for the watchdog's report (set by _raw_arrive)
        self._sig: tuple = ("barrier", 0, None, ())
        self._what = lambda: f"{self._describe(self._sig)} on {self.name}"

    def _wait(self, req, what) -> None:
        """Wait for a request; ``what()`` describes the wait for the watchdog's
        report.  Polite (ranks > cores): :func:`_polite_wait`.  Otherwise MPI's
        blocking ``Wait`` (MPICH spins inside it, which is fastest when every
        rank has a core); the watchdog thread watches either way."""
        job = _JOB
        if job is not None:
            job.pending, job.since = what, time.perf_counter()
        try:
            if self.polite:
                _polite_wait(req)
            else:
                req.Wait()
        finally:
            if job is not None:
                job.pending = None

    def _on(self) -> str:
        return "" if self.name == "world" else f" on {self.name}"

    def _peer(self, r: int) -> str:
        wr = self.world_ranks[r]
        return f"rank {wr}" if self.name == "world" else f"rank {wr} ({self.name} rank {r})"

    # ---------------------------------------------------------- collectives
    # Arrival (the clock exchange) is waited for politely; the data collective
    # that follows is blocking, since every member is already there.  (MPICH's
    # non-blocking collectives progress only inside Test calls: measured 10-20x
    # slower than the blocking ones with 4 ranks on 2 cores.)
    def _raw_arrive(self, record, table, sig):
        self._sig = sig
        if self.polite:
            self._wait(self._c.Iallgather(record, table), self._what)
            return
        job = _JOB
        if job is not None:                  # the watchdog thread watches this wait
            job.pending, job.since = self._what, time.perf_counter()
        try:
            self._c.Allgather(record, table)
        finally:
            if job is not None:
                job.pending = None

    def _raw_all_reduce(self, x, op, out):
        self._c.Allreduce(_op("in_place") if out is x else x, out, op=_op(op))
        return out

    def _raw_all_gather(self, x, out):
        self._c.Allgather(_bytes16(x), _bytes16(out))

    def _raw_reduce_scatter(self, x, out):
        self._c.Reduce_scatter_block(x, out, op=_op("sum"))

    def _raw_broadcast(self, x, root, out):
        if self.rank == root and out is not x:
            np.copyto(out, x)
        self._c.Bcast(_bytes16(out), root=root)

    def _raw_barrier(self):
        pass    # the arrival exchange just before already waited for every member

    def _raw_all_to_all_counts(self, counts):
        recv = np.empty_like(counts)
        if self.polite:
            self._wait(self._c.Ialltoall(counts, recv), lambda: f"all_to_all counts{self._on()}")
        else:
            self._c.Alltoall(counts, recv)
        return recv

    def _raw_all_to_all(self, x, send_counts, recv_counts):
        row = math.prod(x.shape[1:])                      # elements, in plain Python:
        sc = [c * row for c in send_counts.tolist()]      # p numbers are faster so
        rc = [c * row for c in recv_counts.tolist()]
        out = np.empty((sum(recv_counts.tolist()),) + x.shape[1:], x.dtype)
        self._c.Alltoallv([_bytes16(x), (sc, _offsets(sc))], [_bytes16(out), (rc, _offsets(rc))])
        return out

    # ------------------------------------------------------- point-to-point
    def _raw_isend(self, x, dst, tag, meta):
        return ((self._meta if meta else self._c).Isend(_bytes16(x), dest=dst, tag=tag), x,
                lambda: f"send to {self._peer(dst)} tag {tag}{self._on()}")

    def _raw_irecv(self, buf, src, tag, meta):
        return ((self._meta if meta else self._c).Irecv(_bytes16(buf), source=src, tag=tag), buf,
                lambda: f"recv from {self._peer(src)} tag {tag}{self._on()}")

    def _raw_wait(self, handle):
        req, _keepalive, what = handle
        self._wait(req, what)

    # --------------------------------------------------------------- groups
    def _raw_split(self, color, key, new_rank, world_ranks, name):
        sub = self._c.Split(color, key)
        return MPIComm(sub, self.tracer, world_ranks, name, self.check, self.polite)

    def _raw_gather_objects(self, obj):
        return self._c.allgather(obj)          # pickle-ok: cold path (results, error reports)


def _offsets(counts: list[int]) -> list[int]:
    """Displacements of consecutive blocks of ``counts`` elements."""
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


def _polite_wait(req) -> None:
    """Test ``req`` in a loop that yields the core to any runnable rank
    (``sched_yield``) for up to 2 ms, then naps 0.2 ms between tests."""
    t_end = time.perf_counter() + _SPIN_SECONDS
    while time.perf_counter() < t_end:
        if req.Test():
            return
        _yield()
    while not req.Test():
        time.sleep(_NAP_SECONDS)


def _bytes16(x: np.ndarray) -> np.ndarray:
    """A 16-bit float array as the uint16 view MPI can move (mpi4py has no
    bfloat16 datatype); other arrays as they are.  (Reductions never see 16-bit
    arrays: the base class sums them in float32.)"""
    return x.view(np.uint16) if x.dtype in HALF_DTYPES else x


# ---------------------------------------------------------------- the job
def _abort() -> None:
    """``MPI_Abort`` the job; never return (measured: MPICH's Abort can return
    to its caller while the launcher tears the job down)."""
    sys.stderr.flush()
    try:
        _mpi().COMM_WORLD.Abort(1)
    finally:
        os._exit(1)


def _text(buf: np.ndarray) -> str:
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def _encode(text: str) -> np.ndarray:
    raw = text.encode()[:_MSG_BYTES - 1]
    out = np.zeros(_MSG_BYTES, np.uint8)
    out[:len(raw)] = np.frombuffer(raw, np.uint8)
    return out


class _Job:
    """This process's part of the job: a private duplicate of ``COMM_WORLD``
    for the watchdog's questions and failure notices (buffer methods only)."""

    def __init__(self, world_comm) -> None:
        MPI = _mpi()
        self.ctl = world_comm.Dup()
        self.rank, self.size = self.ctl.Get_rank(), self.ctl.Get_size()
        self.limit = watchdog_seconds()
        self.deadline = math.inf             # simpar.run(timeout=...)
        self.timeout = None
        self.pending = None                  # what this rank waits for (a callable)
        self.since = 0.0
        self._keep: list = []                # sends in flight and their buffers
        self.reporter: int | None = None     # a rank whose watchdog asked us
        self._ping = np.zeros(1, np.int64)
        self._ping_req = self.ctl.Irecv(self._ping, source=MPI.ANY_SOURCE, tag=_TAG_PING)
        self._lock = threading.Lock()        # the watchdog thread and a failing main thread
        self._stop = threading.Event()
        self._thread = None
        if self.limit:
            self.start_watching()
        import atexit
        atexit.register(self.close)          # runs before mpi4py's MPI_Finalize

    def start_watching(self) -> None:
        """Start the watchdog thread (once; a job of one rank needs none)."""
        if self._thread is not None or self.size == 1:
            return
        if _mpi().Query_thread() < _mpi().THREAD_MULTIPLE:
            sys.stderr.write("simpar: MPI was initialised without MPI_THREAD_MULTIPLE; "
                             "the watchdog (SIMPAR_WATCHDOG_S, run(timeout=)) is off\n")
            return
        self._thread = threading.Thread(target=self._watch, name="simpar-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the watchdog; withdraw the standing receive for questions (a
        clean MPI_Finalize)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            self._ping_req.Cancel()
            self._ping_req.Wait()
        except Exception:                    # noqa: BLE001 - finalising anyway
            pass

    def _watch(self) -> None:
        """The watchdog thread: answer other ranks' questions; fire when this
        rank has waited longer than the limit, or the run passed its timeout."""
        while not self._stop.wait(_WATCH_PERIOD):
            self.answer()
            now, since = time.perf_counter(), self.since
            if self.limit and self.pending is not None and now - since > self.limit:
                self.fire(f"rank {self.rank} waited more than {self.limit:g} s "
                          f"(SIMPAR_WATCHDOG_S={self.limit:g})")
            elif now > self.deadline:
                self.fire(f"the run passed its timeout of {self.timeout:g} s on rank {self.rank}")

    def doing(self) -> str:
        if self.pending is None:
            return "not waiting in simpar (computing, or finished)"
        return f"{self.pending()} (waiting {time.perf_counter() - self.since:.1f} s)"

    def answer(self) -> list[int]:
        """Answer the watchdog questions that arrived; return who asked."""
        MPI = _mpi()
        asked = []
        with self._lock:
            while self._ping_req.Test():
                src = int(self._ping[0])
                asked.append(src)
                if self.reporter is None:
                    self.reporter = src
                msg = _encode(self.doing())
                self._keep.append((self.ctl.Isend(msg, dest=src, tag=_TAG_REPLY), msg))
                self._ping = np.zeros(1, np.int64)
                self._ping_req = self.ctl.Irecv(self._ping, source=MPI.ANY_SOURCE, tag=_TAG_PING)
        return asked

    def fire(self, why: str) -> None:
        """Ask every rank what it waits for, print one report, abort the job.
        If a lower rank is reporting at the same time, leave it to that rank."""
        MPI = _mpi()
        self.answer()
        if self.reporter is not None:            # another rank's watchdog is reporting
            self._linger()
        me = np.array([self.rank], np.int64)
        for r in range(self.size):
            if r != self.rank:
                self._keep.append((self.ctl.Isend(me, dest=r, tag=_TAG_PING), me))
        states = {self.rank: self.doing()}
        status = MPI.Status()
        buf = np.zeros(_MSG_BYTES, np.uint8)
        t_end = time.perf_counter() + 1.5
        while len(states) < self.size and time.perf_counter() < t_end:
            if any(src < self.rank for src in self.answer()):
                self._linger()                   # a lower rank reports: stay quiet
            if self.ctl.Iprobe(MPI.ANY_SOURCE, _TAG_REPLY, status):
                src = status.Get_source()
                self.ctl.Recv(buf, source=src, tag=_TAG_REPLY)
                states[src] = _text(buf)
                buf[:] = 0
            else:
                time.sleep(1e-3)
        lines = [f"  rank {r}: {states.get(r, 'no answer (its watchdog is off, or it is stuck outside Python)')}"
                 for r in range(self.size)]
        sys.stdout.flush()
        sys.stderr.write(f"simpar watchdog: {why}; ending the job.  Pending operations:\n"
                         + "\n".join(lines) + "\n")
        sys.stderr.flush()
        time.sleep(0.3)
        _abort()

    def _linger(self, fallback=None) -> None:
        """Another rank reports and will abort the job: keep answering questions;
        if nothing has ended the job after 10 s, ``fallback()`` and abort."""
        t_end = time.perf_counter() + 10
        while time.perf_counter() < t_end:
            self.answer()
            time.sleep(1e-3)
        if fallback is not None:
            fallback()
        _abort()

    def _tell_all(self, tag: int, text: str) -> None:
        msg = _encode(text)
        for r in range(self.size):
            if r != self.rank:
                self._keep.append((self.ctl.Isend(msg, dest=r, tag=tag), msg))

    def fail(self, kind, value, tb) -> None:
        """This rank raised: print once per job, abort.  Every failing rank tells
        the others, then watches for 0.25 s.  It prints its traceback unless it
        heard that some rank prints already, or that a lower rank failed too
        (that one decides); a rank that stays quiet prints one line if its
        error differs from all it heard of."""
        MPI = _mpi()
        summary = "".join(traceback.format_exception_only(kind, value)).strip()
        status = MPI.Status()
        buf = np.zeros(_MSG_BYTES, np.uint8)
        notices: dict[int, str] = {}
        printing: list[int] = []

        def drain():
            for tag in (_TAG_FAIL, _TAG_PRINTING):
                while self.ctl.Iprobe(MPI.ANY_SOURCE, tag, status):
                    src = status.Get_source()
                    self.ctl.Recv(buf, source=src, tag=tag)
                    (notices.__setitem__(src, _text(buf)) if tag == _TAG_FAIL
                     else printing.append(src))
                    buf[:] = 0
        self._tell_all(_TAG_FAIL, summary)
        t_end = time.perf_counter() + 0.25
        while time.perf_counter() < t_end:       # who else fails at the same moment?
            drain()
            self.answer()
            time.sleep(1e-3)
        drain()

        def report():
            same = sorted(r for r, t in notices.items() if t == summary)
            sys.stdout.flush()
            traceback.print_exception(kind, value, tb)
            also = f" (and ranks {', '.join(map(str, same))} with the same error)" if same else ""
            sys.stderr.write(f"simpar: rank {self.rank} of {self.size} failed{also}; "
                             "aborting the job\n")
            sys.stderr.flush()
        if printing or any(r < self.rank for r in notices):
            if summary not in notices.values():
                sys.stderr.write(f"simpar: rank {self.rank} also failed: "
                                 f"{summary.splitlines()[-1]}\n")
                sys.stderr.flush()
            self._linger(report)
        self._tell_all(_TAG_PRINTING, "")
        report()
        time.sleep(0.3)
        _abort()


_JOB: _Job | None = None


def fail(kind, value, tb) -> None:
    """Report an uncaught exception of this rank once per job and end the job."""
    if _JOB is None or _JOB.size == 1:
        traceback.print_exception(kind, value, tb)
        abort_job()
    _JOB.fail(kind, value, tb)


def abort_on_exception() -> None:
    """Under mpiexec, an uncaught exception on one rank ends the whole job.

    By default mpi4py leaves the other ranks waiting forever; this hook reports
    the error once per job (:func:`fail`), then calls ``MPI.COMM_WORLD.Abort(1)``.
    """
    sys.excepthook = lambda kind, value, tb: fail(kind, value, tb)


def set_timeout(seconds: float | None) -> None:
    """``simpar.run(timeout=...)``: the watchdog ends the job once a rank waits
    past ``seconds`` from now (a rank that computes is caught by the others' waits)."""
    if _JOB is not None and seconds is not None:
        _JOB.timeout = float(seconds)
        _JOB.deadline = time.perf_counter() + float(seconds)
        _JOB.start_watching()


def abort_job() -> None:
    """End every rank of the job (after giving the launcher time to forward stderr)."""
    MPI = _mpi()
    sys.stderr.write(f"simpar: rank {MPI.COMM_WORLD.Get_rank()} failed; aborting the job\n")
    sys.stderr.flush()
    sys.stdout.flush()
    time.sleep(0.3)
    _abort()


def world(cluster=None, check=None) -> MPIComm:
    """The world communicator of this MPI job (a fresh tracer, activated).
    Collective: every rank calls it (the first call sets up the watchdog)."""
    global _JOB
    MPI = _mpi()
    if _JOB is None:
        _JOB = _Job(MPI.COMM_WORLD)
    tracer = trace.Tracer(MPI.COMM_WORLD.Get_rank(), cluster)
    trace.activate(tracer)
    return MPIComm(MPI.COMM_WORLD, tracer, check=check)
