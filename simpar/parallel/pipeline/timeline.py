"""Reading a pipeline step back from its action records: bubbles, per-stage times,
the critical path (the pictures are drawn by :mod:`simpar.viz`).

All functions take the :class:`~.executor.ActionRecord`\\ s of **every** rank (gather
them with :func:`gather_records`) and a clock, ``"sim"`` (the simulated cluster)
or ``"wall"`` (this machine).  What is measured is what the papers predict::

    bubble fraction = Σ_r (T_step − busy_r) / (p · T_step)
                    = (p−1)/(m+p−1)  for GPipe and 1F1B with equal stages
                      (Narayanan et al. 2021, §2.2.1: bubble/ideal = (p−1)/m)

(:mod:`simpar.formulas` holds the closed forms; the tests compare.)
"""
from __future__ import annotations

from dataclasses import dataclass

from ...comm import Comm
from .executor import ActionRecord, StepResult

CLOCKS = ("sim", "wall")


def gather_records(comm: Comm, result: StepResult) -> list[ActionRecord]:
    """Every rank's records, on every rank (cold path: pickles under MPI)."""
    return [r for rank in comm.gather_objects(result.records) for r in rank]


def _times(r: ActionRecord, clock: str) -> tuple[float, float]:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be 'sim' or 'wall', got {clock!r}")
    return (r.sim_start, r.sim_end) if clock == "sim" else (r.wall_start, r.wall_end)


@dataclass
class StepSummary:
    """Step time, compute time and idle time (bubble) of each rank, on one clock."""

    makespan: float
    busy: dict            # rank -> compute time
    clock: str

    @property
    def bubble(self) -> dict:
        return {r: self.makespan - b for r, b in self.busy.items()}

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: ``Σ bubble / (p · makespan)``."""
        return sum(self.bubble.values()) / (len(self.busy) * self.makespan)


def summarize(records: list[ActionRecord], clock: str = "sim") -> StepSummary:
    """Makespan (first start to last end over all ranks) and compute time per rank."""
    spans = [(_times(r, clock), r) for r in records]
    t0 = min(s for (s, _), _ in spans)
    t1 = max(e for (_, e), _ in spans)
    busy: dict = {}
    for (s, e), r in spans:
        busy.setdefault(r.rank, 0.0)
        if r.action.is_compute:
            busy[r.rank] += e - s
    return StepSummary(t1 - t0, dict(sorted(busy.items())), clock)


def stage_times(records: list[ActionRecord], clock: str = "sim") -> dict:
    """``{(stage, kind): mean duration}`` of the compute actions."""
    acc: dict = {}
    for r in records:
        if r.action.is_compute:
            s, e = _times(r, clock)
            acc.setdefault((r.action.stage, r.action.kind), []).append(e - s)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


@dataclass
class CriticalPath:
    """The chain of actions and messages that decided the step time (sim clock)."""

    actions: list[ActionRecord]        # last first
    compute: float                     # compute time on the path
    transfer: float                    # message time on the path
    transfers: int                     # messages on the path

    @property
    def length(self) -> float:
        return self.compute + self.transfer


def critical_path(records: list[ActionRecord]) -> CriticalPath:
    """Walk back from the last action to finish: a compute action follows the
    action before it on its rank; a receive that had to wait follows the matching
    send on the sender's rank (the message's flight is on the path)."""
    by_rank: dict = {}
    for r in sorted(records, key=lambda r: (r.rank, r.index)):
        by_rank.setdefault(r.rank, []).append(r)
    sends = {}
    for r in records:
        a = r.action
        if a.kind == "SEND_F":
            sends[("F", a.mb, a.stage + 1)] = r
        elif a.kind == "SEND_B":
            sends[("B", a.mb, a.stage - 1)] = r
    cur = max(records, key=lambda r: (r.sim_end, r.rank))
    path, compute, transfer, n = [], 0.0, 0.0, 0
    while cur is not None:
        path.append(cur)
        a = cur.action
        if a.is_compute:
            compute += cur.sim_end - cur.sim_start
        if a.kind.startswith("RECV") and cur.sim_end > cur.sim_start:
            src = sends[("F" if a.kind == "RECV_F" else "B", a.mb, a.stage)]
            transfer += cur.sim_end - src.sim_end
            n += 1
            cur = src
            continue
        cur = by_rank[cur.rank][cur.index - 1] if cur.index > 0 else None
    return CriticalPath(path, compute, transfer, n)


# ------------------------------------------------------------------- pictures
# Drawing lives in simpar.viz (one home for plots); these names stay for callers.
def draw_pipeline(ax, records: list[ActionRecord], clock: str = "sim", title: str = "",
                  labels: bool = True) -> None:
    """:func:`simpar.viz.draw_pipeline` (imported on first use: matplotlib is heavy)."""
    from ...viz import draw_pipeline as draw
    draw(ax, records, clock, title, labels)


def legend_handles():
    """:func:`simpar.viz.pipeline_legend`."""
    from ...viz import pipeline_legend
    return pipeline_legend()
