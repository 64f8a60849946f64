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

If any rank raises, the world is aborted: every barrier is broken and every
mailbox waiter woken, so the other ranks raise :class:`WorldAborted` instead
of hanging, and ``launch`` re-raises the first real error, naming its rank.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .. import sim, trace
from .base import Comm, WorldAborted

_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class _World:
    """State shared by all ranks of one ``launch``: abort flag and mailboxes."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.aborted = False
        self.barriers: list[threading.Barrier] = []
        # channel -> messages by send number; channel -> receives posted so far
        self.mailboxes: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
        self.sent: dict[tuple, int] = defaultdict(int)
        self.posted: dict[tuple, int] = defaultdict(int)

    def new_barrier(self, n: int) -> threading.Barrier:
        b = threading.Barrier(n)
        with self.lock:
            self.barriers.append(b)
            if self.aborted:
                b.abort()
        return b

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            for b in self.barriers:
                b.abort()
            self.lock.notify_all()


class _Group:
    """Slots and a barrier for the members of one communicator."""

    def __init__(self, world: _World, size: int) -> None:
        self.world = world
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = world.new_barrier(size)

    def wait(self) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise WorldAborted("another rank failed; this rank was released") from None

    def exchange_begin(self, rank: int, obj: Any) -> list:
        """Publish ``obj`` and read everyone's; call ``wait()`` when done reading."""
        self.slots[rank] = obj
        self.wait()
        return list(self.slots)

    def exchange(self, rank: int, obj: Any, read: Callable[[list], Any] = list) -> Any:
        """Publish ``obj``; return ``read(everyone's objs)``, computed before any
        rank may leave (and overwrite its input in place)."""
        out = read(self.exchange_begin(rank, obj))
        self.wait()
        return out


class ThreadComm(Comm):
    backend = "threads"

    def __init__(self, group: _Group, rank: int, world_ranks, tracer, name="world",
                 check=None) -> None:
        super().__init__(rank, group.size, world_ranks, tracer, name, check)
        self._group = group
        self._world = group.world
        self._mail_id = id(group)

    # ---------------------------------------------------------- collectives
    def _raw_arrive(self, vec, sig):
        return self._raw_all_reduce(vec, "max", np.empty_like(vec))

    def _raw_all_reduce(self, x, op, out):
        parts = self._group.exchange_begin(self.rank, x)
        acc = parts[0].copy()                   # rank order: bit-identical on every rank
        for p in parts[1:]:
            _REDUCE[op](acc, p, out=acc)
        self._group.wait()                      # all have read: out may alias x now
        np.copyto(out, acc)
        return out

    def _raw_all_gather(self, x):
        return self._group.exchange(self.rank, x, np.stack)

    def _raw_reduce_scatter(self, x):
        n = x.shape[0] // self.size
        lo = self.rank * n

        def read(parts):
            out = parts[0][lo:lo + n].copy()
            for p in parts[1:]:
                out += p[lo:lo + n]
            return out
        return self._group.exchange(self.rank, x, read)

    def _raw_broadcast(self, x, root):
        return self._group.exchange(self.rank, x, lambda parts: parts[root].copy())

    def _raw_barrier(self):
        self._group.wait()

    def _raw_all_to_all_counts(self, counts):
        return self._group.exchange(
            self.rank, counts,
            lambda table: np.array([row[self.rank] for row in table], dtype=np.int64))

    def _raw_all_to_all(self, x, send_counts, recv_counts):
        def read(parts):
            pieces = []
            for xs, cs in parts:
                lo = int(cs[:self.rank].sum())
                pieces.append(xs[lo:lo + int(cs[self.rank])])
            return np.concatenate(pieces, axis=0) if pieces else x[:0].copy()
        return self._group.exchange(self.rank, (x, send_counts), read)

    # ------------------------------------------------------- point-to-point
    def _channel(self, src: int, dst: int, tag: int, meta: bool) -> tuple:
        return (self._mail_id, src, dst, tag, meta)

    def _raw_isend(self, x, dst, tag, meta):
        w = self._world
        ch = self._channel(self.rank, dst, tag, meta)
        with w.lock:
            if w.aborted:
                raise WorldAborted("another rank failed; this rank was released")
            w.mailboxes[ch][w.sent[ch]] = x.copy()      # buffered (eager) send
            w.sent[ch] += 1
            w.lock.notify_all()
        return None

    def _raw_irecv(self, buf, src, tag, meta):
        w = self._world
        ch = self._channel(src, self.rank, tag, meta)
        with w.lock:                                    # the ticket fixes the match, as MPI does
            ticket = w.posted[ch]
            w.posted[ch] += 1
        return (buf, src, ch, ticket, meta)

    def _raw_wait(self, handle):
        if handle is None:                      # sends complete at once
            return
        buf, src, ch, ticket, meta = handle
        w = self._world
        with w.lock:                # mailboxes are only touched under the lock
            box = w.mailboxes[ch]
            while ticket not in box and not w.aborted:
                w.lock.wait()
            if ticket not in box:
                raise WorldAborted("another rank failed; this rank was released")
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
        made = _Group(self._world, len(world_ranks)) if leader else None
        offers = self._group.exchange(self.rank, (color, made))
        group = next(g for c, g in offers if c == color and g is not None)
        return ThreadComm(group, new_rank, world_ranks, self.tracer, name, self.check)

    def _raw_gather_objects(self, obj):
        # copies, as MPI's pickling gives: the owners may go on changing theirs
        return self._group.exchange(self.rank, obj, copy.deepcopy)


def launch(fn: Callable[[Comm], Any], world_size: int = 4,
           cluster: sim.ClusterSpec | None = None, timeout: float | None = None,
           check: bool | None = None) -> list:
    """Run ``fn(comm)`` on ``world_size`` threads, one per rank; return the results.

    If a rank raises, the others are released and the first error is re-raised
    with a note naming its rank.  ``timeout`` (seconds) turns a hang into a
    ``TimeoutError`` naming the ranks that did not finish.
    """
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    world = _World()
    group = _Group(world, world_size)
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []
    done = [False] * world_size

    def run(rank: int) -> None:
        tracer = trace.Tracer(rank, cluster)
        trace.activate(tracer)
        comm = ThreadComm(group, rank, range(world_size), tracer, check=check)
        try:
            results[rank] = fn(comm)
        except BaseException as e:          # noqa: BLE001 - reported by launch
            with world.lock:
                errors.append((rank, e))
            world.abort()
        finally:
            done[rank] = True
            trace.activate(None)

    threads = [threading.Thread(target=run, args=(r,), name=f"simpar-rank{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if t.is_alive():
            stuck = [r for r in range(world_size) if not done[r]]
            world.abort()
            for u in threads:
                u.join(1.0)
            raise TimeoutError(f"simpar.launch: ranks {stuck} of {world_size} did not finish "
                               f"within {timeout} s (deadlock?)")
    real = [(r, e) for r, e in errors if not isinstance(e, WorldAborted)] or errors
    if real:
        rank, exc = real[0]
        note = f"raised on rank {rank} of a {world_size}-rank simpar.launch world"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:                                   # Python 3.10
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]
        exc.simpar_rank = rank
        print(f"simpar.launch: {note}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise exc
    return results
