"""ZeRO: the optimizer, the gradients and the parameters sharded over data parallelism
(Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", §5 memory, §7 communication).

Per device, with Ψ parameters replicated over ``N`` ranks and K bytes
of optimizer state per parameter (§5, Figure 1; mixed-precision Adam: 2 + 2 + K,
K = 12)::

    stage 0  plain data parallel   (2 + 2 + K) Ψ          = 16 Ψ
    stage 1  P_os                   (2 + 2) Ψ + K Ψ / N    = 4 Ψ + 12 Ψ / N
    stage 2  P_os+g                 2 Ψ + (2 + K) Ψ / N    = 2 Ψ + 14 Ψ / N
    stage 3  P_os+g+p               (2 + 2 + K) Ψ / N      = 16 Ψ / N

simpar keeps one dtype for everything (no fp16 copy): with ``e`` bytes per element
(8 in float64) and ``k`` optimizer bytes per parameter (AdamW ``2e``, SGD with
momentum ``e``), the same table reads ``p = g = e``:  stage 0 ``(2e + k)Ψ``, stage 1
``2eΨ + kΨ/N``, stage 2 ``eΨ + (e + k)Ψ/N``, stage 3 ``(2e + k)Ψ/N``
(:func:`simpar.formulas.zero_memory_bytes` with ``param_bytes=e, grad_bytes=e``).

Elements each rank sends per step (§7, ring model)::

    DP, ZeRO-1, ZeRO-2   2 Ψ (N-1)/N     reduce-scatter of gradients + all-gather of parameters
    ZeRO-3               3 Ψ (N-1)/N     + a second all-gather (forward and backward), 1.5x

**Layout.** The parameters a rank holds (its tensor/pipeline shard) are laid out in
one flat buffer per replication group — dense parameters over ``dp × cp``
(``mesh.dp_cp``: context-parallel ranks hold the same weights and their gradients
are summed too, as in Megatron's distributed optimizer), experts over ``edp`` — so
``N = dp·cp`` for dense and ``N = dp/ep`` for expert parameters — in backward order, and cut into **segments**: buckets of ``bucket_bytes``
for stages 1 and 2, one segment per layer (embedding, each block, head) for stage 3.
Each segment is padded to a multiple of ``N`` and rank ``r`` owns its ``r``-th
``1/N``; the optimizer (:mod:`simpar.optim`, unchanged math, element-wise) is built
over this rank's owned pieces only, so it holds ``1/N`` of the moments.

One step::

    stage 1, 2   backward (full local gradients)         reduce-scatter per segment -> my shard
                 update my shard                          all-gather per segment     -> parameters
    stage 3      for each layer: all-gather, forward, free
                 for each layer: all-gather, backward, free; reduce-scatter its gradients
                 update my shard (parameters live only as shards between uses)

Stage 2 frees the gradients it does not own right after their reduce-scatter, stage 3
the parameters of a layer right after the layer ran (the arrays are overwritten with
NaN, so any use of a freed value shows in the result; the memory ledger counts what
a device would hold).  Stage 3's forward and backward are written out below as
explicit calls around each layer (:meth:`DistributedOptimizer.run_schedule`), with
no hook and no hidden state.

Supported: stages 0 and 1 with every layout of :func:`~simpar.parallel.hybrid.build_model`
(experts sharded over ``edp``); stage 2 likewise; stage 3 with ``dp × cp × tp`` layouts
of a dense GPT (``pp = ep = 1``, no sequence parallelism).  Other combinations, and
overlapped buckets with ZeRO, raise a ``ValueError`` on every rank before any message.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Mapping

import numpy as np

from .. import trace
from ..comm import Comm
from ..mixed_precision import MixedPrecisionOptimizer
from ..optim import SGD, AdamW, Wrapped, clip_grad_norm
from .data import DEFAULT_BUCKET_BYTES, check_bucket_bytes
from .pipeline import StepResult
from .pipeline.executor import check_run_args

__all__ = ["DistributedOptimizer", "STAGES", "check_zero", "OPTIMIZERS"]

STAGES = (0, 1, 2, 3)
#: the update rules a DistributedOptimizer runs on its shards; "adamw-mp": AdamW on
#: float32 master weights of a 16-bit model (:mod:`simpar.mixed_precision`)
OPTIMIZERS = {"adamw": AdamW, "sgd": SGD, "adamw-mp": MixedPrecisionOptimizer}


def check_zero(stage, mesh_config, *, moe: bool = False, sequence_parallel: bool = False,
               overlap: bool = False) -> int:
    """Every check that needs no message (the same ``ValueError`` on every rank)."""
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    stage = int(stage)
    cfg = mesh_config
    if stage >= 1 and overlap:
        raise ValueError(f"ZeRO-{stage} with overlap=True is not supported yet: the "
                         "reduce-scatters run after the backward (build the model with "
                         "overlap=False)")
    if stage == 3:
        unsupported = [f"{k}={v}" for k, v in (("pp", cfg.pp), ("ep", cfg.ep), ("vpp", cfg.vpp))
                       if v != 1]
        if moe:
            unsupported.append("an MoE model")
        if sequence_parallel:
            unsupported.append("sequence_parallel=True")
        if unsupported:
            raise ValueError("ZeRO-3 is supported with dp x tp (x cp) layouts of a dense GPT so far "
                             f"(pp=1, ep=1, no sequence parallelism); got {', '.join(unsupported)}")
    return stage


class _Group:
    """The flat layout of the parameters one communicator replicates (module docstring).

    ``names``: backward order; ``segments``: ``[(lo, hi)]`` in the unpadded flat
    buffer.  Segment ``i`` is padded to ``L_i = ⌈(hi−lo)/N⌉·N`` and rank ``r`` owns
    ``[lo + r·k_i, lo + (r+1)·k_i)`` (``k_i = L_i/N``) — of which the real elements
    are listed in ``pieces``: ``(name, a, b, shard offset)``, ``a:b`` a range of the
    flattened local tensor ``name``.
    """

    def __init__(self, kind: str, comm: Comm, params: Mapping[str, np.ndarray],
                 grads: Mapping[str, np.ndarray], names: list[str],
                 segments_of_names: list[list[str]] | None, bucket_bytes: int) -> None:
        self.kind, self.comm = kind, comm
        self.params = {n: params[n] for n in names}
        self.grads = {n: grads[n] for n in names}
        self.offsets, n = {}, 0
        for name in names:
            self.offsets[name] = (n, n + params[name].size)
            n += params[name].size
        self.size = n
        dtype = {p.dtype for p in self.params.values()}
        if len(dtype) > 1:
            raise TypeError(f"ZeRO: one dtype per group, got {sorted(map(str, dtype))}")
        self.dtype = dtype.pop() if dtype else np.dtype(np.float64)
        if segments_of_names is None:            # buckets of bucket_bytes
            per = max(1, bucket_bytes // self.dtype.itemsize)
            self.segments = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
        else:                                    # one segment per layer
            self.segments = []
            for seg in segments_of_names:
                if seg:
                    lo, hi = self.offsets[seg[0]][0], self.offsets[seg[-1]][1]
                    self.segments.append((lo, hi))
        N, r = comm.size, comm.rank
        self.seg_len = [-(-(hi - lo) // N) * N for lo, hi in self.segments]     # padded
        self.seg_off, off = [], 0                # where each segment's part starts in my shard
        for L in self.seg_len:
            self.seg_off.append(off)
            off += L // N
        self.shard_size = off
        self.pieces: list[tuple[str, int, int, int]] = []
        self.seg_pieces: list[list[tuple[str, int, int, int]]] = []
        for (lo, hi), L, so in zip(self.segments, self.seg_len, self.seg_off):
            k = L // N
            mine_lo, mine_hi = lo + r * k, min(lo + (r + 1) * k, hi)
            here = []
            for name in names:
                a, b = self.offsets[name]
                s, e = max(a, mine_lo), min(b, mine_hi)
                if s < e:
                    here.append((name, s - a, e - a, so + s - mine_lo))
            self.seg_pieces.append(here)
            self.pieces += here

    @property
    def owned(self) -> int:
        """Real (unpadded) elements this rank owns."""
        return sum(b - a for _, a, b, _ in self.pieces)

    def members(self, i: int):
        """``(name, a, b, pos)`` of every tensor range in segment ``i``; ``pos`` is its
        offset in the padded segment."""
        lo, hi = self.segments[i]
        for name, (a, b) in self.offsets.items():
            s, e = max(a, lo), min(b, hi)
            if s < e:
                yield name, s - a, e - a, s - lo

    def segments_of(self, names) -> list[int]:
        want = set(names)
        return [i for i in range(len(self.segments))
                if any(n in want for n, *_ in self.members(i))]

    # ------------------------------------------------------------ collectives
    def reduce_scatter(self, i: int, grad_shard: np.ndarray) -> None:
        """Sum segment ``i`` of the local gradients over the group; keep my part."""
        buf = np.zeros(self.seg_len[i], self.dtype)
        for name, a, b, pos in self.members(i):
            buf[pos:pos + b - a] = self.grads[name].reshape(-1)[a:b]
        k = self.seg_len[i] // self.comm.size
        so = self.seg_off[i]
        grad_shard[so:so + k] = self.comm.reduce_scatter(buf)

    def all_gather(self, i: int, mine: np.ndarray, into: Mapping[str, np.ndarray]) -> None:
        """Every rank's part of segment ``i`` (``mine``: ``k_i`` elements), written into
        the tensors ``into``."""
        full = self.comm.all_gather(np.ascontiguousarray(mine))
        for name, a, b, pos in self.members(i):
            into[name].reshape(-1)[a:b] = full[pos:pos + b - a]

    def gather_params(self, i: int, param_shard: np.ndarray | None) -> None:
        k, so = self.seg_len[i] // self.comm.size, self.seg_off[i]
        if param_shard is not None:             # stage 3: the shard is the only copy
            mine = param_shard[so:so + k]
        else:                                   # stages 1-2: my updated part, from the params
            mine = np.zeros(k, self.dtype)
            for name, a, b, pos in self.seg_pieces[i]:
                mine[pos - so:pos - so + b - a] = self.params[name].reshape(-1)[a:b]
        self.all_gather(i, mine, self.params)

    def seg_bytes(self, i: int) -> int:
        lo, hi = self.segments[i]
        return (hi - lo) * self.dtype.itemsize


class DistributedOptimizer(Wrapped):
    """ZeRO stage ``stage`` over the data-parallel group(s) of ``model`` (a
    :class:`~simpar.parallel.hybrid.HybridModel`); ``optimizer`` ``"adamw"`` or
    ``"sgd"`` with its hyper-parameters (those of :mod:`simpar.optim`)::

        model = build_model(reference, mesh)
        opt = DistributedOptimizer(model, stage=2, lr=1e-2, weight_decay=0.1)
        for x, y in batches:
            model.zero_grad()
            model.step(x, y, micro_batches)   # ZeRO's reduce-scatters run in here
            opt.clip_grad_norm(1.0)           # global norm over the sharded gradients
            opt.step()                        # my shard, then all-gather (stages 1-2)

    Stage 0 is plain data parallelism (the model's all-reduce buckets, a full
    optimizer) under the same interface.  Collective: every rank of the world
    builds it, with equal arguments.
    """

    def __init__(self, model, stage: int = 1, optimizer: str = "adamw", **hyper) -> None:
        self.stage = self._check(model, stage, optimizer)
        self.model, self.mesh, self.kind = model, model.mesh, optimizer
        self.bucket_bytes = check_bucket_bytes(getattr(model, "bucket_bytes", DEFAULT_BUCKET_BYTES))
        cls = OPTIMIZERS[optimizer]
        probe = cls({}, **hyper)                # checks the hyper-parameters (every rank)
        self.mesh.world.agree("ZeRO optimizer (stage, optimizer, hyper-parameters)",
                              (self.stage, optimizer,
                               tuple(sorted(probe.hyperparameters().items()))))
        params = model.parameters()
        self.experts = model._expert_names()
        self.units = self._units() if self.stage == 3 else None
        self.groups = self._layout(params, model.gradients()) if self.stage >= 1 else []
        self.inner = self._optimizer_state(cls, hyper, params)
        self._account(params)
        if self.stage >= 1:
            model.zero = self                   # the model's hooks call us from now on
        if self.stage == 3:
            for g in self.groups:               # parameters live only as shards
                for n in g.params:
                    g.params[n].fill(np.nan)

    @staticmethod
    def _check(model, stage, optimizer: str) -> int:
        """Every argument check that needs no message; returns the stage."""
        from .hybrid import HybridModel
        from ..nn.moe_gpt import MoEGPTConfig
        if not isinstance(model, HybridModel):
            raise TypeError(f"DistributedOptimizer needs a HybridModel (build_model), got "
                            f"{type(model).__name__}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        stage = check_zero(stage, model.mesh.config, moe=isinstance(model.config, MoEGPTConfig),
                           sequence_parallel=model.sequence_parallel, overlap=model.overlap)
        if getattr(model, "zero", None) is not None:
            raise ValueError("this model already has a distributed optimizer")
        return stage

    def _layout(self, params, grads) -> list[_Group]:
        """The flat layouts: dense parameters over ``dp × cp`` (``mesh.dp_cp``),
        experts over ``edp``; the same on every rank of a group (agreed)."""
        order = [n for u in self.units.values() for n in u] if self.units \
            else self._backward_order()
        groups = []
        for kind, comm in (("dense", self.mesh.dp_cp), ("expert", self.mesh.edp)):
            names = [n for n in order if (n in self.experts) == (kind == "expert")]
            if names:
                segs = None if self.units is None else \
                    [[n for n in u if n in names] for u in self.units.values()]
                groups.append(_Group(kind, comm, params, grads, names, segs, self.bucket_bytes))
        for g in groups:
            g.comm.agree(f"ZeRO flat layout of the {g.kind} parameters",
                         tuple((n, params[n].shape) for n in g.offsets))
        return groups

    def _optimizer_state(self, cls, hyper: dict, params):
        """The inner optimizer: over every parameter (stage 0) or over views of my
        owned pieces (stages 1-3), with the gradient (and stage-3 parameter) shards."""
        self.param_shards = self.grad_shards = None
        if self.stage == 0:
            return cls(params, **hyper)
        self.grad_shards = [np.zeros(g.shard_size, g.dtype) for g in self.groups]
        if self.stage == 3:
            self.param_shards = [np.zeros(g.shard_size, g.dtype) for g in self.groups]
            for g, ps in zip(self.groups, self.param_shards):
                for name, a, b, pos in g.pieces:
                    ps[pos:pos + b - a] = params[name].reshape(-1)[a:b]
        views, self.grad_views = {}, {}
        for gi, g in enumerate(self.groups):
            for name, a, b, pos in g.pieces:
                key = self.piece_key(g.kind, name, a, b)
                views[key] = (self.param_shards[gi][pos:pos + b - a] if self.stage == 3
                              else params[name].reshape(-1)[a:b])
                self.grad_views[key] = self.grad_shards[gi][pos:pos + b - a]
        return cls(views, **hyper)

    def _account(self, params) -> None:
        """The memory ledger: the parameters and gradients a device holds (§5)."""
        full = sum(p.nbytes for p in params.values())
        owned = sum(g.owned * g.dtype.itemsize for g in self.groups)
        self.param_bytes = owned if self.stage == 3 else full
        self.grad_bytes = owned if self.stage >= 2 else full
        self.local_bytes = full
        trace.alloc("params", self.param_bytes)
        trace.alloc("grads", self.grad_bytes)

    # ----------------------------------------------------------- structure
    @staticmethod
    def piece_key(kind: str, name: str, a: int, b: int) -> str:
        return f"{name}[{a}:{b}]"

    def _backward_order(self) -> list[str]:
        out = []
        for s in sorted(self.model.stages, reverse=True):
            for n in reversed(list(self.model.stages[s].parameters())):
                if n not in out:
                    out.append(n)
        return out

    def _units(self) -> dict[str, list[str]]:
        """Stage 3's layers, backward order: ``head``, ``blocks.{i}`` …, ``embedding``
        (the parameters each one's segment holds)."""
        (st,) = self.model.stages.values()
        order = self._backward_order()
        pieces = st.piece_names()
        return {u: sorted(names, key=order.index) for u, names in pieces.items() if names}

    def _needs(self, unit: str) -> list[str]:
        """The units whose parameters one compute call of ``unit`` reads (a tied
        ``wte`` sits in the head's segment and is read by the embedding too)."""
        if unit == "embedding" and "wte" not in self.units.get("embedding", []):
            return ["embedding", "head"] if "wte" in self.units.get("head", []) else ["embedding"]
        return [unit]

    def __repr__(self) -> str:
        return f"DistributedOptimizer(ZeRO-{self.stage}, {self.inner!r})"

    # ------------------------------------------------- stage 3: gather / free
    @contextmanager
    def gathered(self, units):
        """All-gather the parameters of ``units`` into the layers' arrays for one
        compute call; free them (overwrite with NaN) afterwards."""
        touched = []
        for gi, g in enumerate(self.groups):
            names = [n for u in units for n in self.units[u]]
            for i in g.segments_of(names):
                g.gather_params(i, self.param_shards[gi])
                trace.alloc("params", g.seg_bytes(i))
                touched.append((g, i))
        try:
            yield
        finally:
            for g, i in touched:
                for name, a, b, _ in g.members(i):
                    g.params[name].reshape(-1)[a:b] = np.nan
                trace.free("params", g.seg_bytes(i))

    def _working_grads(self, units) -> None:
        for g in self.groups:
            for i in g.segments_of([n for u in units for n in self.units[u]]):
                trace.alloc("grads", g.seg_bytes(i))

    def _reduce_units(self, units) -> None:
        """Stage 3, after the last backward of ``units``: reduce-scatter their
        gradients into my shard; the full gradients are freed."""
        for gi, g in enumerate(self.groups):
            names = [n for u in units for n in self.units[u]]
            for i in g.segments_of(names):
                g.reduce_scatter(i, self.grad_shards[gi])
                for name, a, b, _ in g.members(i):
                    g.grads[name].reshape(-1)[a:b] = 0.0
                trace.free("grads", g.seg_bytes(i))

    def run_schedule(self, comm, schedule, stages, inputs, targets, *, loss_tokens=None,
                     grads_ready=None) -> StepResult:
        """What :meth:`HybridModel.step` runs: the pipeline executor (stages 0-2; for
        stage 2 the full local gradients are counted until their reduce-scatter),
        or stage 3's explicit loop below."""
        from .pipeline import run_schedule
        if self.stage == 2:
            trace.alloc("grads", self.local_bytes)          # working gradients of this step
        if self.stage != 3:
            return run_schedule(comm, schedule, stages, inputs, targets,
                                loss_tokens=loss_tokens, grads_ready=grads_ready)
        check_run_args(comm, schedule, stages, inputs, targets)
        comm.agree("ZeRO-3 step (micro-batch shapes, loss tokens)",
                   (schedule.m, tuple(np.shape(x) for x in inputs), loss_tokens))
        (st,) = stages.values()
        emb, head = self._needs("embedding"), ["head"]
        blocks = [(f"blocks.{i}", b) for i, b in zip(st.layers, st.blocks)]
        total = loss_tokens if loss_tokens is not None else sum(np.size(y) for y in targets)
        result = StepResult(comm.rank, None)
        m = len(inputs)
        for mb, (x, y) in enumerate(zip(inputs, targets)):
            last = mb == m - 1
            # forward: gather, compute, free — layer by layer
            with self.gathered(emb):
                h = st.model.embed_forward(np.asarray(x), mb)
            for unit, block in blocks:
                with self.gathered([unit]):
                    h = block.forward(h, mb)
            with self.gathered(head):
                logits = st.model.head_forward(h, mb)
            loss, cache = st.loss_forward(logits, np.asarray(y))
            result.mb_losses[mb] = loss
            dlogits = st.loss_backward(cache, np.size(y) / total)
            # backward: gather again, compute, free; reduce-scatter after the last one
            first = mb == 0                     # the unit's full gradients appear
            if first:
                self._working_grads(head)
            with self.gathered(head):
                dh = st.model.head_backward(dlogits, mb)
            if last and "head" not in emb:
                self._reduce_units(head)
            for unit, block in reversed(blocks):
                if first:
                    self._working_grads([unit])
                with self.gathered([unit]):
                    dh = block.backward(dh, mb)
                if last:
                    self._reduce_units([unit])
            if first:
                self._working_grads(["embedding"])
            with self.gathered(emb):
                st.model.embed_backward(dh, mb)
            if last:
                self._reduce_units(emb)
        result.loss = float(sum(result.mb_losses[mb] * np.size(targets[mb]) for mb in range(m))
                            / sum(np.size(t) for t in targets))
        return result

    # ---------------------------------------------------- gradient reduction
    def reduce_grads(self) -> None:
        """Called by :meth:`HybridModel.sync_grads` after the within-replica sums
        (tied embedding, sequence parallelism): stages 1-2 reduce-scatter every
        segment into my gradient shard (stage 2 then frees the full gradients)."""
        if self.stage == 3:
            return                              # done layer by layer in run_schedule
        for gi, g in enumerate(self.groups):
            for i in range(len(g.segments)):
                g.reduce_scatter(i, self.grad_shards[gi])
                if self.stage == 2:
                    for name, a, b, _ in g.members(i):
                        g.grads[name].reshape(-1)[a:b] = np.nan       # freed
                    trace.free("grads", g.seg_bytes(i))

    def grad_norm(self) -> float:
        """Global L2 norm of the gradient from the shards: every element once; one
        all-reduce over the world."""
        if self.stage == 0:
            return self.model.grad_norm()
        total = 0.0
        for gi, g in enumerate(self.groups):
            for name, a, b, pos in g.pieces:
                if self.model.counted_once(name, data_replicas=False):
                    v = self.grad_shards[gi][pos:pos + b - a]
                    total += float(np.dot(v, v))
        return math.sqrt(float(self.mesh.world.all_reduce(np.array([total]))[0]))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale the (sharded) gradients so the global norm is at most ``max_norm``;
        returns the norm before clipping."""
        if self.stage == 0:
            return self.model.clip_grad_norm(max_norm)
        return clip_grad_norm(self.grad_views, max_norm, norm=self.grad_norm())

    # ------------------------------------------------------------ the step
    def step(self) -> None:
        """Update: stage 0 every parameter; stages 1-3 my shard only, then (1-2)
        all-gather the parameters."""
        if self.stage == 0:
            self.inner.step(self.model.gradients())
            return
        if not self.model._synced:
            raise RuntimeError("DistributedOptimizer.step() before model.step(): the "
                               "gradient shards hold no reduced gradient yet")
        self.inner.step(self.grad_views)
        if self.stage in (1, 2):
            for g in self.groups:
                for i in range(len(g.segments)):
                    g.gather_params(i, None)

    # ----------------------------------------------------- cold paths
    def materialize(self, which: str) -> None:
        """Write the full values into the layers' arrays (for ``full_state``):
        stage-3 parameters, or the reduced gradients of stages 1-3."""
        for gi, g in enumerate(self.groups):
            for i in range(len(g.segments)):
                if which == "params" and self.stage == 3:
                    g.gather_params(i, self.param_shards[gi])
                elif which != "params":
                    k, so = g.seg_len[i] // g.comm.size, g.seg_off[i]
                    g.all_gather(i, self.grad_shards[gi][so:so + k], g.grads)

    def dematerialize(self, which: str) -> None:
        if which == "params" and self.stage == 3:
            for g in self.groups:
                for n in g.params:
                    g.params[n].fill(np.nan)

    def owned_pieces(self):
        """``(name, a, b, arrays)`` of what this rank saves in a checkpoint — every
        element of the model once across all ranks: ``arrays`` maps ``"param"`` and
        each optimizer-state kind to the values of ``name.flat[a:b]``."""
        kinds = self.inner._state_kinds
        if self.stage == 0:
            for name, p in self.model.parameters().items():
                if self.model.counted_once(name):
                    yield name, 0, p.size, {"param": p.reshape(-1),
                                            **{k: self.inner.state[k][name].reshape(-1)
                                               for k in kinds}}
            return
        for gi, g in enumerate(self.groups):
            for name, a, b, pos in g.pieces:
                if self.model.counted_once(name, data_replicas=False):
                    key = self.piece_key(g.kind, name, a, b)
                    yield name, a, b, {"param": self.inner.params[key],
                                       **{k: self.inner.state[k][key] for k in kinds}}

    def load_pieces(self, values) -> None:
        """Inverse of :meth:`owned_pieces` for *every* piece this rank holds (replicas
        too): ``values(name, a, b, kind)`` returns the array.  Stages 1-2 then
        rebuild the full local parameters by all-gather."""
        kinds = self.inner._state_kinds
        params = self.model.parameters()
        if self.stage == 0:
            for name, p in params.items():
                p.reshape(-1)[...] = values(name, 0, p.size, "param")
                for k in kinds:
                    self.inner.state[k][name].reshape(-1)[...] = values(name, 0, p.size, k)
            return
        for gi, g in enumerate(self.groups):
            for name, a, b, pos in g.pieces:
                key = self.piece_key(g.kind, name, a, b)
                self.inner.params[key][...] = values(name, a, b, "param")
                for k in kinds:
                    self.inner.state[k][key][...] = values(name, a, b, k)
        if self.stage in (1, 2):
            for g in self.groups:
                for i in range(len(g.segments)):
                    g.gather_params(i, None)
