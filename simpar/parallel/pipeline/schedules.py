"""Pipeline schedules as plain data (DESIGN.md §5).

A schedule says, for every rank of the pipeline, which actions it performs and in
which order.  Nothing here runs a model, and this module imports nothing of the
package: a schedule can be proved deadlock-free, timed and printed as a step ×
rank grid (:mod:`.validate`: ``validate``, ``simulate``, ``format_schedule``)
before the executor (:mod:`.executor`) ever runs it.

Stages and ranks.  The model is cut into ``n_stages = p · v`` stages; stage ``s``
lives on rank ``s % p`` as its model *chunk* ``s // p`` (Narayanan et al. 2021,
§2.2.2: with ``v = 1`` rank ``r`` holds stage ``r``; with ``v > 1`` rank ``r``
holds stages ``r, r + p, r + 2p, …``).

Actions (``Action(kind, mb, stage)``), printed ``"0F1"`` = stage 0, forward,
micro-batch 1:

=========  ==================================================================
``F``      forward of micro-batch ``mb`` through stage ``stage``
``B``      full backward (input and weight gradients)
``I``      backward for the input gradient only (zero-bubble "B")
``W``      the deferred weight gradient of an earlier ``I`` (zero-bubble "W")
``SEND_F`` send the output of ``F(mb, stage)`` to the rank of ``stage + 1``
``RECV_F`` receive the input of ``F(mb, stage)`` from the rank of ``stage − 1``
``SEND_B`` send the input gradient of ``B/I(mb, stage)`` to ``stage − 1``
``RECV_B`` receive the output gradient for ``B/I(mb, stage)`` from ``stage + 1``
=========  ==================================================================

Sends are *posted* (non-blocking, like ``isend``: the sender goes on at once and
the message waits for its receiver); receives *block* until their message is
there.  Between two stages on the same rank (``p = 1`` interleaved) no message is
needed: the data stays in memory.

Generators: :func:`naive`, :func:`gpipe`, :func:`one_f_one_b`,
:func:`interleaved_one_f_one_b`, :func:`zero_bubble_h1`; :data:`SCHEDULES`
maps their names to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COMPUTE = ("F", "B", "I", "W")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
KINDS = COMPUTE + COMM


@dataclass(frozen=True)
class Action:
    """One step of one rank: ``kind`` (see the module table) of micro-batch ``mb``
    on stage ``stage``."""

    kind: str
    mb: int
    stage: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; choose one of {KINDS}")

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    def __str__(self) -> str:
        """``"0F1"``: stage, kind, micro-batch (``"0SEND_F1"`` for messages)."""
        return f"{self.stage}{self.kind}{self.mb}"


def F(mb: int, stage: int) -> Action:
    return Action("F", mb, stage)


def B(mb: int, stage: int) -> Action:
    return Action("B", mb, stage)


def I(mb: int, stage: int) -> Action:  # noqa: E743 - the zero-bubble paper's name
    return Action("I", mb, stage)


def W(mb: int, stage: int) -> Action:
    return Action("W", mb, stage)


@dataclass
class Schedule:
    """Per-rank action lists of one training step.

    ``p`` ranks, ``m`` micro-batches, ``v`` model chunks per rank; ``actions[r]`` is
    rank ``r``'s ordered list.
    """

    name: str
    p: int
    m: int
    v: int
    actions: list[list[Action]] = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    def rank_of(self, stage: int) -> int:
        """The rank holding ``stage`` (stage ``s`` is chunk ``s // p`` of rank ``s % p``)."""
        return stage % self.p

    def stages_of(self, rank: int) -> list[int]:
        """The stages rank ``rank`` holds, chunk 0 first."""
        return [rank + c * self.p for c in range(self.v)]

    def uses_split_backward(self) -> bool:
        """True if the backward is split into ``I`` and ``W`` (zero-bubble)."""
        return any(a.kind in ("I", "W") for acts in self.actions for a in acts)

    def compute(self, rank: int) -> list[Action]:
        """Rank ``rank``'s compute actions only."""
        return [a for a in self.actions[rank] if a.is_compute]

    def __str__(self) -> str:
        """Each rank's action list, one line per rank (the timed step × rank grid
        is :func:`.validate.format_schedule`)."""
        head = f"{self.name}: p={self.p} m={self.m}" + (f" v={self.v}" if self.v > 1 else "")
        return "\n".join([head] + [f"r{r}: " + " ".join(map(str, acts))
                                   for r, acts in enumerate(self.actions)])


# ------------------------------------------------------------------ checks
def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_args(p: int, m: int, v: int = 1) -> None:
    """``p``, ``m``, ``v`` positive integers (``ValueError`` naming the bad one)."""
    _check_int("p (pipeline ranks)", p)
    _check_int("m (micro-batches)", m)
    _check_int("v (model chunks per rank)", v)


def with_messages(name: str, p: int, m: int, v: int, order: list[list[Action]]) -> Schedule:
    """Turn per-rank compute orders into a full schedule: a ``RECV`` right before
    each compute that needs data from another rank, a ``SEND`` right after each
    compute whose result another rank needs."""
    n = p * v
    out: list[list[Action]] = []
    for rank, compute in enumerate(order):
        acts: list[Action] = []
        for a in compute:
            s, mb = a.stage, a.mb
            if a.kind == "F" and s > 0 and (s - 1) % p != rank:
                acts.append(Action("RECV_F", mb, s))
            if a.kind in ("B", "I") and s < n - 1 and (s + 1) % p != rank:
                acts.append(Action("RECV_B", mb, s))
            acts.append(a)
            if a.kind == "F" and s < n - 1 and (s + 1) % p != rank:
                acts.append(Action("SEND_F", mb, s))
            if a.kind in ("B", "I") and s > 0 and (s - 1) % p != rank:
                acts.append(Action("SEND_B", mb, s))
        out.append(acts)
    return Schedule(name, p, m, v, out)


# -------------------------------------------------------------- generators
def naive(p: int, m: int = 1) -> Schedule:
    """Naive model parallelism: one micro-batch at a time runs forward through every
    stage, then backward; only one rank is ever busy (bubble ``(p−1)/p`` of the
    step).  With ``m = 1`` this is the whole batch without micro-batching; with
    ``m > 1``, gradient accumulation over micro-batches, still without overlap."""
    check_args(p, m)
    order = [[] for _ in range(p)]
    for mb in range(m):
        for s in range(p):
            order[s].append(F(mb, s))
        for s in reversed(range(p)):
            order[s].append(B(mb, s))
    # naive forbids overlap: every rank waits for the whole previous micro-batch,
    # which the data dependencies already enforce on rank 0 (it needs mb's backward
    # before mb + 1's forward); the other ranks simply follow.
    return with_messages("naive", p, m, 1, order)


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): all ``m`` forwards, then all ``m`` backwards.
    Bubble ``(p−1)/m`` of the ideal compute time; each rank holds the activations
    of all ``m`` micro-batches at the peak."""
    check_args(p, m)
    order = [[F(mb, r) for mb in range(m)] + [B(mb, r) for mb in range(m)]
             for r in range(p)]
    return with_messages("gpipe", p, m, 1, order)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B, PipeDream-flush (Narayanan et al. 2021, §2.2.1): rank ``r`` runs
    ``p − r − 1`` warm-up forwards, then alternates one forward and one backward,
    then drains the remaining backwards.  Same bubble as GPipe, but at most
    ``p − r`` micro-batches in flight on rank ``r``."""
    check_args(p, m)
    order = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        acts = [F(mb, r) for mb in range(warmup)]
        for i in range(m - warmup):                 # steady state: 1F, 1B
            acts += [F(warmup + i, r), B(i, r)]
        acts += [B(mb, r) for mb in range(m - warmup, m)]   # cool-down
        order.append(acts)
    return with_messages("1f1b", p, m, 1, order)


def interleaved_order(p: int, m: int, v: int, k: int, forward: bool) -> tuple[int, int]:
    """The ``k``-th (micro-batch, chunk) of a rank in the interleaved schedule:
    micro-batches go in groups of ``p`` through chunk 0, then chunk 1, …; the
    backward visits the chunks in reverse."""
    group, within = divmod(k, p * v)
    chunk = within // p
    return group * p + within % p, (chunk if forward else v - 1 - chunk)


def interleaved_one_f_one_b(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, §2.2.2): each rank holds ``v``
    model chunks, so a micro-batch visits every rank ``v`` times and the bubble
    shrinks to ``(p−1)/(v·m)``, at the price of ``v`` times more messages.

    Requires ``m`` a multiple of ``p`` (micro-batches go through the chunks in
    groups of ``p``).  Rank ``r`` warms up with ``2(p − r − 1) + (v − 1)p``
    forwards (capped at ``m·v``), then alternates forward and backward."""
    check_args(p, m, v)
    if m % p:
        raise ValueError(f"interleaved 1F1B needs the number of micro-batches m={m} to be "
                         f"a multiple of the pipeline size p={p}")
    total = m * v
    order = []
    for r in range(p):
        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)

        def fwd(k: int) -> Action:
            mb, c = interleaved_order(p, m, v, k, True)
            return F(mb, c * p + r)

        def bwd(k: int) -> Action:
            mb, c = interleaved_order(p, m, v, k, False)
            return B(mb, c * p + r)

        acts = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            acts += [fwd(warmup + i), bwd(i)]
        acts += [bwd(k) for k in range(total - warmup, total)]
        order.append(acts)
    return with_messages("interleaved", p, m, v, order)


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, §3.1): 1F1B with the backward split into ``I``
    (input gradient, on the critical path) and ``W`` (weight gradient, needed only
    by the optimizer).  Rank ``r`` postpones up to ``r`` weight gradients, so the
    input gradients race back up the pipeline and the postponed ``W`` fill the
    bubbles.  Rank ``r`` then holds at most ``p`` micro-batches (``p − r`` whole,
    the rest only what ``W`` needs): the 1F1B peak of rank 0.  Bubble
    ``(p−1)(T_F + T_I − T_W)`` against 1F1B's ``(p−1)(T_F + T_I + T_W)``
    (Table 2 of the paper, whose ``T_B`` is our ``T_I``)."""
    check_args(p, m)
    order = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        acts = [F(mb, r) for mb in range(warmup)]
        next_w = 0

        def backward(mb: int) -> None:
            nonlocal next_w
            acts.append(I(mb, r))
            while (mb + 1) - next_w > r:        # more than r weight grads pending
                acts.append(W(next_w, r))
                next_w += 1

        for i in range(m - warmup):
            acts.append(F(warmup + i, r))
            backward(i)
        for mb in range(m - warmup, m):
            backward(mb)
        acts += [W(mb, r) for mb in range(next_w, m)]
        order.append(acts)
    return with_messages("zb-h1", p, m, 1, order)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_one_f_one_b,
    "zb-h1": zero_bubble_h1,
}


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """A schedule by name (``naive``, ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``).
    ``v`` is used by ``interleaved`` only and must be 1 for the others."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if name == "interleaved":
        return interleaved_one_f_one_b(p, m, v)
    check_args(p, m, v)
    if v != 1:
        raise ValueError(f"schedule {name!r} has one model chunk per rank; got v={v}")
    return SCHEDULES[name](p, m)
