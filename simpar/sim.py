"""The simulated clock: one :class:`Clock` per rank, device and link presets, and
the alpha-beta cost model.

Every rank keeps a virtual time (DESIGN.md §4), held by its :class:`Clock` — the
one place it is kept and advanced; the communicator and the tracer call it.  Compute advances it by
``flops / device.flops``.  A point-to-point message of ``n`` bytes sent at
virtual time ``t`` arrives at ``t + alpha + n * beta``; the receiver continues at
``max(own time, arrival)``.  A collective starts at the latest member's time and
lasts its alpha-beta cost (DESIGN.md §6, ring / pairwise algorithms):

=================  =====================================================
all-reduce         ``2 (p-1) alpha + 2 n (p-1)/p beta``  (n = the array)
all-gather         ``(p-1) alpha + n (p-1)/p beta``      (n = the output)
reduce-scatter     ``(p-1) alpha + n (p-1)/p beta``      (n = the input)
all-to-all         ``(p-1) alpha + n (p-1)/p beta``      (n = bytes one rank holds)
broadcast          ``ceil(log2 p) (alpha + n beta)``     (binomial tree; simpar's choice)
barrier            ``ceil(log2 p) alpha``                (dissemination; simpar's choice)
=================  =====================================================

The formulas live in :mod:`simpar.formulas` (one home for every closed form);
``sim.collective_time``, ``sim.p2p_time`` and ``sim.compute_time`` are the same
functions.  No floating-point sum across ranks enters these times, so the simulated clock
is bit-identical on every backend.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

# The alpha-beta costs are defined once, in simpar.formulas; the communicator and
# the tracer advance the clock through these names.
from .formulas import collective_time, compute_time, p2p_time  # noqa: F401


@dataclass(frozen=True)
class DeviceSpec:
    """A compute device: its peak dense throughput in FLOP/s."""

    name: str
    flops: float


@dataclass(frozen=True)
class LinkSpec:
    """A link: latency ``alpha`` (s) and inverse bandwidth ``beta`` (s/byte)."""

    name: str
    alpha: float
    beta: float

    @property
    def bandwidth(self) -> float:
        """Bytes per second (``1 / beta``; infinite for a free link)."""
        return math.inf if self.beta == 0 else 1.0 / self.beta


FREE_LINK = LinkSpec("free", 0.0, 0.0)

# Presets.  Peak numbers are the vendors' data-sheet figures; latencies are
# typical measured values, stated here as simpar's assumption.
A100 = DeviceSpec("A100-SXM", 312e12)          # 16-bit dense tensor-core peak
H100 = DeviceSpec("H100-SXM", 989e12)          # bf16 dense peak
NVLINK3 = LinkSpec("NVLink3 (A100)", 2e-6, 1 / 600e9)
NVLINK4 = LinkSpec("NVLink4 (H100)", 2e-6, 1 / 900e9)
IB_HDR = LinkSpec("InfiniBand HDR 200 Gb/s", 5e-6, 1 / 25e9)
IB_NDR = LinkSpec("InfiniBand NDR 400 Gb/s", 5e-6, 1 / 50e9)


@dataclass(frozen=True)
class ClusterSpec:
    """Devices grouped into nodes: ``intra`` links inside a node, ``inter`` across."""

    name: str
    device: DeviceSpec
    intra: LinkSpec
    inter: LinkSpec
    devices_per_node: int = 8

    def node_of(self, world_rank: int) -> int:
        return world_rank // self.devices_per_node

    def link(self, world_ranks) -> LinkSpec:
        """The link a group communicates over: the slowest one it spans."""
        nodes = {self.node_of(r) for r in world_ranks}
        return self.intra if len(nodes) <= 1 else self.inter


def a100_cluster(devices_per_node: int = 8) -> ClusterSpec:
    """DGX A100: NVLink inside a node, one HDR InfiniBand port per GPU across."""
    return ClusterSpec("A100-SXM cluster", A100, NVLINK3, IB_HDR, devices_per_node)


def h100_cluster(devices_per_node: int = 8) -> ClusterSpec:
    """DGX H100: NVLink 4 inside a node, one NDR InfiniBand port per GPU across."""
    return ClusterSpec("H100-SXM cluster", H100, NVLINK4, IB_NDR, devices_per_node)


def ideal_cluster(flops: float = 1e12) -> ClusterSpec:
    """Free links (alpha = beta = 0): isolates compute and bubbles in tests."""
    return ClusterSpec("ideal", DeviceSpec("ideal", flops), FREE_LINK, FREE_LINK, 1 << 30)


_THIS_MACHINE: ClusterSpec | None = None


def this_machine() -> ClusterSpec:
    """A preset measured here once per process: float32 matmul FLOP/s of one core
    and memory-copy bandwidth (the "link" between ranks of one machine)."""
    global _THIS_MACHINE
    if _THIS_MACHINE is None:
        n = 512
        a = np.ones((n, n), np.float32)
        a @ a
        t0 = time.perf_counter()
        reps = 4
        for _ in range(reps):
            a @ a
        flops = reps * 2 * n**3 / (time.perf_counter() - t0)
        buf = np.ones(1 << 22, np.uint8)
        dst = np.empty_like(buf)
        t0 = time.perf_counter()
        for _ in range(4):
            np.copyto(dst, buf)
        bw = 4 * buf.nbytes / (time.perf_counter() - t0)
        link = LinkSpec("shared memory (measured)", 5e-6, 1 / bw)
        _THIS_MACHINE = ClusterSpec("this machine", DeviceSpec("this machine (1 core)", flops),
                                    link, link, 1 << 30)
    return _THIS_MACHINE


class Clock:
    """One rank's simulated time: ``now`` on the compute stream and
    ``stream_free`` on the communication stream (when the rank's last
    non-blocking collective ends).  Every method returns the interval it
    covered, ``(start, end)``, for the tracer to record; none reads a wall clock.

    ==================  ==================================================
    ``compute(flops)``  ``now += flops / device.flops``
    ``idle_until(t)``   ``now = max(now, t)``  (a wait for a peer)
    ``collective(...)`` starts at ``start`` (the latest member's ``now``, from
                        the arrival exchange), lasts ``duration``, its
                        alpha-beta cost (:func:`collective_time`)
    ``launch(...)``     the same on the communication stream: ``now`` goes on
    ``arrival(...)``    a message sent at ``sent_at``: ``sent_at + alpha + n beta``
    ==================  ==================================================

    The communicator prices a collective with :func:`collective_time` once
    per call signature and cluster and passes the ``duration`` (the same
    float every time, so simulated times stay bit-identical).
    """

    __slots__ = ("cluster", "now", "stream_free")

    def __init__(self, cluster: ClusterSpec | None = None) -> None:
        self.cluster = cluster if cluster is not None else a100_cluster()
        self.now = 0.0
        self.stream_free = 0.0

    def reset(self) -> None:
        self.now = self.stream_free = 0.0

    def compute(self, flops: float) -> tuple[float, float]:
        start = self.now
        self.now = start + compute_time(flops, self.cluster.device)
        return start, self.now

    def idle_until(self, t: float) -> tuple[float, float] | None:
        """Idle until ``t``; the idle interval, or ``None`` if ``t`` is past."""
        if t <= self.now:
            return None
        start, self.now = self.now, t
        return start, t

    def collective(self, start: float, duration: float) -> tuple[float, float]:
        """A blocking collective of ``duration`` that every member reached by
        ``start`` (call :meth:`idle_until` first to record the wait)."""
        begin = start if start > self.now else self.now       # max(now, start)
        self.now = begin + duration
        return begin, self.now

    def launch(self, start: float, duration: float) -> tuple[float, float]:
        """A non-blocking collective of ``duration`` on the communication stream:
        it starts when every member launched it (``start``) and the stream is free."""
        begin = self.stream_free if self.stream_free > start else start   # max(start, free)
        self.stream_free = begin + duration
        return begin, self.stream_free

    def arrival(self, sent_at: float, nbytes: int, link: LinkSpec) -> float:
        """When a message sent at ``sent_at`` arrives."""
        return sent_at + p2p_time(nbytes, link)


PRESETS = {"a100": a100_cluster, "h100": h100_cluster, "ideal": ideal_cluster,
           "this-machine": this_machine}


def preset(name: str) -> ClusterSpec:
    """A cluster preset by name: ``a100``, ``h100``, ``ideal`` or ``this-machine``."""
    if name not in PRESETS:
        raise ValueError(f"unknown cluster preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
