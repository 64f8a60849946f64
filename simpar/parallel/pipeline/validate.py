"""Prove a schedule deadlock-free and causally correct, and time it, without a model.

:func:`simulate` plays every rank's action list at once, the way the executor and
:class:`simpar.comm.Comm` will: a ``SEND`` is posted and the sender goes on; a
``RECV`` blocks until its message has been posted; a compute action may only use
what already exists.  Each action gets a start and end time from ``durations``
and a transfer time per message, with the rules of the simulated clock
(DESIGN.md §4): a message posted at ``t`` arrives at ``t + transfer``, the
receiver continues at ``max(own time, arrival)``.  So ``simulate`` with the
durations a real run measured predicts that run's simulated clock exactly.
With identical stages it reproduces the papers' bubbles exactly —
``(p−1)/(v·m)`` of the compute for GPipe, 1F1B and interleaved 1F1B (Narayanan et
al. 2021 §2.2), ``(p−1)(T_F + T_B − T_W)`` for ZB-H1 (Qi et al. 2023, Table 2);
the formulas are in :mod:`simpar.formulas`, the proofs in the tests.

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

:func:`format_schedule` draws the timed result as a step × rank grid.

``sends="blocking"`` checks the stricter model where a send also waits until
the receiver reaches the matching receive (rendezvous, like a large MPI ``Send``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .schedules import Action, Schedule

UNIT_TIMES = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}   # a full backward = two forwards


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

    The steps: check the structure (:func:`_check_structure`), then let every
    rank run until it must wait, round after round (:meth:`_Playback.run`); a
    round in which no rank moves is a deadlock.
    """
    if sends not in ("nonblocking", "blocking"):
        raise ValueError(f"sends must be 'nonblocking' or 'blocking', got {sends!r}")
    _check_structure(schedule)
    play = _Playback(schedule, UNIT_TIMES if durations is None else durations, transfer, sends)
    play.run()
    return SimResult(schedule, play.records, max(play.clock, default=0.0), play.busy,
                     play.peak, len(play.received))


def validate(schedule: Schedule, sends: str = "nonblocking") -> SimResult:
    """Check ``schedule`` (see the module docstring); returns the unit-time
    :class:`SimResult` or raises :class:`ScheduleError`."""
    return simulate(schedule, sends=sends)


def _message(a: Action) -> tuple:
    """The message a comm action carries: (direction, micro-batch, receiving stage)."""
    if a.kind == "SEND_F":
        return ("F", a.mb, a.stage + 1)
    if a.kind == "SEND_B":
        return ("B", a.mb, a.stage - 1)
    return (a.kind[-1], a.mb, a.stage)                # RECV_F / RECV_B: this stage


class _Playback:
    """Every rank's state while :func:`simulate` plays a schedule.

    Each ``_start_*`` method checks that rank ``r`` may execute its next action
    and returns the time the action starts, or ``None`` if the rank must wait
    (for a message, or for its receiver under blocking sends)."""

    def __init__(self, sch: Schedule, durations: Durations, transfer, sends: str) -> None:
        self.sch, self.durations, self.transfer, self.sends = sch, durations, transfer, sends
        p = sch.p
        self.pc = [0] * p                       # next action of each rank
        self.clock = [0.0] * p
        self.busy = [0.0] * p
        self.in_flight, self.peak = [0] * p, [0] * p
        self.done: dict = {}                    # (kind, mb, stage) -> end time (compute)
        self.posted: dict = {}                  # message -> arrival time, until received
        self.received: set = set()
        self.records: list[Record] = []
        self.start_of = {"F": self._start_forward, "B": self._start_backward,
                         "I": self._start_backward, "W": self._start_weight,
                         "SEND_F": self._start_send, "SEND_B": self._start_send,
                         "RECV_F": self._start_recv, "RECV_B": self._start_recv}

    # ------------------------------------------------------------ the loop
    def finished(self, r: int) -> bool:
        return self.pc[r] == len(self.sch.actions[r])

    def run(self) -> None:
        """Rounds over the ranks until all are done; a round without a move is a
        deadlock; a message left unreceived at the end is an error."""
        ranks = range(self.sch.p)
        while not all(self.finished(r) for r in ranks):
            moved = False
            for r in ranks:
                while not self.finished(r) and self.step(r):
                    moved = True
            if not moved:
                stuck = "; ".join(f"rank {r} waits at action {self.pc[r]} "
                                  f"({self.sch.actions[r][self.pc[r]]})"
                                  for r in ranks if not self.finished(r))
                raise ScheduleError(f"{self.sch.name}: deadlock ({self.sends} sends): {stuck}")
        if self.posted:
            lost = ", ".join(f"{d}{mb}->stage {s}" for d, mb, s in sorted(self.posted))
            raise ScheduleError(f"{self.sch.name}: messages sent but never received: {lost}")

    def step(self, r: int) -> bool:
        """Execute rank ``r``'s next action if it can; False if it must wait."""
        a = self.sch.actions[r][self.pc[r]]
        start = self.start_of[a.kind](r, a)
        if start is None:
            return False
        if a.is_compute:
            self._compute(r, a, start)
        self.records.append(Record(r, self.pc[r], a, start, self.clock[r]))
        self.pc[r] += 1
        return True

    def fail(self, r: int, why: str) -> None:
        a = self.sch.actions[r][self.pc[r]]
        raise ScheduleError(f"{self.sch.name}: rank {r} action {self.pc[r]} ({a}): {why}")

    # ---------------------------------------------------------- compute
    def _backward_done(self, mb: int, s: int):
        return self.done.get(("B", mb, s), self.done.get(("I", mb, s)))

    def _start_forward(self, r: int, a: Action) -> float:
        """``F`` needs its input: computed earlier on this rank, or received."""
        mb, s, start = a.mb, a.stage, self.clock[r]
        if s == 0:
            return start
        if self.sch.rank_of(s - 1) == r:
            if ("F", mb, s - 1) not in self.done:
                self.fail(r, f"input of stage {s} not computed yet (F{mb} of stage {s - 1} "
                             f"on this rank comes later)")
            return max(start, self.done[("F", mb, s - 1)])
        if ("F", mb, s) not in self.received:
            self.fail(r, "forward input was not received (no RECV_F before it)")
        return start

    def _start_backward(self, r: int, a: Action) -> float:
        """``B``/``I`` need their forward and their output gradient."""
        mb, s, start = a.mb, a.stage, self.clock[r]
        if ("F", mb, s) not in self.done:
            self.fail(r, "backward before its forward")
        if s == self.sch.n_stages - 1:
            return start
        if self.sch.rank_of(s + 1) == r:
            t = self._backward_done(mb, s + 1)
            if t is None:
                self.fail(r, f"output gradient not computed yet (backward of stage {s + 1} "
                             f"on this rank comes later)")
            return max(start, t)
        if ("B", mb, s) not in self.received:
            self.fail(r, "output gradient was not received (no RECV_B before it)")
        return start

    def _start_weight(self, r: int, a: Action) -> float:
        if ("I", a.mb, a.stage) not in self.done:
            self.fail(r, "weight gradient before its input gradient (W before I)")
        return self.clock[r]

    def _compute(self, r: int, a: Action, start: float) -> None:
        """Advance the clock by the action's duration; count micro-batches held."""
        key = (a.kind, a.mb, a.stage)
        if key in self.done:
            self.fail(r, "computed twice")
        dur = _duration(self.durations, r, a)
        self.clock[r] = start + dur
        self.busy[r] += dur
        self.done[key] = self.clock[r]
        if a.kind == "F":
            self.in_flight[r] += 1
            self.peak[r] = max(self.peak[r], self.in_flight[r])
        elif a.kind in ("B", "W"):
            self.in_flight[r] -= 1

    # ---------------------------------------------------------- messages
    def _check_peer(self, r: int, a: Action, peer: int, verb: str) -> None:
        if not 0 <= peer < self.sch.n_stages:
            self.fail(r, f"no stage {peer} to {verb}")
        if self.sch.rank_of(peer) == r:
            self.fail(r, f"{verb} stage {peer} on the same rank (no message needed)")

    def _start_send(self, r: int, a: Action) -> float | None:
        """Post the message (arrives ``transfer`` later); under blocking sends,
        first wait until the receiver stands at the matching receive."""
        k, mb, s = a.kind, a.mb, a.stage
        self._check_peer(r, a, s + 1 if k == "SEND_F" else s - 1, "send to")
        if k == "SEND_F" and ("F", mb, s) not in self.done:
            self.fail(r, "sends an activation not computed yet")
        if k == "SEND_B" and self._backward_done(mb, s) is None:
            self.fail(r, "sends a gradient not computed yet")
        msg = _message(a)
        if msg in self.posted or msg in self.received:
            self.fail(r, "message sent twice")
        if self.sends == "blocking":
            if not self._receiver_waiting(msg):
                return None
            self.clock[r] = max(self.clock[r], self.clock[self.sch.rank_of(msg[2])])
        t = self.transfer(a) if callable(self.transfer) else float(self.transfer)
        self.posted[msg] = self.clock[r] + t
        return self.clock[r]

    def _start_recv(self, r: int, a: Action) -> float | None:
        """Wait for the message; continue at ``max(own time, arrival)``."""
        self._check_peer(r, a, a.stage - 1 if a.kind == "RECV_F" else a.stage + 1,
                         "receive from")
        msg = _message(a)
        if msg in self.received:
            self.fail(r, "message received twice")
        if msg not in self.posted:
            return None
        start = self.clock[r]
        self.clock[r] = max(start, self.posted.pop(msg))
        self.received.add(msg)
        return start

    def _receiver_waiting(self, msg) -> bool:
        """Rendezvous: is the receiving rank at the matching RECV right now?"""
        dst = self.sch.rank_of(msg[2])
        if self.finished(dst):
            return False
        b = self.sch.actions[dst][self.pc[dst]]
        return b.kind.startswith("RECV") and _message(b) == msg


# ------------------------------------------------------------------ printing
def format_schedule(schedule: Schedule, durations: dict | None = None,
                    time_axis: str = "rows") -> str:
    """The schedule as a step × rank grid of compute actions ("0F1" = stage 0,
    forward, micro-batch 1; "." = idle).

    Steps come from :func:`simulate` with unit times (``F = I = W = 1``,
    ``B = 2``: a full backward costs two forwards) and free messages, so the grid
    shows where each rank waits.  ``time_axis="columns"`` draws time left to right,
    like the papers' figures."""
    if time_axis not in ("rows", "columns"):
        raise ValueError(f"time_axis must be 'rows' or 'columns', got {time_axis!r}")
    res = simulate(schedule, durations or UNIT_TIMES)
    steps, p = int(round(res.makespan)), schedule.p
    grid = [["." for _ in range(p)] for _ in range(steps)]
    for rec in res.records:
        if rec.action.is_compute:
            for t in range(int(round(rec.start)), int(round(rec.end))):
                grid[t][rec.rank] = str(rec.action)
    w = max([len(c) for row in grid for c in row] + [4]) + 1
    title = (f"{schedule.name}: p={p} m={schedule.m}"
             + (f" v={schedule.v}" if schedule.v > 1 else "")
             + f", {steps} steps (F=1, B=2, I=W=1)")
    if time_axis == "rows":
        lines = [title, "step".ljust(5) + "".join(f"r{r}".rjust(w) for r in range(p))]
        lines += [str(t).ljust(5) + "".join(c.rjust(w) for c in row) for t, row in enumerate(grid)]
    else:
        lines = [title] + [f"r{r}".ljust(4) + "".join(grid[t][r].rjust(w) for t in range(steps))
                           for r in range(p)]
    return "\n".join(lines)
