"""An in-process world: one thread per rank (DESIGN.md §3).

``launch(fn, world_size=4)`` runs ``fn(comm)`` on ``world_size`` threads and
returns the per-rank results.  NumPy releases the GIL inside BLAS, so the
ranks really compute in parallel.

A collective is an *exchange*: each rank puts its array in its slot, waits at
a barrier, reads every slot, and waits again so the slots — and the callers'
input arrays, which the slots reference — can be reused.
Reductions add the slots in rank order, so every rank gets bit-identical
results.  Messages go through mailboxes keyed by ``(src, dst, tag)``; as in
MPI, receives are matched to messages in the order they were *posted*
(``irecv``), not the order they are waited for.

If any rank raises, the world is aborted: every waiter is woken, so the other
ranks raise :class:`WorldAborted` instead of hanging, and ``launch``
re-raises the first real error, naming its rank.

**Deadlocks are detected exactly**, without a timeout.  Every wait (a barrier
of a collective, a receive) happens under one world lock and is registered
with what would end it.  Whenever a rank starts to wait or finishes, the
world checks: if every rank that has not finished waits for something that
has not happened (a message not sent, a collective some member has not
reached), no rank can ever make progress, and every waiting rank raises the
same :class:`DeadlockError` listing what each rank waits for, e.g.
``rank 0: recv from rank 1 tag 5 on world; rank 1: finished``.  A wait
longer than ``SIMPAR_WATCHDOG_S`` seconds (default 60; 0 turns it off) during
which no rank communicated at all (a rank computing forever while the others
wait for it) raises the same kind of report.
"""
from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .. import runtime, sim, trace
from .base import Comm, DeadlockError, WorldAborted, watchdog_seconds

_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}
_RELEASED = "another rank failed; this rank was released"
_GRACE_SECONDS = 1.0        # launch: how long released ranks get to notice


class _World:
    """State shared by all ranks of one ``launch``: one lock, what each rank
    waits for, the abort flag and the mailboxes."""

    def __init__(self, size: int, watchdog: float | None = None) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.mail = threading.Condition(self.lock)      # mailbox waiters
        self.ended = threading.Condition(self.lock)     # launch: a rank finished
        self.conditions: list[threading.Condition] = [self.mail, self.ended]
        self.aborted = False
        self.deadlock: str | None = None                # the report, once detected
        # per world rank: None (running), "finished", "failed", or (describe, ready)
        self.state: list[Any] = [None] * size
        self.watchdog = watchdog_seconds() if watchdog is None else watchdog
        self.progress = time.monotonic()                # last barrier passed / message sent
        # channel -> messages by send number; channel -> receives posted so far
        self.mailboxes: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
        self.sent: dict[tuple, int] = defaultdict(int)
        self.posted: dict[tuple, int] = defaultdict(int)

    def new_condition(self) -> threading.Condition:
        c = threading.Condition(self.lock)
        with self.lock:
            self.conditions.append(c)
        return c

    def abort(self) -> None:
        with self.lock:
            self._abort_locked()

    def _abort_locked(self) -> None:
        self.aborted = True
        for c in self.conditions:
            c.notify_all()

    def _raise_if_aborted(self) -> None:
        if self.deadlock is not None:
            raise DeadlockError(self.deadlock)
        if self.aborted:
            raise WorldAborted(_RELEASED)

    # ------------------------------------------------ waiting, with detection
    def block(self, rank: int, cond: threading.Condition, ready: Callable[[], bool],
              describe: Callable[[], str]) -> None:
        """Wait (holding ``self.lock``) on ``cond`` until ``ready()``.  Raises
        DeadlockError if no rank can make progress, WorldAborted if another
        rank failed."""
        self._raise_if_aborted()
        if ready():
            return
        self.state[rank] = (describe, ready)
        try:
            self._detect_locked()
            t0 = time.monotonic()
            while not ready():
                self._raise_if_aborted()
                if self.watchdog:
                    # only when nothing at all happened for that long (a big
                    # pipeline may keep one rank waiting while the others work)
                    left = max(t0, self.progress) + self.watchdog - time.monotonic()
                    if left <= 0:
                        self._report_locked(
                            f"rank {rank} waited more than {self.watchdog:g} s and no rank "
                            f"communicated meanwhile (SIMPAR_WATCHDOG_S)")
                        self._raise_if_aborted()
                    cond.wait(min(left, 3600.0))
                else:
                    cond.wait()
        finally:
            self.state[rank] = None

    def finish(self, rank: int, failed: bool) -> None:
        with self.lock:
            self.state[rank] = "failed" if failed else "finished"
            self.ended.notify_all()
            if failed:
                self._abort_locked()
            else:
                self._detect_locked()

    def _detect_locked(self) -> None:
        """Deadlock: every rank finished or waits for what has not happened."""
        if self.aborted:
            return
        waiting = False
        for s in self.state:
            if s is None or s == "failed":
                return                        # a running rank may still unblock the others
            if s != "finished":
                if s[1]():
                    return                    # released, not yet awake
                waiting = True
        if waiting:
            self._report_locked("deadlock: every rank waits for something no rank will do")

    def _report_locked(self, why: str) -> None:
        self.deadlock = f"{why}: " + self.describe_locked()
        self._abort_locked()

    def describe_locked(self) -> str:
        parts = []
        for r, s in enumerate(self.state):
            if s is None:
                what = "running (not in a simpar call)"
            elif isinstance(s, str):
                what = s
            else:
                what = s[0]()
            parts.append(f"rank {r}: {what}")
        return "; ".join(parts)


class _Group:
    """Slots and a barrier for the members of one communicator."""

    def __init__(self, world: _World, size: int, world_ranks) -> None:
        self.world = world
        self.size = size
        self.world_ranks = tuple(world_ranks)
        self.slots: list[Any] = [None] * size
        self.cond = world.new_condition()
        self.generation = 0
        self.arrived: list[int] = []

    def wait(self, rank: int, what: Callable[[], str] = lambda: "barrier",
             name: str = "world") -> None:
        """A barrier of the group's members (``rank``: this member's rank in it)."""
        w = self.world
        with w.lock:
            w._raise_if_aborted()
            gen = self.generation
            self.arrived.append(rank)
            if len(self.arrived) == self.size:
                self.arrived = []
                self.generation += 1
                w.progress = time.monotonic()
                self.cond.notify_all()
                return

            def describe():
                missing = [self.world_ranks[r] for r in range(self.size)
                           if r not in self.arrived]
                return (f"{what()} on {name} (waiting for rank"
                        f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))})")
            w.block(self.world_ranks[rank], self.cond, lambda: self.generation != gen, describe)

    def exchange_begin(self, rank: int, obj: Any, what, name) -> list:
        """Publish ``obj`` and read everyone's; call ``wait()`` when done reading."""
        self.slots[rank] = obj
        self.wait(rank, what, name)
        return list(self.slots)

    def exchange(self, rank: int, obj: Any, what, name, read: Callable[[list], Any] = list
                 ) -> Any:
        """Publish ``obj``; return ``read(everyone's objs)``, computed before any
        rank may leave (and overwrite its input in place)."""
        out = read(self.exchange_begin(rank, obj, what, name))
        self.wait(rank, what, name)
        return out


class ThreadComm(Comm):
    backend = "threads"

    def __init__(self, group: _Group, rank: int, world_ranks, tracer, name="world",
                 check=None) -> None:
        super().__init__(rank, group.size, world_ranks, tracer, name, check)
        self._group = group
        self._world = group.world
        self._mail_id = id(group)
        self._sig: tuple = ("barrier", 0, None, ())
        self._what = lambda: self._describe(self._sig)

    def _exchange(self, obj, read=list):
        return self._group.exchange(self.rank, obj, self._what, self.name, read)

    # ---------------------------------------------------------- collectives
    def _raw_arrive(self, record, table, sig):
        self._sig = sig
        self._exchange(record, lambda records: np.stack(records, out=table))

    def _raw_all_reduce(self, x, op, out):
        parts = self._group.exchange_begin(self.rank, x, self._what, self.name)
        acc = parts[0].copy()                   # rank order: bit-identical on every rank
        for p in parts[1:]:
            _REDUCE[op](acc, p, out=acc)
        self._group.wait(self.rank, self._what, self.name)   # all have read: out may alias x
        np.copyto(out, acc)
        return out

    def _raw_all_gather(self, x, out):
        self._exchange(x, lambda parts: np.stack(parts, out=out))

    def _raw_reduce_scatter(self, x, out):
        n = x.shape[0] // self.size
        lo = self.rank * n

        def read(parts):
            np.copyto(out, parts[0][lo:lo + n])
            for p in parts[1:]:
                np.add(out, p[lo:lo + n], out=out)
        self._exchange(x, read)

    def _raw_broadcast(self, x, root, out):
        self._exchange(x, lambda parts: np.copyto(out, parts[root]))

    def _raw_barrier(self):
        self._group.wait(self.rank, self._what, self.name)

    def _raw_all_to_all_counts(self, counts):
        return self._exchange(
            counts, lambda table: np.array([row[self.rank] for row in table], dtype=np.int64))

    def _raw_all_to_all(self, x, send_counts, recv_counts):
        def read(parts):
            pieces = []
            for xs, cs in parts:
                lo = int(cs[:self.rank].sum())
                pieces.append(xs[lo:lo + int(cs[self.rank])])
            return np.concatenate(pieces, axis=0) if pieces else x[:0].copy()
        return self._exchange((x, send_counts), read)

    # ------------------------------------------------------- point-to-point
    def _channel(self, src: int, dst: int, tag: int, meta: bool) -> tuple:
        return (self._mail_id, src, dst, tag, meta)

    def _raw_isend(self, x, dst, tag, meta):
        w = self._world
        ch = self._channel(self.rank, dst, tag, meta)
        with w.lock:
            w._raise_if_aborted()
            w.mailboxes[ch][w.sent[ch]] = x.copy()      # buffered (eager) send
            w.sent[ch] += 1
            w.progress = time.monotonic()
            w.mail.notify_all()
        return None

    def _raw_irecv(self, buf, src, tag, meta):
        w = self._world
        ch = self._channel(src, self.rank, tag, meta)
        with w.lock:                                    # the ticket fixes the match, as MPI does
            ticket = w.posted[ch]
            w.posted[ch] += 1
        return (buf, src, ch, ticket, meta, tag)

    def _peer(self, r: int) -> str:
        wr = self.world_ranks[r]
        return f"rank {wr}" if self.name == "world" else f"rank {wr} ({self.name} rank {r})"

    def _raw_wait(self, handle):
        if handle is None:                      # sends complete at once
            return
        buf, src, ch, ticket, meta, tag = handle
        w = self._world
        with w.lock:                # mailboxes are only touched under the lock
            box = w.mailboxes[ch]
            w.block(self.world_ranks[self.rank], w.mail, lambda: ticket in box,
                    lambda: f"recv from {self._peer(src)} tag {tag}"
                            + (f" on {self.name}" if self.name != "world" else ""))
            msg = box.pop(ticket)
        if msg.shape != buf.shape or msg.dtype != buf.dtype:
            if meta:
                raise ValueError(f"corrupt envelope from rank {src}")
            raise ValueError(f"{self.name} rank {self.rank}: recv from rank {src} expected "
                             f"{buf.shape} {buf.dtype}, got {msg.shape} {msg.dtype}")
        np.copyto(buf, msg)

    # --------------------------------------------------------------- groups
    def _raw_split(self, color, key, new_rank, world_ranks, name):
        # the lowest rank of each colour creates the shared group state
        leader = new_rank == 0
        made = _Group(self._world, len(world_ranks), world_ranks) if leader else None
        offers = self._exchange((color, made))
        group = next(g for c, g in offers if c == color and g is not None)
        return ThreadComm(group, new_rank, world_ranks, self.tracer, name, self.check)

    def _raw_gather_objects(self, obj):
        # copies, as MPI's pickling gives: the owners may go on changing theirs
        return self._exchange(obj, copy.deepcopy)


def default_timeout() -> float:
    """``launch``'s wall-clock limit when none is given: ``SIMPAR_TIMEOUT_S``
    seconds, default 1800 (0 or ``inf``: none).  Deadlocks do not need it
    (they are detected at once); it ends runs that loop without communicating."""
    v = os.environ.get("SIMPAR_TIMEOUT_S", "1800").strip().lower()
    t = float(v) if v not in ("", "inf", "none", "off") else math.inf
    return math.inf if t <= 0 else t


def launch(fn: Callable[[Comm], Any], world_size: int = 4,
           cluster: sim.ClusterSpec | None = None, timeout: float | None = None,
           check: bool | None = None, watchdog: float | None = None) -> list:
    """Run ``fn(comm)`` on ``world_size`` threads, one per rank; return the results.

    If a rank raises, the others are released and the first error is re-raised
    (once: the traceback shows it) with a note naming its rank.  A deadlock
    raises :class:`DeadlockError` at once, listing what each rank waits for
    (see the module docstring).  ``timeout`` (seconds, default
    :func:`default_timeout`, ``math.inf`` for none) turns a run that never ends
    into a ``TimeoutError`` naming what each rank is doing; ``watchdog``
    (default ``SIMPAR_WATCHDOG_S``, 60 s) limits a single wait.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) \
            or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    world = _World(world_size, watchdog)
    group = _Group(world, world_size, range(world_size))
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def rank_main(rank: int) -> None:
        tracer = trace.Tracer(rank, cluster)
        trace.activate(tracer)
        comm = ThreadComm(group, rank, range(world_size), tracer, check=check)
        failed = True
        try:
            results[rank] = fn(comm)
            failed = False
        except BaseException as e:          # noqa: BLE001 - reported by launch
            with world.lock:
                errors.append((rank, e))
        finally:
            world.finish(rank, failed)
            trace.activate(None)

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"simpar-rank{r}",
                                daemon=True) for r in range(world_size)]
    with runtime.one_blas_thread_per_device():      # each device thread on its own core
        for t in threads:
            t.start()
        left_behind = _wait_for_ranks(world, errors, default_timeout() if timeout is None
                                      else timeout)
    real = [(r, e) for r, e in errors if not isinstance(e, WorldAborted)] or errors
    if real:
        raise _annotated(*real[0], world_size, left_behind)
    return results


def _wait_for_ranks(world: _World, errors: list, timeout: float) -> list[int]:
    """Wait until every rank has finished or failed; returns the ranks left
    behind (still computing after an abort).  Raises ``TimeoutError`` after
    ``timeout`` seconds, naming what each rank is doing."""
    deadline = time.monotonic() + timeout
    with world.lock:
        aborted_at = None
        while True:
            running = [r for r, st in enumerate(world.state) if st not in ("finished", "failed")]
            if not running:
                return []
            now = time.monotonic()
            if world.aborted:
                # a rank that never calls into simpar again cannot be released: give
                # it a moment, then report without it (its thread is left behind)
                aborted_at = now if aborted_at is None else aborted_at
                if now - aborted_at > _GRACE_SECONDS and errors:
                    return running
            if now >= deadline:
                states = world.describe_locked()
                world._abort_locked()
                raise TimeoutError(f"simpar.launch: ranks {running} of {world.size} did not "
                                   f"finish within {timeout:g} s: {states}")
            wait = deadline - now
            if world.aborted:
                wait = min(wait, _GRACE_SECONDS / 4)
            world.ended.wait(min(wait, 3600.0))


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:                                   # Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def _annotated(rank: int, exc: BaseException, world_size: int,
               left_behind: list[int]) -> BaseException:
    """``exc`` with notes naming the failing rank (and ranks left running)."""
    if isinstance(exc, DeadlockError):
        _add_note(exc, f"detected in a {world_size}-rank simpar.launch world")
    else:
        _add_note(exc, f"raised on rank {rank} of a {world_size}-rank simpar.launch world")
    exc.simpar_rank = rank
    if left_behind:
        _add_note(exc, f"ranks {left_behind} were still computing (never called into simpar "
                       "again) and were left running in the background")
    return exc
