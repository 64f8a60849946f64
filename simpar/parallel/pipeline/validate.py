"""Prove a schedule deadlock-free and causally correct, and time it, without a model.

:func:`simulate` plays every rank's action list at once, the way the executor and
:class:`simpar.comm.Comm` will: a ``SEND`` is posted and the sender goes on; a
``RECV`` blocks until its message has been posted; a compute action may only use
what already exists.  Each action gets a start and end time from ``durations``
and a transfer time per message, with the rules of the simulated clock
(DESIGN.md §4): a message posted at ``t`` arrives at ``t + transfer``, the
receiver continues at ``max(own time, arrival)``.  So ``simulate`` with the
durations a real run measured predicts that run's simulated clock exactly.

It raises :class:`ScheduleError` (a ``ValueError``) naming the rank, the
position and the action when a schedule

* **deadlocks** — no rank can move while some still have actions (every stuck
  rank's waiting action is listed);
* breaks **causality** — a forward before its input exists, a backward before
  its forward or before its output gradient, a ``W`` before its ``I``, a send of
  something not computed yet, an action for a stage the rank does not hold;
* leaves a **message** unmatched — a send nobody receives, a receive of a
  message sent twice, a send to a rank's own stage;
* computes something twice or not at all — every ``(micro-batch, stage)`` needs
  exactly one ``F`` and either one ``B`` or one ``I`` and one ``W``; so every
  micro-batch's loss (the ``F`` of the last stage) is computed exactly once.

``sends="blocking"`` checks the stricter model where a send also waits until
the receiver reaches the matching receive (rendezvous, like a large MPI ``Send``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .schedules import UNIT_TIMES, Action, Schedule


class ScheduleError(ValueError):
    """A schedule that would hang or compute something wrong."""


@dataclass
class Record:
    """One executed action of :func:`simulate`."""

    rank: int
    index: int            # position in the rank's list
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    """What :func:`simulate` found: every action's times and per-rank summaries."""

    schedule: Schedule
    records: list[Record]
    makespan: float
    busy: list[float]                  # compute time per rank
    peak_in_flight: list[int]          # micro-batches with F done and B/W not yet, max
    messages: int
    extra: dict = field(default_factory=dict)

    @property
    def bubble(self) -> list[float]:
        """Idle time of each rank within the step: ``makespan − busy``."""
        return [self.makespan - b for b in self.busy]

    def bubble_fraction(self) -> float:
        """Idle share of the step, over all ranks: ``Σ bubble / (p · makespan)``."""
        p = self.schedule.p
        return sum(self.bubble) / (p * self.makespan) if self.makespan > 0 else 0.0


Durations = Mapping[str, float] | Callable[[int, Action], float]


def _duration(durations: Durations, rank: int, a: Action) -> float:
    if callable(durations):
        return float(durations(rank, a))
    if a.kind not in durations:
        raise ValueError(f"no duration given for action kind {a.kind!r}")
    return float(durations[a.kind])


def _check_structure(sch: Schedule) -> None:
    """Every action on a stage its rank holds; every (mb, stage) computed exactly once."""
    p, m, n = sch.p, sch.m, sch.n_stages
    if len(sch.actions) != p:
        raise ScheduleError(f"{sch.name}: {len(sch.actions)} action lists for p={p} ranks")
    counts: dict = {}
    for r, acts in enumerate(sch.actions):
        for i, a in enumerate(acts):
            if not isinstance(a, Action):
                raise ScheduleError(f"{sch.name}: rank {r} item {i} is not an Action: {a!r}")
            if not 0 <= a.mb < m:
                raise ScheduleError(f"{sch.name}: rank {r} action {i} {a}: micro-batch "
                                    f"{a.mb} outside [0, {m})")
            if not 0 <= a.stage < n:
                raise ScheduleError(f"{sch.name}: rank {r} action {i} {a}: stage {a.stage} "
                                    f"outside [0, {n})")
            if sch.rank_of(a.stage) != r:
                raise ScheduleError(f"{sch.name}: rank {r} action {i} {a}: stage {a.stage} "
                                    f"lives on rank {sch.rank_of(a.stage)}")
            if a.is_compute:
                key = (a.kind, a.mb, a.stage)
                counts[key] = counts.get(key, 0) + 1
    for mb in range(m):
        for s in range(n):
            nf, nb = counts.get(("F", mb, s), 0), counts.get(("B", mb, s), 0)
            ni, nw = counts.get(("I", mb, s), 0), counts.get(("W", mb, s), 0)
            where = f"{sch.name}: micro-batch {mb} on stage {s}"
            if nf != 1:
                what = "loss computed" if s == n - 1 else "forward run"
                raise ScheduleError(f"{where}: {what} {nf} times (must be exactly once)")
            if not ((nb == 1 and ni == nw == 0) or (nb == 0 and ni == nw == 1)):
                raise ScheduleError(f"{where}: backward actions B={nb} I={ni} W={nw}; "
                                    f"need exactly one B, or one I and one W")


def simulate(schedule: Schedule, durations: Durations | None = None,
             transfer: float | Callable[[Action], float] = 0.0,
             sends: str = "nonblocking") -> SimResult:
    """Play ``schedule``; raise :class:`ScheduleError` if it is wrong, else time it.

    ``durations``: seconds per compute kind (``{"F": 1, "B": 2, "I": 1, "W": 1}``
    by default) or a function ``(rank, action) -> seconds``.  ``transfer``: the
    time of one message (or a function of its ``SEND`` action).  ``sends``:
    ``"nonblocking"`` (posted, the executor's model) or ``"blocking"``.
    """
    if sends not in ("nonblocking", "blocking"):
        raise ValueError(f"sends must be 'nonblocking' or 'blocking', got {sends!r}")
    durations = UNIT_TIMES if durations is None else durations
    _check_structure(schedule)
    sch, p, n = schedule, schedule.p, schedule.n_stages
    pc = [0] * p                        # next action of each rank
    clock = [0.0] * p
    done: dict = {}                     # (kind, mb, stage) -> end time (compute)
    posted: dict = {}                   # message id -> arrival time, until received
    received: set = set()
    in_flight = [0] * p
    peak = [0] * p
    busy = [0.0] * p
    records: list[Record] = []

    def msg_of(a: Action):
        """The message a comm action carries: (direction, micro-batch, receiving stage)."""
        if a.kind == "SEND_F":
            return ("F", a.mb, a.stage + 1)
        if a.kind == "RECV_F":
            return ("F", a.mb, a.stage)
        if a.kind == "SEND_B":
            return ("B", a.mb, a.stage - 1)
        return ("B", a.mb, a.stage)

    def backward_done(mb: int, s: int):
        return done.get(("B", mb, s), done.get(("I", mb, s)))

    def fail(r: int, why: str) -> None:
        a = sch.actions[r][pc[r]]
        raise ScheduleError(f"{sch.name}: rank {r} action {pc[r]} ({a}): {why}")

    def try_step(r: int) -> bool:
        """Execute rank r's next action if it can; False if it must wait."""
        a = sch.actions[r][pc[r]]
        k, mb, s = a.kind, a.mb, a.stage
        start = clock[r]
        if k == "F":
            if s > 0:
                if sch.rank_of(s - 1) == r:
                    if ("F", mb, s - 1) not in done:
                        fail(r, f"input of stage {s} not computed yet (F{mb} of stage {s - 1} "
                                f"on this rank comes later)")
                    start = max(start, done[("F", mb, s - 1)])
                elif ("F", mb, s) not in received:
                    fail(r, "forward input was not received (no RECV_F before it)")
        elif k in ("B", "I"):
            if ("F", mb, s) not in done:
                fail(r, "backward before its forward")
            if s < n - 1:
                if sch.rank_of(s + 1) == r:
                    t = backward_done(mb, s + 1)
                    if t is None:
                        fail(r, f"output gradient not computed yet (backward of stage {s + 1} "
                                f"on this rank comes later)")
                    start = max(start, t)
                elif ("B", mb, s) not in received:
                    fail(r, "output gradient was not received (no RECV_B before it)")
        elif k == "W":
            if ("I", mb, s) not in done:
                fail(r, "weight gradient before its input gradient (W before I)")
        elif k in ("SEND_F", "SEND_B"):
            dst_stage = s + 1 if k == "SEND_F" else s - 1
            if not 0 <= dst_stage < n:
                fail(r, f"no stage {dst_stage} to send to")
            if sch.rank_of(dst_stage) == r:
                fail(r, f"send to stage {dst_stage} on the same rank (no message needed)")
            if k == "SEND_F" and ("F", mb, s) not in done:
                fail(r, "sends an activation not computed yet")
            if k == "SEND_B" and backward_done(mb, s) is None:
                fail(r, "sends a gradient not computed yet")
            msg = msg_of(a)
            if msg in posted or msg in received:
                fail(r, "message sent twice")
            if sends == "blocking":
                if not _receiver_waiting(msg):
                    return False                          # rendezvous: wait for the receiver
                clock[r] = max(clock[r], clock[sch.rank_of(msg[2])])
                start = clock[r]
            t_transfer = transfer(a) if callable(transfer) else float(transfer)
            posted[msg] = clock[r] + t_transfer
        else:                                             # RECV_F / RECV_B
            src_stage = s - 1 if k == "RECV_F" else s + 1
            if not 0 <= src_stage < n:
                fail(r, f"no stage {src_stage} to receive from")
            if sch.rank_of(src_stage) == r:
                fail(r, f"receive from stage {src_stage} on the same rank")
            msg = msg_of(a)
            if msg in received:
                fail(r, "message received twice")
            if msg not in posted:
                return False                              # blocked: wait for the sender
            clock[r] = max(clock[r], posted.pop(msg))
            received.add(msg)
        if a.is_compute:
            key = (k, mb, s)
            if key in done:
                fail(r, "computed twice")
            dur = _duration(durations, r, a)
            clock[r] = start + dur
            busy[r] += dur
            done[key] = clock[r]
            if k == "F":
                in_flight[r] += 1
                peak[r] = max(peak[r], in_flight[r])
            elif k in ("B", "W"):
                in_flight[r] -= 1
        records.append(Record(r, pc[r], a, start, clock[r]))
        pc[r] += 1
        return True

    def _receiver_waiting(msg) -> bool:
        """Rendezvous: is the receiving rank at the matching RECV right now?"""
        _, mb, stage = msg
        dst = sch.rank_of(stage)
        if pc[dst] >= len(sch.actions[dst]):
            return False
        b = sch.actions[dst][pc[dst]]
        return b.kind.startswith("RECV") and msg_of(b) == msg

    while True:
        moved = False
        for r in range(p):
            while pc[r] < len(sch.actions[r]) and try_step(r):
                moved = True
        if all(pc[r] == len(sch.actions[r]) for r in range(p)):
            break
        if not moved:
            stuck = "; ".join(f"rank {r} waits at action {pc[r]} ({sch.actions[r][pc[r]]})"
                              for r in range(p) if pc[r] < len(sch.actions[r]))
            raise ScheduleError(f"{sch.name}: deadlock ({sends} sends): {stuck}")
    if posted:
        lost = ", ".join(f"{d}{mb}->stage {s}" for d, mb, s in sorted(posted))
        raise ScheduleError(f"{sch.name}: messages sent but never received: {lost}")
    makespan = max(clock) if clock else 0.0
    return SimResult(sch, records, makespan, busy, peak, len(received))


def validate(schedule: Schedule, sends: str = "nonblocking") -> SimResult:
    """Check ``schedule`` (see the module docstring); returns the unit-time
    :class:`SimResult` or raises :class:`ScheduleError`."""
    return simulate(schedule, sends=sends)
