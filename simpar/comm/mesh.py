"""The device mesh: parallel degrees, rank layout and sub-communicators.

Ranks are laid out with **tp innermost, then cp, then dp, then pp**, as
Megatron-LM does (its order ``tp-cp-ep-dp-pp``), so tensor-parallel peers are
neighbours and context-parallel peers next (DESIGN.md §3)::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

With ``cp = 1`` (the default) this is ``tp_rank + tp * (dp_rank + dp * pp_rank)``.
Context parallelism (:mod:`simpar.parallel.context`) splits the sequence over
``cp``; its ranks replicate every parameter, so dense gradients are summed over
the ``dp × cp`` ranks of one (tp, pp) position, ``mesh.dp_cp`` (Megatron's
data-parallel-with-context-parallel group).

Expert parallelism subdivides the data-parallel dimension: the ``dp`` ranks of
one (pp, tp) position form ``dp / ep`` expert-parallel groups of ``ep``
consecutive data-parallel ranks (``ep_rank = dp_rank % ep``).  The ranks holding
the same experts (same ``ep_rank``) form the expert-data-parallel group ``edp``,
over which expert gradients are summed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Comm


@dataclass(frozen=True)
class Coords:
    dp: int
    tp: int
    pp: int
    ep: int
    cp: int = 0


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees: data, tensor, pipeline, expert, virtual pipeline chunks
    per rank (interleaved schedules), and context (sequence split over ``cp``)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep", "vpp", "cp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig: {name}={v!r} must be a positive integer")
        if self.dp % self.ep:
            raise ValueError(f"ParallelConfig: ep={self.ep} must divide dp={self.dp} "
                             "(expert parallelism subdivides data parallelism)")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def validate(self, world_size: int) -> None:
        if world_size != self.world_size:
            if self.cp > 1:
                raise ValueError(f"world size {world_size} != dp*tp*pp*cp = {self.dp}*{self.tp}*"
                                 f"{self.pp}*{self.cp} = {self.world_size}")
            raise ValueError(f"world size {world_size} != dp*tp*pp = {self.dp}*{self.tp}*"
                             f"{self.pp} = {self.world_size}")

    def rank_of(self, dp: int, tp: int, pp: int, cp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return Coords(dp=dp, tp=tp, pp=pp, ep=dp % self.ep, cp=cp)

    def grid(self) -> str:
        """The layout as text: one block per pipeline stage, dp rows x tp columns."""
        if self.cp > 1:
            lines = [f"mesh dp={self.dp} cp={self.cp} tp={self.tp} pp={self.pp} ep={self.ep} "
                     f"vpp={self.vpp} ({self.world_size} ranks; rank = tp + {self.tp}*(cp + "
                     f"{self.cp}*(dp + {self.dp}*pp)))"]
        else:
            lines = [f"mesh dp={self.dp} tp={self.tp} pp={self.pp} ep={self.ep} vpp={self.vpp} "
                     f"({self.world_size} ranks; rank = tp + {self.tp}*(dp + {self.dp}*pp))"]
        w = len(str(self.world_size - 1))
        for pp in range(self.pp):
            lines.append(f"  pp stage {pp}:" + "".join(f"  tp{t}".rjust(w + 4)
                                                      for t in range(self.tp)))
            for dp in range(self.dp):
                for cp in range(self.cp):
                    label = f"    dp{dp}" + (f" cp{cp}" if self.cp > 1 else "") + \
                        (f" (ep group {dp // self.ep}, ep{dp % self.ep})" if self.ep > 1 else "")
                    ranks = "".join(str(self.rank_of(dp, t, pp, cp)).rjust(w + 4)
                                    for t in range(self.tp))
                    lines.append(label.ljust(13) + ranks)
        return "\n".join(lines)


class Mesh:
    """The sub-communicators of one rank: ``tp``, ``cp``, ``dp``, ``pp``, ``ep``,
    ``edp``, and ``dp_cp`` (the ``dp × cp`` ranks of one (tp, pp) position, which
    hold the same dense parameters; ``dp_cp`` is ``dp`` itself when ``cp = 1``).

    Building a mesh is collective: every rank of ``comm`` must call it.  The
    ranks first agree on the config (:meth:`Comm.agree`: a ``ValueError`` on
    every rank naming each rank's config if they differ), then it is checked
    against the world size.
    """

    def __init__(self, comm: Comm, config: ParallelConfig) -> None:
        if not isinstance(config, ParallelConfig):
            raise TypeError(f"Mesh: config must be a ParallelConfig, got {type(config).__name__}")
        comm.agree("the ParallelConfig of the Mesh", config)
        config.validate(comm.size)
        self.world = comm
        self.config = config
        c = self.coords = config.coords(comm.rank)
        dp, tp, ep, cp = config.dp, config.tp, config.ep, config.cp
        # colour: the coordinates a group shares; key: the one it runs along
        self.tp = comm.split((c.pp * dp + c.dp) * cp + c.cp, c.tp, name="tp")
        self.dp = comm.split((c.pp * cp + c.cp) * tp + c.tp, c.dp, name="dp")
        self.pp = comm.split((c.dp * cp + c.cp) * tp + c.tp, c.pp, name="pp")
        groups = dp // ep
        self.ep = comm.split(((c.pp * cp + c.cp) * tp + c.tp) * groups + c.dp // ep, c.ep,
                             name="ep")
        self.edp = comm.split(((c.pp * cp + c.cp) * tp + c.tp) * ep + c.ep, c.dp // ep,
                              name="edp")
        self.cp = comm.split((c.pp * dp + c.dp) * tp + c.tp, c.cp, name="cp")
        self.dp_cp = self.dp if cp == 1 else \
            comm.split(c.pp * tp + c.tp, c.dp * cp + c.cp, name="dp_cp")

    def __str__(self) -> str:
        return self.config.grid()

    def describe(self) -> str:
        c = self.coords
        cp = (f" cp group {self.cp.world_ranks}" if self.config.cp > 1 else "")
        return (f"rank {self.world.rank}: dp={c.dp} tp={c.tp} pp={c.pp} ep={c.ep}"
                + (f" cp={c.cp}" if self.config.cp > 1 else "") + " | "
                f"tp group {self.tp.world_ranks} dp group {self.dp.world_ranks} "
                f"pp group {self.pp.world_ranks} ep group {self.ep.world_ranks}" + cp)
