"""The ``Comm`` interface: how simulated devices talk (DESIGN.md §3).

``Comm`` holds everything both backends share: argument checking, the
cross-rank agreement check, the simulated clock and the tracer.  A backend
(:mod:`.threads`, :mod:`.mpi`) only implements a few raw primitives on
contiguous NumPy arrays, named ``_raw_*``.

Every public collective follows the same steps::

    x = as_message(x)                                 # dtype check, make contiguous
    sig = ("all_reduce", op_index, x.dtype, x.shape)  # what this rank calls
    plan, event, nan = self._begin(sig, nbytes, x)    # arrival exchange, clock, trace
    ...                                               # the data (plan.rows if it rode along)
    _end(event)                                       # the event's wall-clock end

What a call signature fixes — its fingerprint, where its message sits in the
arrival record, its simulated cost on the current cluster — is worked out at
its first call and kept in a :class:`_Plan`, so a repeated call (a layer's
all-reduce, step after step) only looks it up: simpar's own Python per call is
part of every timeline a learner sees.

The **arrival exchange** is one all-gather of a fixed-size record per rank::

    [sim time, bytes, NaN flag, h, -h | payload (up to INLINE_BYTES)]

where ``h`` is a 52-bit fingerprint of the call (collective, dtype, shape, op /
axis / root).  The maximum over the records' heads tells every rank when the
collective starts on the simulated clock, how many bytes the largest member
moves, whether any member's max/min input holds a NaN, and whether all members
make the same call: they do iff every ``h`` is the same (``max(h) == -max(-h)``).  A message of at most
``INLINE_BYTES`` rides in the payload, so a small collective (a loss, a norm,
an overflow flag, a 1 KiB all-reduce) is complete after this one exchange,
reduced locally in rank order; an all-to-all's send counts ride there too.  A
larger message moves after it, with everyone known present.  Only on a mismatch
is there a second exchange (every rank's description of its call, pickled: a
cold path) so that every rank raises the same ``ValueError`` naming each rank's
call.  The check is always on; it costs no extra message.  :meth:`Comm.agree`
uses the same exchange for values a parallel entry point needs equal on every
rank (configurations, schedules, shapes).
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from .. import sim
from ..trace import Tracer

#: 16-bit floating-point messages (mixed precision): bfloat16 (``ml_dtypes``) and
#: float16.  They move as 2-byte elements (MPI: as uint16, the same bytes); sums
#: and max/min are computed in float32 and rounded once to 16 bits, so both
#: backends give the same bits and the simulated clock counts 2 bytes an element.
HALF_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
#: dtypes a message may carry (MPI maps each to a builtin datatype; 16-bit: uint16)
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64),
          np.dtype(np.int32)) + HALF_DTYPES
REDUCE_OPS = ("sum", "max", "min")
_UFUNC = {"sum": np.add, "max": np.maximum, "min": np.minimum}
MAX_TAG = 32767                 # MPI guarantees tags up to at least 2**15 - 1

_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "barrier",
          "iall_reduce", "split", "gather_objects", "agree")
_KIND_CODE = {k: i for i, k in enumerate(_KINDS)}
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
_MAX_DIMS = 8
#: messages up to this many bytes ride in the arrival exchange (one exchange in all)
INLINE_BYTES = 1024
_HEAD = 5                       # [sim time, bytes, NaN flag, h, -h]
_RECORD = _HEAD + INLINE_BYTES // 8   # float64 slots of one rank's arrival record
_HEAD_STRUCT = struct.Struct(f"{_HEAD}d")
#: one rank's head as read back from the table: [time, bytes, flag, h], then
#: -h and the payload skipped (pad bytes) up to the next rank's record
_HEAD_READ = f"4d{8 * (_RECORD - 4)}x"
_MAX_PLANS = 512                # call signatures remembered per communicator
_ENVELOPE_LEN = 3 + _MAX_DIMS   # [send time, dtype code, ndim, dims...]
_ENVELOPE = struct.Struct(f"{_ENVELOPE_LEN}d")
#: an envelope's first 3 + ndim slots, by ndim (the rest stay zero)
_ENVELOPE_HEAD = [struct.Struct(f"{3 + n}d") for n in range(_MAX_DIMS + 1)]
_FP_MASK = (1 << 52) - 1        # fingerprints are integers a float64 holds exactly


class WorldAborted(RuntimeError):
    """Raised on every rank still waiting when another rank of the world failed."""


class DeadlockError(RuntimeError):
    """Every live rank of a threads world waits for something no rank will do
    (or a wait outlived its limit).  The message lists what each rank waits for."""


def watchdog_seconds() -> float:
    """The longest a rank may wait for its peers before the job is reported
    and ended: ``SIMPAR_WATCHDOG_S`` seconds, default 60; ``0`` or ``off``
    turns the watchdog off (returns 0)."""
    v = os.environ.get("SIMPAR_WATCHDOG_S", "60").strip().lower()
    if v in ("", "0", "off", "none", "inf"):
        return 0.0
    try:
        return max(float(v), 0.0)
    except ValueError:
        raise ValueError(f"SIMPAR_WATCHDOG_S={v!r} is not a number of seconds") from None


def _fingerprint_text(text: str) -> int:
    """A 52-bit fingerprint of a string, the same in every process (``hash(str)``
    is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little") \
        & _FP_MASK


def _group_ranks(descs: Sequence[str]) -> str:
    """``"ranks 0, 2: A; rank 1: B"``: each distinct description once, in rank order."""
    order: dict[str, list[int]] = {}
    for r, d in enumerate(descs):
        order.setdefault(d, []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {d}"
                     for d, rs in order.items())


def check_enabled() -> bool:
    """Extra (costly) checks, on when ``SIMPAR_CHECK=1`` (the test suite sets it).

    The cross-rank agreement of collectives and :meth:`Comm.agree` are always
    on; ``comm.check`` is for checks that cost more than a fingerprint."""
    return os.environ.get("SIMPAR_CHECK", "0") not in ("", "0", "false", "False")


def as_message(x: np.ndarray) -> np.ndarray:
    """A C-contiguous array of a supported dtype, or a ``TypeError`` naming the dtype."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"unsupported dtype {x.dtype}; simpar sends "
                        f"{', '.join(str(d) for d in DTYPES)}")
    if x.ndim > _MAX_DIMS:
        raise ValueError(f"arrays of more than {_MAX_DIMS} dimensions are not supported "
                         f"(got shape {x.shape})")
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_out(out, shape: tuple, dtype, what: str) -> np.ndarray:
    """``out`` if it can take the result (C-contiguous, that shape and dtype)."""
    if (not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype
            or not out.flags.c_contiguous):
        raise ValueError(f"{what}: out must be a C-contiguous {dtype} array of shape {shape}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")
    return out


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


def _end(event) -> None:
    """Close a collective's trace event (``None``: tracing is off) once its data moved."""
    if event is not None:
        event.wall_end = time.perf_counter()


class _Plan:
    """What one call signature fixes on one communicator, worked out at its
    first call and looked up by every later one (the hot path of a collective
    does no hashing, no view-making, no pricing of its own):

    * ``h``: the call's fingerprint, for the agreement check;
    * ``send``: the payload slots of this rank's arrival record as an array of
      the message's dtype and shape (``None``: the message does not ride along);
    * ``rows``: the same slots of every rank's record in the arrival table,
      ``(size, *shape)``, and ``parts``: ``rows[0], rows[1], ...``
      (``mine``: a reduce-scatter's block of this rank, in every row);
    * ``duration``: the simulated α-β cost, priced for ``nbytes`` on ``cluster``
      and priced again when either changes (``tracer.cluster = ...``; an
      all-to-all's largest member).
    """

    __slots__ = ("sig", "kind", "priced_as", "wait_name", "h", "half", "send", "rows", "parts",
                 "mine", "cluster", "nbytes", "duration")

    def __init__(self, sig: tuple, h: int, payload: np.ndarray | None, record: np.ndarray,
                 table: np.ndarray) -> None:
        self.sig, self.kind, self.h = sig, sig[0], h
        # an iall_reduce is its own kind of call, but costs what an all-reduce costs
        self.priced_as = "all_reduce" if self.kind == "iall_reduce" else self.kind
        self.wait_name = "wait " + self.priced_as
        self.half = payload is not None and payload.dtype in HALF_DTYPES
        self.send = self.rows = self.parts = self.mine = None
        if payload is not None and payload.nbytes <= INLINE_BYTES:
            shape, dtype = payload.shape, payload.dtype
            self.send = np.ndarray(shape, dtype, record, 8 * _HEAD)
            self.rows = np.ndarray((len(table),) + shape, dtype, table, 8 * _HEAD,
                                   (table.strides[0],) + self.send.strides)
            self.parts = tuple(self.rows)
        self.cluster, self.nbytes, self.duration = None, -1, 0.0


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
        self._peer_links: dict[int, sim.LinkSpec] = {}
        self._peer_links_for = None
        self._record = np.zeros(_RECORD)                 # this rank's arrival record
        # every member's record after the exchange (a group of one: its own)
        self._table = self._record[None] if size == 1 else np.zeros((size, _RECORD))
        self._heads = struct.Struct(_HEAD_READ * size)  # reads every rank's head at once
        self._plans: dict[tuple, _Plan] = {}             # call signature -> _Plan

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
        all-reduce does).  A NaN on any rank is NaN in the result on every rank,
        for max and min too (MPI's MAX/MIN would give rank-dependent answers):
        each rank's NaN flag rides in the arrival exchange, and only when one is
        set does a second reduction mark the NaN positions."""
        x, out, flag = self._reduce_args(x, op, out)
        plan, event, nan = self._begin(("all_reduce", REDUCE_OPS.index(op), x.dtype, x.shape),
                                       x.nbytes, x, flag)
        self._reduce(x, op, out, plan, nan)
        _end(event)
        return out

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
        wall clock the overlap is not real on this machine.  Agreement and NaN
        handling are those of :meth:`all_reduce` (it is a call of its own kind:
        an ``iall_reduce`` on one rank does not match an ``all_reduce`` on
        another)."""
        x, out, flag = self._reduce_args(x, op, out)
        t = self.tracer
        clock = t.clock
        wall0 = time.perf_counter()
        plan = self._plan(("iall_reduce", REDUCE_OPS.index(op), x.dtype, x.shape), x)
        launched = clock.stream_free if clock.stream_free > clock.now else clock.now
        start, nbytes, nan = self._arrive(plan, launched, x.nbytes, flag, x)
        start, end = clock.launch(start, self._duration(plan, nbytes))
        event = t.add("comm", "all_reduce", wall0, wall0, start, end, nbytes, 0.0, self.name,
                      {"size": self.size, "async": True})
        self._reduce(x, op, out, plan, nan)
        _end(event)

        def finish():
            t.wait_until(end, "wait all_reduce")
            return out
        return Request(finish)

    def _reduce_args(self, x: np.ndarray, op: str, out: np.ndarray | None):
        """Checks of an all-reduce's arguments; this rank's NaN flag (max/min)."""
        _check_op(op)
        x = as_message(x)
        out = np.empty_like(x) if out is None else _check_out(out, x.shape, x.dtype, "all_reduce")
        # max/min of a message that moves after the arrival: one pass (np.max
        # propagates NaN); sums propagate NaN by themselves, and so does an inline reduce
        flag = float(op != "sum" and x.nbytes > INLINE_BYTES
                     and (x.dtype.kind == "f" or x.dtype in HALF_DTYPES)
                     and bool(np.isnan(x.max())))
        return x, out, flag

    def _reduce(self, x: np.ndarray, op: str, out: np.ndarray, plan: _Plan, nan: bool
                ) -> np.ndarray:
        """The data of an all-reduce, after the arrival exchange (``nan``: a
        member flagged a NaN)."""
        if plan.rows is not None:           # it rode in the arrival: reduce here
            if plan.half:                              # in float32, rounded once
                np.copyto(out, _UFUNC[op].reduce(plan.rows.astype(np.float32), axis=0),
                          casting="unsafe")
            elif self.size == 2:                       # rank 0's op rank 1's, as reduce does
                _UFUNC[op](plan.parts[0], plan.parts[1], out=out)
            else:
                _UFUNC[op].reduce(plan.rows, axis=0, out=out)
            return out
        if plan.half:                                  # in float32, rounded once
            wide = x.astype(np.float32)
            self._raw_reduce(wide, op, wide, nan)
            np.copyto(out, wide, casting="unsafe")
            return out
        return self._raw_reduce(x, op, out, nan)

    def _raw_reduce(self, x: np.ndarray, op: str, out: np.ndarray, nan: bool) -> np.ndarray:
        """A backend all-reduce; ``nan``: some member flagged a NaN (max/min)."""
        if not nan:
            return self._raw_all_reduce(x, op, out)
        mask = np.isnan(x).astype(np.int32)            # before out (maybe x) is written
        self._raw_all_reduce(x, op, out)
        self._raw_all_reduce(mask, "max", mask)
        out[mask.astype(bool)] = np.nan
        return out

    def all_gather(self, x: np.ndarray, axis: int = 0, out: np.ndarray | None = None
                   ) -> np.ndarray:
        """Concatenate every rank's ``x`` along ``axis`` (rank order), into a fresh
        array or into ``out`` (C-contiguous, the result's shape and dtype)."""
        x = as_message(x)
        axis = _norm_axis(axis, x.ndim or 1)
        shape = x.shape[:axis] + (x.shape[axis] * self.size,) + x.shape[axis + 1:] if x.ndim \
            else (self.size,)
        out = np.empty(shape, x.dtype) if out is None else _check_out(out, shape, x.dtype,
                                                                     "all_gather")
        plan, event, _ = self._begin(("all_gather", axis, x.dtype, x.shape),
                                     x.nbytes * self.size, x)
        # axis 0: the ranks' blocks follow each other in out; else gather, then lay out
        stacked = out.reshape((self.size,) + x.shape) if axis == 0 else \
            np.empty((self.size,) + x.shape, x.dtype)
        if plan.rows is not None:                      # it rode in the arrival
            stacked[...] = plan.rows
        else:
            self._raw_all_gather(x, stacked)
        if axis:
            np.concatenate(list(stacked), axis=axis, out=out)
        _end(event)
        return out

    def reduce_scatter(self, x: np.ndarray, axis: int = 0, out: np.ndarray | None = None
                       ) -> np.ndarray:
        """Sum over the group, then keep this rank's ``1/size`` slice along ``axis``
        (into a fresh array or ``out``)."""
        x = as_message(x)
        axis = _norm_axis(axis, x.ndim or 1)
        if x.shape[axis] % self.size:
            raise ValueError(f"reduce_scatter: dimension {axis} of shape {x.shape} is not "
                             f"divisible by the group size {self.size}")
        shape = x.shape[:axis] + (x.shape[axis] // self.size,) + x.shape[axis + 1:]
        out = np.empty(shape, x.dtype) if out is None else _check_out(out, shape, x.dtype,
                                                                     "reduce_scatter")
        # bring the scattered axis to the front so each rank's block is contiguous
        blocks = np.ascontiguousarray(np.moveaxis(x, axis, 0)) if axis else x
        plan, event, _ = self._begin(("reduce_scatter", axis, x.dtype, x.shape), x.nbytes,
                                     blocks)
        part = out if axis == 0 else np.empty((shape[axis],) + blocks.shape[1:], x.dtype)
        if plan.rows is not None:                      # it rode in the arrival: sum here
            if plan.mine is None:                      # (views made once per plan)
                k = blocks.shape[0] // self.size
                plan.mine = plan.rows[:, self.rank * k:(self.rank + 1) * k]
            if plan.half:                              # in float32, rounded once
                np.copyto(part, np.add.reduce(plan.mine.astype(np.float32), axis=0),
                          casting="unsafe")
            elif self.size == 2:                       # rank 0's + rank 1's, as reduce does
                np.add(plan.mine[0], plan.mine[1], out=part)
            else:
                np.add.reduce(plan.mine, axis=0, out=part)
        elif plan.half:                                # in float32, rounded once
            wide = np.empty(part.shape, np.float32)
            self._raw_reduce_scatter(blocks.astype(np.float32), wide)
            np.copyto(part, wide, casting="unsafe")
        else:
            self._raw_reduce_scatter(blocks, part)
        if axis:
            np.copyto(out, np.moveaxis(part, 0, axis))
        _end(event)
        return out

    def broadcast(self, x: np.ndarray, root: int = 0, out: np.ndarray | None = None
                  ) -> np.ndarray:
        """Every rank gets ``root``'s array (all ranks pass an array of that shape),
        in a fresh array or in ``out`` (``out=x``: in place, as ``MPI_Bcast``)."""
        self._check_rank(root, "root")
        x = as_message(x)
        out = np.empty_like(x) if out is None else _check_out(out, x.shape, x.dtype, "broadcast")
        plan, event, _ = self._begin(("broadcast", root, x.dtype, x.shape), x.nbytes, x)
        if plan.rows is not None:                      # it rode in the arrival
            np.copyto(out, plan.parts[root])
        else:
            self._raw_broadcast(x, root, out)
        _end(event)
        return out

    def barrier(self) -> None:
        """Every member has arrived (the arrival exchange is the barrier)."""
        _end(self._begin(("barrier", 0, None, ()), 0)[1])

    def all_to_all(self, x: np.ndarray, send_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Uneven all-to-all along axis 0: rows ``[sum(c[:i]), sum(c[:i+1]))`` of ``x``
        go to rank ``i``.  Returns the received rows (in source-rank order) and
        the number received from each rank.  The counts ride in the arrival
        exchange; the rows follow in one call.  Members must agree on the dtype
        and on every dimension but the first."""
        x = as_message(x)
        counts = np.asarray(send_counts, dtype=np.int64)
        c = counts.tolist()                              # p numbers: plain Python is faster
        if counts.shape != (self.size,) or min(c) < 0:
            raise ValueError(f"all_to_all: send_counts must be {self.size} non-negative "
                             f"integers, got {list(send_counts)}")
        if x.ndim == 0 or sum(c) != x.shape[0]:
            raise ValueError(f"all_to_all: send_counts sum to {sum(c)} but x has "
                             f"shape {x.shape}")
        # n = the bytes one rank holds; members may differ, the collective lasts for the largest
        plan, event, _ = self._begin(("all_to_all", 0, x.dtype, (-1,) + x.shape[1:]), x.nbytes,
                                     counts)
        recv_counts = (plan.rows[:, self.rank].copy() if plan.rows is not None
                       else self._raw_all_to_all_counts(counts))
        received = self._raw_all_to_all(x, counts, recv_counts)
        _end(event)
        return received, recv_counts

    # ====================================================== point-to-point
    def send(self, x: np.ndarray, dst: int, tag: int = 0) -> None:
        self.isend(x, dst, tag).wait()

    def recv(self, shape: Sequence[int], dtype, src: int, tag: int = 0) -> np.ndarray:
        return self.irecv(shape, dtype, src, tag).wait()

    def isend(self, x: np.ndarray, dst: int, tag: int = 0) -> Request:
        """Non-blocking send.  The sender's simulated time travels with the message
        (an envelope also carrying dtype and shape, checked by the receiver)."""
        self._check_rank(dst, "dst")
        self._check_tag(tag)
        x = as_message(x)
        now = self.tracer.clock.now
        env = np.zeros(_ENVELOPE_LEN)                  # [send time, dtype code, ndim, dims...]
        _ENVELOPE_HEAD[x.ndim].pack_into(env, 0, now, _DTYPE_CODE[x.dtype], x.ndim, *x.shape)
        wall0 = time.perf_counter()
        h_env = self._raw_isend(env, dst, tag, True)
        h_data = self._raw_isend(x, dst, tag, False)

        def finish():
            self._raw_wait(h_env)
            self._raw_wait(h_data)
            self.tracer.add("comm", "send", wall0, time.perf_counter(), now, now, x.nbytes, 0.0,
                            self.name, {"dst": dst, "tag": tag})
        return Request(finish)

    def irecv(self, shape: Sequence[int], dtype, src: int, tag: int = 0) -> Request:
        """Non-blocking receive into a fresh array (never a reused buffer)."""
        self._check_rank(src, "src")
        self._check_tag(tag)
        try:
            shape = tuple(map(int, shape))
        except TypeError:
            raise TypeError(f"recv: shape must be a sequence of integers, got {shape!r}") from None
        if shape and min(shape) < 0:
            raise ValueError(f"recv: negative dimension in shape {shape}")
        dtype = np.dtype(dtype)
        if dtype not in _DTYPE_CODE:
            raise TypeError(f"unsupported dtype {dtype}")
        buf = np.empty(shape, dtype)
        env = np.empty(_ENVELOPE_LEN)
        h_env = self._raw_irecv(env, src, tag, True)
        h_data = self._raw_irecv(buf, src, tag, False)

        def finish():
            wall0 = time.perf_counter()
            self._raw_wait(h_env)
            sent_at, code, ndim, *dims = _ENVELOPE.unpack_from(env)
            got_dtype, got_shape = DTYPES[int(code)], tuple(map(int, dims[:int(ndim)]))
            if got_shape != shape or got_dtype != dtype:
                raise ValueError(f"{self.name} rank {self.rank}: recv from rank {src} (tag {tag}) "
                                 f"expected {shape} {dtype}, but the sender sent {got_shape} "
                                 f"{got_dtype}")
            self._raw_wait(h_data)
            t = self.tracer
            arrival = t.clock.arrival(sent_at, buf.nbytes, self._link_to(src))
            t.wait_until(sent_at, "wait recv")         # idle: not sent before sent_at
            start = t.clock.now
            t.clock.idle_until(arrival)                # in transfer (a comm event)
            t.add("comm", "recv", wall0, time.perf_counter(), start, t.clock.now, buf.nbytes,
                  0.0, self.name, {"src": src, "tag": tag})
            return buf
        return Request(finish)

    # =========================================================== groups
    def split(self, color: int, key: int = 0, name: str | None = None) -> "Comm":
        """Sub-communicator of the ranks passing the same ``color``, ordered by
        ``(key, rank)``.  Every rank of this group must call it."""
        pair = np.array([color, key], dtype=np.int64)
        plan = self._plan(("split", 0, None, ()), pair)
        self._arrive(plan, 0.0, 0, 0.0, pair)
        table = plan.rows.tolist()                     # every rank's (color, key)
        members = sorted((k, r) for r, (c, k) in enumerate(table) if c == color)
        ranks = [r for _, r in members]
        new_rank = ranks.index(self.rank)
        world_ranks = [self.world_ranks[r] for r in ranks]
        return self._raw_split(color, key, new_rank, world_ranks,
                               name or f"{self.name}/{color}")

    def gather_objects(self, obj) -> list:
        """Every rank's Python object, on every rank.  Cold path only (pickles
        under MPI): traces and results at the end of a run."""
        self._arrive(self._plan(("gather_objects", 0, None, ())), 0.0, 0)
        return self._raw_gather_objects(obj)

    def _gather_results(self, obj) -> list:
        """``gather_objects`` at the end of ``run``: a rank meeting it while
        others are still in a collective is reported as finished."""
        self._arrive(self._plan(("gather_objects", 1, None, ())), 0.0, 0)
        return self._raw_gather_objects(obj)

    def agree(self, what: str, value: Any) -> Any:
        """Check that every rank of this group passed an equal ``value``; return it.

        For what a parallel entry point needs equal on every member before its
        first message: a configuration, a schedule, a layer split, a
        micro-batch count, shapes and dtypes, top-k.  ``value`` should be small
        and have a faithful ``repr`` (tuples, ints, strings, dataclasses;
        NumPy arrays are compared by shape, dtype and bytes).  One tiny
        exchange of a 52-bit fingerprint, always on; if the ranks differ,
        every rank raises the same ``ValueError`` naming ``what`` and each
        rank's value (a second exchange, only then).  Every member must call
        it, at the same point: a rank in ``agree`` while another is in a
        collective is reported as a disagreement too.  It does not move the
        simulated clock or appear in the trace.

            comm.agree("pipeline schedule", (name, n_micro, tuple(split)))
        """
        if isinstance(value, np.ndarray):
            digest = hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=8)
            text = f"ndarray {value.shape} {value.dtype} {digest.hexdigest()}"
            shown = f"{np.array2string(value, threshold=12)} ({value.shape} {value.dtype}, " \
                    f"checksum {digest.hexdigest()[:8]})"
        else:
            text = shown = repr(value)
        sig = ("agree", str(what), text, shown)         # values vary: not remembered
        self._arrive(_Plan(sig, self._fingerprint(sig), None, self._record, self._table), 0.0, 0)
        return value

    # ============================================================= helpers
    def _check_rank(self, r: int, what: str) -> None:
        if type(r) is int and 0 <= r < self.size:      # the common case, first
            return
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < self.size:
            raise ValueError(f"{what}={r!r} is not a rank of {self.name} (size {self.size})")

    @staticmethod
    def _check_tag(tag: int) -> None:
        if type(tag) is int and 0 <= tag <= MAX_TAG:   # the common case, first
            return
        if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) \
                or not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag={tag!r} must be an integer in [0, {MAX_TAG}] "
                             "(the range every MPI guarantees)")

    def _link_to(self, peer: int) -> sim.LinkSpec:
        """The link to ``peer`` (looked up once per peer and cluster)."""
        cluster = self.tracer.clock.cluster
        if self._peer_links_for is not cluster:
            self._peer_links, self._peer_links_for = {}, cluster
        link = self._peer_links.get(peer)
        if link is None:
            link = self._peer_links[peer] = cluster.link((self.world_ranks[self.rank],
                                                          self.world_ranks[peer]))
        return link

    @staticmethod
    def _fingerprint(sig: tuple) -> int:
        """52-bit fingerprint of a call signature ``(kind, arg, dtype, shape)``.
        ``hash`` of a tuple of ints is the same in every process; strings
        (``agree``) go through blake2b instead."""
        kind = sig[0]
        if kind == "agree":
            return _fingerprint_text(f"agree\0{sig[1]}\0{sig[2]}")
        return hash((_KIND_CODE[kind], sig[1], _DTYPE_CODE.get(sig[2], -1), sig[3])) & _FP_MASK

    @staticmethod
    def _describe(sig: tuple) -> str:
        """A call signature in words, for the disagreement message."""
        kind, arg, dtype, shape = sig
        if kind == "agree":
            return f"agree on {arg!r}: {shape}"
        if kind == "gather_objects" and arg == 1:
            return "finished (fn returned; run gathers the results)"
        if kind in ("barrier", "split", "gather_objects"):
            return kind
        if kind == "all_to_all":
            return f"all_to_all {dtype} (*{''.join(f', {d}' for d in shape[1:])})"
        label = {"all_reduce": "op", "iall_reduce": "op", "broadcast": "root"}.get(kind, "axis")
        value = REDUCE_OPS[arg] if label == "op" else arg
        return f"{kind} {label}={value} {dtype} {tuple(shape)}"

    def _plan(self, sig: tuple, payload: np.ndarray | None = None) -> _Plan:
        """The :class:`_Plan` of a call signature ``(kind, arg, dtype, shape)``:
        made at its first call (``payload``: the message that may ride along),
        then looked up.  At most ``_MAX_PLANS`` are kept (forgotten all at once)."""
        plan = self._plans.get(sig)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[sig] = _Plan(sig, self._fingerprint(sig), payload,
                                            self._record, self._table)
        return plan

    def _duration(self, plan: _Plan, nbytes: int) -> float:
        """The simulated α-β cost of ``plan``'s collective moving ``nbytes``,
        priced once per cluster and size (the cluster may change between calls)."""
        cluster = self.tracer.clock.cluster
        if plan.cluster is not cluster or plan.nbytes != nbytes:
            plan.cluster, plan.nbytes = cluster, nbytes
            plan.duration = sim.collective_time(plan.priced_as, nbytes, self.size, self.link)
        return plan.duration

    def _arrive(self, plan: _Plan, now: float, nbytes: int, flag: float = 0.0,
                payload: np.ndarray | None = None) -> tuple[float, int, bool]:
        """The arrival exchange (module docstring): every rank's record
        ``[now, nbytes, flag, h, -h | payload]``, all-gathered.  ``payload``
        rides along if ``plan`` says so (at most ``INLINE_BYTES``; every rank's
        copy is then in ``plan.rows``).  Returns when the collective starts (the
        latest member's ``now``), the largest member's bytes and whether a
        member flagged a NaN.  If the fingerprints ``h`` differ, every rank
        raises the same ValueError."""
        h = plan.h
        _HEAD_STRUCT.pack_into(self._record, 0, now, nbytes, flag, h, -h)
        if plan.send is not None:
            plan.send[...] = payload                   # the message rides along
        if self.size == 1:                             # a group of one: nothing to exchange
            return now, nbytes, False
        self._raw_arrive(self._record, self._table, plan.sig)
        heads = self._heads.unpack_from(self._table)   # time, bytes, flag, h of rank 0, 1, ...
        if self.size == 2:                             # the common pair: compare, no loops
            t0, n0, f0, h0, t1, n1, f1, h1 = heads
            if h0 != h1:
                self._disagree(plan.sig)
            return (t1 if t1 > t0 else t0), int(n1 if n1 > n0 else n0), f0 + f1 > 0
        if heads[3::4].count(h) != self.size:
            self._disagree(plan.sig)
        return max(heads[0::4]), int(max(heads[1::4])), any(heads[2::4])

    def _disagree(self, sig: tuple) -> None:
        """Cold path: every rank's call in words, then the same error everywhere."""
        mine = (sig[0], sig[1] if sig[0] == "agree" else None, self._describe(sig))
        table = self._raw_gather_objects(mine)
        if all(k == "agree" and w == mine[1] for k, w, _ in table):
            raise ValueError(f"ranks of {self.name} disagree on {mine[1]}: "
                             + _group_ranks([d.split(": ", 1)[1] for _, _, d in table]))
        raise ValueError(f"ranks of {self.name} disagree in a collective call: "
                         + _group_ranks([d for _, _, d in table]))

    def _begin(self, sig: tuple, nbytes: int, payload: np.ndarray | None = None,
               flag: float = 0.0) -> tuple[_Plan, Any, bool]:
        """The start of a collective (DESIGN.md §4), before its data moves.

        The arrival exchange first (see the module docstring): the collective
        starts at the latest member's time, lasts its largest member's α-β
        cost, and goes on only if every member makes the same call.  Backends
        wait politely there, so a message too large to ride along moves with
        everyone present.  Returns the call's :class:`_Plan` (``plan.rows``:
        every rank's message, if it rode along), its trace event (closed by
        :func:`_end` once the data has moved) and whether a member flagged a NaN."""
        plan = self._plan(sig, payload)
        t = self.tracer
        clock = t.clock
        wall0 = time.perf_counter()
        start, nbytes, nan = self._arrive(plan, clock.now, nbytes, flag, payload)
        if start > clock.now:
            t.wait_until(start, plan.wait_name)
        # bookkeeping before the data moves: Python right after a large
        # transfer runs with cold caches (~10x slower on this machine)
        start, end = clock.collective(start, self._duration(plan, nbytes))
        event = t.add("comm", plan.kind, wall0, wall0, start, end, nbytes, 0.0, self.name,
                      {"size": self.size})
        return plan, event, nan

    # ============================================== backend primitives
    def _raw_arrive(self, record: np.ndarray, table: np.ndarray, sig: tuple) -> None:
        """All-gather every member's arrival ``record`` (``_RECORD`` float64)
        into ``table``, shape ``(size, _RECORD)``.  Every member must arrive
        before a collective's data moves; backends wait here politely (``sig``,
        the call, names what this rank waits in if it never ends)."""
        raise NotImplementedError

    def _raw_all_reduce(self, x: np.ndarray, op: str, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_all_gather(self, x: np.ndarray, out: np.ndarray) -> None:
        """Every rank's ``x`` into ``out``, shape ``(size, *x.shape)``."""
        raise NotImplementedError

    def _raw_reduce_scatter(self, x: np.ndarray, out: np.ndarray) -> None:
        """Sum, then rows ``[rank*n/size, (rank+1)*n/size)`` of axis 0 into ``out``."""
        raise NotImplementedError

    def _raw_broadcast(self, x: np.ndarray, root: int, out: np.ndarray) -> None:
        """``root``'s ``x`` into every rank's ``out`` (``out`` may be ``x``)."""
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
