"""Seeing a run: events on two clocks, a memory ledger, Chrome-trace export.

Every rank owns one :class:`Tracer`.  The communicator records one event per
collective or message; compute regions are recorded with :func:`compute`::

    with trace.compute("block0.forward", flops=24 * b * s * h * h):
        y = block.forward(x)

Each event carries wall-clock times (``time.perf_counter``; on one machine all
processes share that clock) and simulated times read from the rank's
:class:`simpar.sim.Clock` (``tracer.clock``), which the tracer and the
communicator advance; the tracer only records.  The tracer of the calling thread is found with
:func:`current`, so model code never passes tracers around; with no active
tracer, :func:`compute`, :func:`alloc` and :func:`free` do nothing.

The memory ledger counts bytes per category (``params``, ``grads``,
``optimizer``, ``activations``) and keeps the peak, so memory formulas can be
checked against what the code really holds.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

from . import sim

CATEGORIES = ("compute", "comm", "idle")


@dataclass(slots=True)
class Event:
    rank: int
    category: str          # "compute" | "comm" | "idle"
    name: str
    wall_start: float      # seconds (perf_counter)
    wall_end: float
    sim_start: float       # seconds on the simulated clock
    sim_end: float
    nbytes: int = 0
    flops: float = 0.0
    group: str = ""        # communicator name for comm events
    args: dict = field(default_factory=dict)


class MemoryLedger:
    """Bytes held per category, the running total and its peak."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total = 0
        self.peak_total = 0

    def alloc(self, category: str, nbytes: int) -> None:
        c = self.current.get(category, 0) + int(nbytes)
        self.current[category] = c
        self.peak[category] = max(self.peak.get(category, 0), c)
        self.total += int(nbytes)
        self.peak_total = max(self.peak_total, self.total)

    def free(self, category: str, nbytes: int) -> None:
        c = self.current.get(category, 0) - int(nbytes)
        if c < 0:
            raise RuntimeError(f"memory ledger: freed more {category!r} bytes than allocated")
        self.current[category] = c
        self.total -= int(nbytes)

    def reset_peak(self) -> None:
        self.peak = dict(self.current)
        self.peak_total = self.total

    def summary(self) -> dict:
        return {"current": dict(self.current), "peak": dict(self.peak),
                "total": self.total, "peak_total": self.peak_total}


class Tracer:
    """Events and memory of one rank, and its simulated clock (``clock``)."""

    def __init__(self, rank: int = 0, cluster: sim.ClusterSpec | None = None,
                 enabled: bool = True) -> None:
        self.rank = rank
        self.clock = sim.Clock(cluster)
        self.enabled = enabled
        self.events: list[Event] = []
        self.memory = MemoryLedger()

    @property
    def sim_now(self) -> float:
        """This rank's simulated time (``clock.now``)."""
        return self.clock.now

    @property
    def cluster(self) -> sim.ClusterSpec:
        """The simulated cluster (``clock.cluster``)."""
        return self.clock.cluster

    @cluster.setter
    def cluster(self, cluster: sim.ClusterSpec) -> None:
        self.clock.cluster = cluster

    # ------------------------------------------------------------ recording
    def add(self, category: str, name: str, wall_start: float, wall_end: float,
            sim_start: float, sim_end: float, nbytes: int = 0, flops: float = 0.0,
            group: str = "", args: dict | None = None) -> Event | None:
        """Record an event; returns it (or ``None`` when disabled).  (Explicit
        parameters, not ``**kw``: the communicator records one event per call.)"""
        if not self.enabled:
            return None
        event = Event(self.rank, category, name, wall_start, wall_end, sim_start, sim_end,
                      nbytes, flops, group, {} if args is None else args)
        self.events.append(event)
        return event

    @contextmanager
    def compute(self, name: str, flops: float = 0.0, **args) -> Iterator[None]:
        """A compute region: advances the simulated clock by ``flops / device.flops``.

        The advance is added on exit, on top of whatever happened inside, so
        regions nest and may contain communication (a tensor-parallel block):
        ``flops`` should count only the region's own work, not its nested regions'.
        """
        t0, s0 = time.perf_counter(), self.clock.now
        yield
        s1 = self.clock.compute(flops)[1]
        self.add("compute", name, t0, time.perf_counter(), s0, s1, flops=flops, args=args)

    def wait_until(self, t: float, name: str = "wait") -> None:
        """Idle on the simulated clock until ``t`` (no-op if already past it)."""
        idle = self.clock.idle_until(t)
        if idle is not None:
            now = time.perf_counter()
            self.add("idle", name, now, now, *idle)

    def reset(self) -> None:
        """Forget events, restart the simulated clock; the ledger is kept."""
        self.events.clear()
        self.clock.reset()

    # --------------------------------------------------------------- queries
    def select(self, category: str | None = None, name: str | None = None,
               group: str | None = None) -> list[Event]:
        return [e for e in self.events
                if (category is None or e.category == category)
                and (name is None or e.name == name)
                and (group is None or e.group == group)]


# ------------------------------------------------------ the thread's tracer
_local = threading.local()


def current() -> Tracer | None:
    """The tracer of the calling thread (one rank), or ``None``."""
    return getattr(_local, "tracer", None)


def activate(tracer: Tracer | None) -> None:
    """Make ``tracer`` the calling thread's tracer (done by the communicator)."""
    _local.tracer = tracer


@contextmanager
def untraced() -> Iterator[None]:
    """Run a block with no active tracer (e.g. a reference computation that is
    not part of the simulated device's timeline or memory ledger)."""
    t = current()
    activate(None)
    try:
        yield
    finally:
        activate(t)


def compute(name: str, flops: float = 0.0, **args):
    """Context manager recording a compute region on the current tracer, if any."""
    t = current()
    return nullcontext() if t is None else t.compute(name, flops, **args)


def alloc(category: str, nbytes: int) -> None:
    t = current()
    if t is not None:
        t.memory.alloc(category, nbytes)


def free(category: str, nbytes: int) -> None:
    t = current()
    if t is not None:
        t.memory.free(category, nbytes)


# ------------------------------------------------------------------ export
def to_chrome(events: list[Event], path: str | None = None) -> dict:
    """Chrome trace (``traceEvents``; opens in Perfetto / chrome://tracing).

    Process 0 is the wall clock, process 1 the simulated clock; one thread per
    rank.  Times are in microseconds from the earliest event.
    """
    out: list[dict] = []
    ranks = sorted({e.rank for e in events})
    w0 = min((e.wall_start for e in events), default=0.0)
    for pid, label in ((0, "wall clock"), (1, "simulated clock")):
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                    "args": {"name": label}})
        for r in ranks:
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": r,
                        "args": {"name": f"rank {r}"}})
    for e in events:
        args = {"bytes": e.nbytes, "flops": e.flops, "group": e.group, **e.args}
        for pid, start, end in ((0, e.wall_start - w0, e.wall_end - w0),
                                (1, e.sim_start, e.sim_end)):
            out.append({"name": e.name, "cat": e.category, "ph": "X", "pid": pid,
                        "tid": e.rank, "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
                        "args": args})
    doc = {"traceEvents": out, "displayTimeUnit": "ms"}
    if path is not None:
        with open(path, "w") as f:
            json.dump(doc, f)
    return doc

