"""The ``Comm`` interface: how simulated devices talk (DESIGN.md §3).

``Comm`` holds everything both backends share: argument checking, the
optional cross-rank shape check (``SIMPAR_CHECK=1``), the simulated clock and
the tracer.  A backend (:mod:`.threads`, :mod:`.mpi`) only implements a few raw
primitives on contiguous NumPy arrays, named ``_raw_*``.

Every public collective follows the same four steps::

    x = self._prepare(x)                     # dtype check, make contiguous
    self._agree("all_reduce", x, ...)        # SIMPAR_CHECK: same shapes everywhere?
    start = self._sync_clock(nbytes)         # collective starts at the latest member
    out = self._raw_all_reduce(x, op, out)   # the backend moves the bytes
    self._record(...)                        # tracer: wall + simulated event
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from .. import sim
from ..trace import Tracer

#: dtypes a message may carry (MPI maps each to a builtin datatype)
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32))
REDUCE_OPS = ("sum", "max", "min")

_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "barrier")
_MAX_DIMS = 8
_ENVELOPE_LEN = 3 + _MAX_DIMS   # [send time, dtype code, ndim, dims...]


class WorldAborted(RuntimeError):
    """Raised on every rank still waiting when another rank of the world failed."""


def check_enabled() -> bool:
    """Cross-rank shape checking, on when ``SIMPAR_CHECK=1`` (the test suite sets it)."""
    return os.environ.get("SIMPAR_CHECK", "0") not in ("", "0", "false", "False")


def as_message(x: np.ndarray) -> np.ndarray:
    """A C-contiguous array of a supported dtype, or a ``TypeError`` naming the dtype."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; simpar sends "
                        f"{', '.join(str(d) for d in DTYPES)}")
    if x.ndim > _MAX_DIMS:
        raise ValueError(f"arrays of more than {_MAX_DIMS} dimensions are not supported "
                         f"(got shape {x.shape})")
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; choose one of {REDUCE_OPS}")


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for an array of {ndim} dimensions")
    return axis % ndim


class Request:
    """A pending non-blocking operation; ``wait()`` returns the received array
    (or ``None`` for a send)."""

    def __init__(self, finish) -> None:
        self._finish = finish
        self._done = False
        self._result = None

    def wait(self):
        if not self._done:
            self._result = self._finish()
            self._done = True
        return self._result


class Comm:
    """A group of ranks.  Subclasses implement the ``_raw_*`` primitives."""

    backend = "abstract"

    def __init__(self, rank: int, size: int, world_ranks: Sequence[int], tracer: Tracer,
                 name: str = "world", check: bool | None = None) -> None:
        self.rank = rank
        self.size = size
        self.world_ranks = tuple(world_ranks)
        self.tracer = tracer
        self.name = name
        self.check = check_enabled() if check is None else check
        self._link_for = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} rank {self.rank}/{self.size}>"

    @property
    def link(self) -> sim.LinkSpec:
        """The link this group's collectives run over (the slowest it spans)."""
        cluster = self.tracer.cluster
        if self._link_for is not cluster:            # computed once per cluster
            self._link, self._link_for = cluster.link(self.world_ranks), cluster
        return self._link

    # ============================================================ collectives
    def all_reduce(self, x: np.ndarray, op: str = "sum", out: np.ndarray | None = None
                   ) -> np.ndarray:
        """Element-wise ``op`` (sum / max / min) over the group; every rank gets it.

        The result goes to a fresh array, or into ``out`` (a C-contiguous array
        of the same shape and dtype; ``out=x`` reduces in place, as a gradient
        all-reduce does)."""
        x, out = self._reduce_args(x, op, out)
        return self._collective("all_reduce", x.nbytes, lambda: self._raw_all_reduce(x, op, out))

    def iall_reduce(self, x: np.ndarray, op: str = "sum", out: np.ndarray | None = None
                    ) -> Request:
        """Non-blocking :meth:`all_reduce`; ``.wait()`` returns the result.

        On the **simulated clock** the reduction runs on this rank's
        communication stream, beside compute: it starts at the latest member's
        launch time (or when the stream's previous operation ends) and lasts its
        α-β cost, while the caller's clock goes on; ``wait()`` idles until it
        ends, if it has not ended yet.  That is how data parallelism hides its
        all-reduces behind the backward pass (DESIGN.md §5).  The bytes move
        now, at launch (MPICH progresses non-blocking collectives only inside
        ``Test``; measured 10-20x slower when ranks outnumber cores), so on the
        wall clock the overlap is not real on this machine."""
        x, out = self._reduce_args(x, op, out)
        t = self.tracer
        wall0 = time.perf_counter()
        launch = max(t.sim_now, t.comm_stream_free)
        start, nbytes = launch, x.nbytes
        if self.size > 1:
            start, most = self._raw_arrive(np.array([launch, float(nbytes)])).tolist()
            nbytes = int(most)
        end = start + sim.collective_time("all_reduce", nbytes, self.size, self.link)
        t.comm_stream_free = end
        event = t.add("comm", "all_reduce", wall0, wall0, start, end, nbytes=nbytes,
                      group=self.name, args={"size": self.size, "async": True})
        self._raw_all_reduce(x, op, out)
        if event is not None:
            event.wall_end = time.perf_counter()

        def finish():
            t.wait_until(end, "wait all_reduce")
            return out
        return Request(finish)

    def _reduce_args(self, x: np.ndarray, op: str, out: np.ndarray | None):
        """Checks of an all-reduce's arguments (and the cross-rank agreement)."""
        _check_op(op)
        x = as_message(x)
        if out is None:
            out = np.empty_like(x)
        elif (not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != x.dtype
              or not out.flags.c_contiguous):
            raise ValueError(f"all_reduce: out must be a C-contiguous {x.dtype} array of shape "
                             f"{x.shape}, got {getattr(out, 'dtype', type(out))} "
                             f"{getattr(out, 'shape', '')}")
        self._agree("all_reduce", x, extra=REDUCE_OPS.index(op))
        return x, out

    def all_gather(self, x: np.ndarray, axis: int = 0) -> np.ndarray:
        """Concatenate every rank's ``x`` along ``axis`` (rank order)."""
        x = as_message(x)
        axis = _norm_axis(axis, max(x.ndim, 1))
        self._agree("all_gather", x, extra=axis)

        def run():
            stacked = self._raw_all_gather(x)                  # (size, *x.shape)
            return np.concatenate(list(stacked), axis=axis) if axis else \
                stacked.reshape((-1,) + x.shape[1:])
        return self._collective("all_gather", x.nbytes * self.size, run)

    def reduce_scatter(self, x: np.ndarray, axis: int = 0) -> np.ndarray:
        """Sum over the group, then keep this rank's ``1/size`` slice along ``axis``."""
        x = as_message(x)
        axis = _norm_axis(axis, max(x.ndim, 1))
        if x.shape[axis] % self.size:
            raise ValueError(f"reduce_scatter: dimension {axis} of shape {x.shape} is not "
                             f"divisible by the group size {self.size}")
        self._agree("reduce_scatter", x, extra=axis)

        def run():
            # bring the scattered axis to the front so each rank's block is contiguous
            blocks = np.ascontiguousarray(np.moveaxis(x, axis, 0)) if axis else x
            part = self._raw_reduce_scatter(blocks)
            return np.ascontiguousarray(np.moveaxis(part, 0, axis)) if axis else part
        return self._collective("reduce_scatter", x.nbytes, run)

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        """Every rank gets ``root``'s array (all ranks pass an array of that shape)."""
        self._check_rank(root, "root")
        x = as_message(x)
        self._agree("broadcast", x, extra=root)
        return self._collective("broadcast", x.nbytes, lambda: self._raw_broadcast(x, root))

    def barrier(self) -> None:
        self._agree("barrier", np.zeros(0))
        self._collective("barrier", 0, self._raw_barrier)

    def all_to_all(self, x: np.ndarray, send_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Uneven all-to-all along axis 0: rows ``[sum(c[:i]), sum(c[:i+1]))`` of ``x``
        go to rank ``i``.  Returns the received rows (in source-rank order) and
        the number received from each rank.  Counts are exchanged first."""
        x = as_message(x)
        counts = np.asarray(send_counts, dtype=np.int64)
        if counts.shape != (self.size,) or (counts < 0).any():
            raise ValueError(f"all_to_all: send_counts must be {self.size} non-negative "
                             f"integers, got {list(send_counts)}")
        if x.ndim == 0 or counts.sum() != x.shape[0]:
            raise ValueError(f"all_to_all: send_counts sum to {int(counts.sum())} but x has "
                             f"shape {x.shape}")
        self._agree("all_to_all", x, extra=0, skip_first_dim=True)

        def run():      # counts first, inside the traced region (waiting shows as comm)
            recv_counts = self._raw_all_to_all_counts(counts)
            return self._raw_all_to_all(x, counts, recv_counts), recv_counts
        # n = the bytes one rank holds; members may differ, the collective lasts for the largest
        return self._collective("all_to_all", x.nbytes, run)

    # ====================================================== point-to-point
    def send(self, x: np.ndarray, dst: int, tag: int = 0) -> None:
        self.isend(x, dst, tag).wait()

    def recv(self, shape: Sequence[int], dtype, src: int, tag: int = 0) -> np.ndarray:
        return self.irecv(shape, dtype, src, tag).wait()

    def isend(self, x: np.ndarray, dst: int, tag: int = 0) -> Request:
        """Non-blocking send.  The sender's simulated time travels with the message
        (an envelope also carrying dtype and shape, checked by the receiver)."""
        self._check_rank(dst, "dst")
        x = as_message(x)
        env = np.zeros(_ENVELOPE_LEN)
        env[0] = self.tracer.sim_now
        env[1] = DTYPES.index(x.dtype)
        env[2] = x.ndim
        env[3:3 + x.ndim] = x.shape
        wall0 = time.perf_counter()
        h_env = self._raw_isend(env, dst, tag, meta=True)
        h_data = self._raw_isend(x, dst, tag, meta=False)
        now = self.tracer.sim_now

        def finish():
            self._raw_wait(h_env)
            self._raw_wait(h_data)
            self.tracer.add("comm", "send", wall0, time.perf_counter(), now, now,
                            nbytes=x.nbytes, group=self.name, args={"dst": dst, "tag": tag})
        return Request(finish)

    def irecv(self, shape: Sequence[int], dtype, src: int, tag: int = 0) -> Request:
        """Non-blocking receive into a fresh array (never a reused buffer)."""
        self._check_rank(src, "src")
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise TypeError(f"unsupported dtype {dtype}")
        buf = np.empty(shape, dtype)
        env = np.empty(_ENVELOPE_LEN)
        h_env = self._raw_irecv(env, src, tag, meta=True)
        h_data = self._raw_irecv(buf, src, tag, meta=False)

        def finish():
            wall0 = time.perf_counter()
            self._raw_wait(h_env)
            got_dtype = DTYPES[int(env[1])]
            got_shape = tuple(int(d) for d in env[3:3 + int(env[2])])
            if got_shape != shape or got_dtype != dtype:
                raise ValueError(f"{self.name} rank {self.rank}: recv from rank {src} (tag {tag}) "
                                 f"expected {shape} {dtype}, but the sender sent {got_shape} "
                                 f"{got_dtype}")
            self._raw_wait(h_data)
            sent_at = float(env[0])
            arrival = sent_at + sim.p2p_time(buf.nbytes, self._link_to(src))
            start = max(self.tracer.sim_now, sent_at)
            self.tracer.wait_until(start, "wait recv")
            end = max(start, arrival)
            self.tracer.sim_now = end
            self.tracer.add("comm", "recv", wall0, time.perf_counter(), start, end,
                            nbytes=buf.nbytes, group=self.name, args={"src": src, "tag": tag})
            return buf
        return Request(finish)

    # =========================================================== groups
    def split(self, color: int, key: int = 0, name: str | None = None) -> "Comm":
        """Sub-communicator of the ranks passing the same ``color``, ordered by
        ``(key, rank)``.  Every rank of this group must call it."""
        pair = np.array([color, key], dtype=np.int64)
        table = self._raw_all_gather(pair)                    # (size, 2)
        members = sorted((int(k), r) for r, (c, k) in enumerate(table) if c == color)
        ranks = [r for _, r in members]
        new_rank = ranks.index(self.rank)
        world_ranks = [self.world_ranks[r] for r in ranks]
        return self._raw_split(color, key, new_rank, world_ranks,
                               name or f"{self.name}/{color}")

    def gather_objects(self, obj) -> list:
        """Every rank's Python object, on every rank.  Cold path only (pickles
        under MPI): traces and results at the end of a run."""
        return self._raw_gather_objects(obj)

    # ============================================================= helpers
    def _check_rank(self, r: int, what: str) -> None:
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self.size:
            raise ValueError(f"{what}={r!r} is not a rank of {self.name} (size {self.size})")

    def _link_to(self, peer: int) -> sim.LinkSpec:
        return self.tracer.cluster.link((self.world_ranks[self.rank], self.world_ranks[peer]))

    def _agree(self, kind: str, x: np.ndarray, extra: int = 0,
               skip_first_dim: bool = False) -> None:
        """SIMPAR_CHECK: all ranks must call the same collective with the same
        shape and dtype; otherwise every rank raises the same ValueError."""
        if not self.check or self.size == 1:
            return
        dims = list(x.shape[1:] if skip_first_dim else x.shape)
        sig = np.full(4 + _MAX_DIMS, -1, dtype=np.int64)
        sig[0] = _KINDS.index(kind)
        sig[1] = DTYPES.index(x.dtype) if x.dtype in DTYPES else -1
        sig[2] = extra
        sig[3] = len(dims)
        sig[4:4 + len(dims)] = dims
        table = self._raw_gather_signature(sig)
        if (table == table[0]).all():
            return
        rows = []
        for r, row in enumerate(table):
            k = _KINDS[row[0]]
            shp = tuple(int(d) for d in row[4:4 + row[3]])
            dt = DTYPES[row[1]] if row[1] >= 0 else "?"
            rows.append(f"rank {r}: {k} shape {'(*, ' + str(shp)[1:] if skip_first_dim else shp}"
                        f" {dt} arg {row[2]}")
        raise ValueError(f"ranks of {self.name} disagree in a collective call "
                         f"(SIMPAR_CHECK): " + "; ".join(rows))

    def _collective(self, kind: str, nbytes: int, run):
        """Simulated clock + tracer around one collective (DESIGN.md §4).

        A tiny max-all-reduce of ``[sim time, bytes]`` first: the collective
        starts at the latest member's time and lasts as long as its largest
        member's message.  It doubles as the arrival point where backends wait
        politely, so the data itself moves with everyone present."""
        t = self.tracer
        wall0 = time.perf_counter()
        if self.size > 1:
            start, most = self._raw_arrive(np.array([t.sim_now, float(nbytes)])).tolist()
            nbytes = int(most)
            if start > t.sim_now:
                t.wait_until(start, "wait " + kind)
        else:
            start = t.sim_now
        # bookkeeping before the data moves: Python right after a large
        # transfer runs with cold caches (~10x slower on this machine)
        end = start + sim.collective_time(kind, nbytes, self.size, self.link)
        event = t.add("comm", kind, wall0, wall0, start, end, nbytes=nbytes,
                      group=self.name, args={"size": self.size})
        out = run()
        t.sim_now = end
        if event is not None:
            event.wall_end = time.perf_counter()
        return out

    # ============================================== backend primitives
    def _raw_arrive(self, clock: np.ndarray) -> np.ndarray:
        """Element-wise max of a tiny array over the group.  Every member must
        arrive before a collective's data moves; backends wait here politely."""
        raise NotImplementedError

    def _raw_gather_signature(self, sig: np.ndarray) -> np.ndarray:
        """All ranks' call signatures (SIMPAR_CHECK); also an arrival point."""
        return self._raw_all_gather(sig)

    def _raw_all_reduce(self, x: np.ndarray, op: str, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_all_gather(self, x: np.ndarray) -> np.ndarray:
        """Stack every rank's ``x``: shape ``(size, *x.shape)``."""
        raise NotImplementedError

    def _raw_reduce_scatter(self, x: np.ndarray) -> np.ndarray:
        """Sum, then rows ``[rank*n/size, (rank+1)*n/size)`` of axis 0."""
        raise NotImplementedError

    def _raw_broadcast(self, x: np.ndarray, root: int) -> np.ndarray:
        raise NotImplementedError

    def _raw_barrier(self) -> None:
        raise NotImplementedError

    def _raw_all_to_all_counts(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_all_to_all(self, x: np.ndarray, send_counts: np.ndarray,
                        recv_counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_isend(self, x: np.ndarray, dst: int, tag: int, meta: bool):
        raise NotImplementedError

    def _raw_irecv(self, buf: np.ndarray, src: int, tag: int, meta: bool):
        raise NotImplementedError

    def _raw_wait(self, handle) -> None:
        raise NotImplementedError

    def _raw_split(self, color: int, key: int, new_rank: int, world_ranks: list[int],
                   name: str) -> "Comm":
        raise NotImplementedError

    def _raw_gather_objects(self, obj) -> list:
        raise NotImplementedError
