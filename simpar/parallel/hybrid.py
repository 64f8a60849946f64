"""Hybrid ("3D") parallelism: one :class:`~simpar.comm.mesh.Mesh`, one model
(Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", §2–§3).

:func:`build_model` composes the paradigms from the layers that already exist —
no second copy of the model::

    reference GPT / MoEGPT (same seed on every rank)
      └─ pipeline stages over mesh.pp   (partition; vpp chunks per rank, interleaved)
           ├─ blocks: ParallelTransformerBlock over mesh.tp  (+ sequence parallelism)
           │    └─ MoE feed-forward: ExpertParallelMoE over mesh.ep  (replicated over tp;
           │         under SP or cp it routes the whole sequence: all-gathered)
           ├─ first stage: vocab-parallel embedding
           └─ last stage: vocab-parallel head + cross-entropy  (tied: wteᵀ)

and :meth:`HybridModel.step` runs one training step of the global batch: this
rank's data-parallel slice, cut into ``m`` micro-batches, through the pipeline
schedule; then every gradient is summed over **the group that replicates it**:

=================================  ===========================  =================
gradient                           replicated over               summed by
=================================  ===========================  =================
dense parameters                   ``dp`` (data parallel)        bucketed all-reduce
expert parameters and routers      ``edp`` (same experts)        bucketed all-reduce
                                   (routers: also ``ep``,        (in the layer)
                                   summed in the MoE backward)
LayerNorms, row biases, ``wpe``    ``tp`` under sequence         one all-reduce
under sequence parallelism         parallelism (partial sums)
tied ``wte`` with ``pp > 1``       the embedding group (first    one all-reduce
                                   and last stage)
dense parameters, with ``cp > 1``  ``dp × cp`` (``mesh.dp_cp``:  the dp buckets, over
                                   context parallelism)          ``dp_cp`` instead
=================================  ===========================  =================

**Context parallelism** (``ParallelConfig(cp=...)``, :mod:`simpar.parallel.context`):
each cp rank holds its share of every sequence — the load-balanced chunks ``i``
and ``2cp−1−i`` for ring attention, a contiguous ``s/cp`` for Ulysses — from the
embedding (its positions of ``wpe``) to the loss (its tokens, weighted by the
global token count); the attention of every block is a
:class:`~simpar.parallel.context.ContextParallelAttention` over ``mesh.cp``
(option ``context_parallel="ring"`` or ``"ulysses"``).  The blocks are the
tensor-parallel pieces (over a 1-rank tp group when ``tp = 1``).  An MoE layer
routes the whole sequence of its cp group as one routing group, as the reference
does (so does one under sequence parallelism, over ``tp``): it all-gathers its
input, and its own gradients come out equal on every rank of the cut, so they
are summed over ``edp`` only
(:class:`~simpar.parallel.expert.ExpertParallelMoE`).

The loss is the mean over the **global** token count, so these sums give exactly
the single-device gradient.  MoE auxiliary losses: each (dp rank, micro-batch) is
one routing group, weighted ``1/(dp·m)`` — the reference :class:`~simpar.nn.MoEGPT`
with ``groups = dp·m`` computes the same.  Gradient clipping uses the **global**
norm: every distinct gradient element counted once across all shards and groups.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np

from ..comm import Comm
from ..comm.mesh import Mesh
from ..nn import GPT
from ..nn.module import check_recompute
from ..nn.precision import HALF
from ..nn.moe_gpt import MoEGPT
from ..optim import clip_grad_norm
from .context import SCHEMES, check_context, chunk_positions, use_context_parallel
from .data import DEFAULT_BUCKET_BYTES, GradientBuckets, check_bucket_bytes
from .pipeline import PipelineStage, StepResult, make_schedule, partition, run_schedule
from .tensor.layers import check_divisible
from .tensor.mappings import allreduce_sequence_parallel_grads

__all__ = ["HybridModel", "build_model", "check_layout", "check_context_layout",
           "embedding_group", "split_batch"]


def check_layout(reference: GPT, mesh_config, schedule: str = "1f1b",
                 sequence_parallel: bool = False) -> None:
    """Every check that needs no message: the same ``ValueError`` on every rank."""
    c, cfg = reference.config, mesh_config
    if cfg.tp > 1:
        for what, n in (("hidden size d_model", c.d_model), ("n_head", c.n_head),
                        ("d_ff", c.d_ff)):
            check_divisible(what, n, cfg.tp)
        if sequence_parallel:
            check_divisible("seq_len", c.seq_len, cfg.tp)
    stages = cfg.pp * cfg.vpp
    if stages > c.n_layer:
        raise ValueError(f"pp={cfg.pp} x vpp={cfg.vpp} = {stages} pipeline stages but the "
                         f"model has n_layer={c.n_layer}: every stage needs a layer")
    if cfg.vpp > 1 and schedule != "interleaved":
        raise ValueError(f"vpp={cfg.vpp} model chunks per rank need schedule='interleaved', "
                         f"got {schedule!r}")
    if isinstance(reference, MoEGPT):
        n_experts = reference.config.n_experts
        if n_experts % cfg.ep:
            raise ValueError(f"n_experts={n_experts} is not divisible by ep={cfg.ep}")
    elif cfg.ep > 1:
        raise ValueError(f"ep={cfg.ep} needs a model with MoE layers (MoEGPT)")


def check_context_layout(reference: GPT, mesh_config, context_parallel: str = "ring",
                         cp_balanced: bool | None = None, sequence_parallel: bool = False,
                         seq: int | None = None) -> bool:
    """The context-parallel checks that need no message (sequence divisible by
    ``2·cp`` for the balanced ring or ``cp``, times ``tp`` under sequence
    parallelism; heads per tp rank divisible by ``cp`` for Ulysses).
    Returns whether the sequence is cut into load-balanced chunks."""
    c, cfg = reference.config, mesh_config
    if context_parallel not in SCHEMES:
        raise ValueError(f"context_parallel={context_parallel!r}: choose one of "
                         f"{', '.join(SCHEMES)}")
    balanced = (context_parallel == "ring") if cp_balanced is None else bool(cp_balanced)
    if cfg.cp == 1:
        return balanced
    seq = c.seq_len if seq is None else seq
    check_context(seq, cfg.cp, context_parallel, balanced, c.n_head // cfg.tp)
    if sequence_parallel and cfg.tp > 1:
        check_divisible(f"sequence length / cp = {seq} / {cfg.cp}", seq // cfg.cp, cfg.tp)
    return balanced


def embedding_group(mesh: Mesh, tied: bool) -> Comm | None:
    """The first and last pipeline rank of one (dp, tp) position, which both hold
    the tied ``wte`` (Megatron-LM's embedding group); ``None`` when not needed.
    Collective over the world (every rank calls it)."""
    cfg, c = mesh.config, mesh.coords
    if not tied or cfg.pp == 1:
        return None
    member = c.pp in (0, cfg.pp - 1)
    n = cfg.dp * cfg.cp * cfg.tp                       # (dp, cp, tp) positions
    color = (c.dp * cfg.cp + c.cp) * cfg.tp + c.tp if member else n + mesh.world.rank
    group = mesh.world.split(color, c.pp, name="embedding")
    return group if member else None


def split_batch(idx: np.ndarray, dp_rank: int, dp: int, m: int) -> list[np.ndarray]:
    """This data-parallel rank's rows of the global batch, cut into ``m`` micro-batches
    (contiguous: rank ``r`` holds rows ``[r·B/dp, (r+1)·B/dp)``)."""
    B = idx.shape[0]
    per = B // dp
    mine = idx[dp_rank * per:(dp_rank + 1) * per]
    return np.split(mine, m)


class HybridModel:
    """This rank's part of a model laid out on ``mesh`` (see the module docstring).

    Build it with :func:`build_model`.  ``stages`` maps each pipeline stage this
    rank holds to its :class:`~simpar.parallel.pipeline.PipelineStage`.
    """

    def __init__(self, reference: GPT, mesh: Mesh, *, context_parallel: str = "ring",
                 cp_balanced: bool | None = None, attention_block: int = 128,
                 schedule: str = "1f1b",
                 sequence_parallel: bool = False, partition_by="layers",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = False,
                 recompute: str | None = None) -> None:
        cfg = mesh.config
        self.cp_balanced = check_context_layout(reference, cfg, context_parallel, cp_balanced,
                                                sequence_parallel)
        check_layout(reference, cfg, schedule, sequence_parallel)
        # activation recomputation: "none" | "selective" | "full" (None: as the reference)
        self.recompute = check_recompute(getattr(reference.blocks[0], "recompute", "none")
                                         if recompute is None else recompute)
        self.bucket_bytes = check_bucket_bytes(bucket_bytes)
        self.mesh, self.config, self.schedule_name = mesh, reference.config, schedule
        self.sequence_parallel = bool(sequence_parallel) and cfg.tp > 1
        self.overlap = bool(overlap)
        n_stages = cfg.pp * cfg.vpp
        bounds = partition(reference, n_stages, partition_by)
        self.context = (context_parallel, self.cp_balanced, int(attention_block)) \
            if cfg.cp > 1 else None
        mesh.world.agree("context parallelism (cp; attention scheme, load balancing, tile)",
                         (cfg.cp, self.context))
        mesh.world.agree("hybrid layout (mesh, model, schedule, sequence parallel, layer "
                         "split, buckets, overlap, recompute)",
                         (cfg, repr(reference.config), schedule, self.sequence_parallel,
                          tuple((b.start, b.stop) for b in bounds), self.bucket_bytes,
                          self.overlap, self.recompute))
        mine = [s for s in range(n_stages) if s % cfg.pp == mesh.coords.pp]
        model = copy.deepcopy(reference) if cfg.tp == 1 else reference   # tp=1: pieces are its own
        tp = mesh.tp if cfg.tp > 1 or cfg.cp > 1 else None   # cp: tp pieces (1-rank tp)
        self.stages = {s: PipelineStage(model, s, n_stages, bounds[s], tp,
                                        self.sequence_parallel, mesh.ep) for s in mine}
        for st in self.stages.values():
            st.set_recompute(self.recompute)
        self.embedding = embedding_group(mesh, self.config.tie_weights)
        if self.context is not None:
            self._use_context_parallel()
        self._make_buckets()
        self._synced = False
        self._counted: dict[tuple[str, bool], bool] = {}     # counted_once, cached
        self.zero = None       # a ZeRO DistributedOptimizer (stages 1-3) sets itself here

    # --------------------------------------------------------- parameters
    def _unique(self, which: str) -> dict[str, np.ndarray]:
        out = {}
        for s in sorted(self.stages):
            for name, a in getattr(self.stages[s], which)().items():
                out.setdefault(name, a)
        return out

    def parameters(self) -> dict[str, np.ndarray]:
        """This rank's parameter shards, ``{reference name: live array}``."""
        return self._unique("parameters")

    def gradients(self) -> dict[str, np.ndarray]:
        return self._unique("gradients")

    def zero_grad(self) -> None:
        for g in self.gradients().values():
            g.fill(0)
        self._synced = False

    def moe_layers(self) -> list:
        return [m for s in sorted(self.stages) for m in self.stages[s].moe_layers()]

    def _expert_names(self) -> set[str]:
        return set().union(*(st.expert_parallel() for st in self.stages.values()))

    def _make_buckets(self) -> None:
        """Dense and expert gradients in backward order (last stage, last layer first)."""
        experts = self._expert_names()
        dense, expert = {}, {}
        for s in sorted(self.stages, reverse=True):
            for name, g in reversed(list(self.stages[s].gradients().items())):
                if name not in dense and name not in expert:
                    (expert if name in experts else dense)[name] = g
        self._holders = {}                        # name -> local stages holding it
        for st in self.stages.values():
            for name in st.parameters():
                self._holders[name] = self._holders.get(name, 0) + 1
        self._reports: dict[str, int] = {}
        self.buckets = [GradientBuckets(grads, comm, self.bucket_bytes, self.overlap)
                        for grads, comm in ((dense, self.mesh.dp_cp), (expert, self.mesh.edp))
                        if grads and comm.size > 1]

    # ------------------------------------------------------------ a step
    def step(self, idx, targets, micro_batches: int = 1, loss_scale: float = 1.0) -> dict:
        """Forward and backward of the **global** batch ``(B, s)`` (the same on
        every rank); gradients accumulate over the micro-batches and are summed
        over their groups once.  Returns ``{"loss", "ce", "aux", "result"}``: the
        global loss (cross-entropy + MoE auxiliary), the same on every rank.
        ``loss_scale``: the backward of ``S · loss`` (mixed precision's loss
        scaling; the gradients are ``S`` times the true ones, the loss is not)."""
        idx, targets = np.asarray(idx), np.asarray(targets)
        dp, m = self.mesh.config.dp, micro_batches
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"micro_batches must be a positive integer, got {m!r}")
        if idx.ndim != 2 or idx.shape != targets.shape:
            raise ValueError(f"idx {idx.shape} and targets {targets.shape} must both be "
                             f"(batch, seq)")
        if idx.shape[0] % (dp * m):
            raise ValueError(f"global batch size {idx.shape[0]} is not divisible by dp={dp} x "
                             f"micro_batches={m} = {dp * m}")
        if self._synced:
            raise RuntimeError("HybridModel.step() called again without zero_grad(): the "
                               "summed gradients would be summed again; accumulate with "
                               "micro_batches instead")
        if self.context is not None:              # before any message
            cp = self.mesh.config.cp
            check_context(idx.shape[1], cp, self.context[0], self.cp_balanced)
            if self.sequence_parallel:
                check_divisible(f"sequence length / cp = {idx.shape[1]} / {cp}",
                                idx.shape[1] // cp, self.mesh.config.tp)
        self.mesh.world.agree("global batch (token ids, the same on every rank)", idx)
        self.mesh.world.agree("global targets", targets)
        for layer in self.moe_layers():
            layer.aux_scale = loss_scale / (dp * m)   # one routing group per (dp rank, micro-batch)
        schedule = make_schedule(self.schedule_name, self.mesh.config.pp, m,
                                 self.mesh.config.vpp)
        r, n_tokens = self.mesh.coords.dp, targets.size   # the loss: mean over all tokens
        if self.context is not None:              # this cp rank's tokens of every sequence
            mine = chunk_positions(idx.shape[1], self.mesh.config.cp, self.mesh.coords.cp,
                                   self.cp_balanced)
            idx, targets = idx[:, mine], targets[:, mine]
        run = run_schedule if self.zero is None else self.zero.run_schedule   # ZeRO-3: gathers
        scaled = {} if loss_scale == 1.0 else {"loss_scale": loss_scale}
        if scaled and self.zero is not None:
            raise ValueError("loss scaling with a ZeRO optimizer is not supported yet")
        result = run(self.mesh.pp, schedule, self.stages, split_batch(idx, r, dp, m),
                              split_batch(targets, r, dp, m), loss_tokens=n_tokens,
                              grads_ready=self._ready, **scaled)
        self.sync_grads()
        share = 1.0 / (dp * self.mesh.config.cp)  # this rank's share of the tokens
        return self._global_loss(result, dp * m, share)

    def _use_context_parallel(self) -> None:
        """Every block's attention over ``mesh.cp``; the embedding adds the
        position rows of this rank's tokens."""
        scheme, balanced, tile = self.context
        cp, rank = self.mesh.cp, self.mesh.coords.cp
        for st in self.stages.values():
            for block in st.blocks:
                use_context_parallel(block, cp, scheme, balanced, tile)
            for layer in st.moe_layers():        # a routing group: the whole sequence
                layer.cut_sequence(cp, balanced)
            if st.is_first:
                st.model.cp_positions = \
                    lambda sl, P=cp.size: chunk_positions(sl * P, P, rank, balanced)

    def _ready(self, names: Sequence[str]) -> None:
        """A stage reports gradients final; a name held by several local stages (a
        tied ``wte`` when one rank holds the first and the last chunk) is final
        when every one of them has reported it."""
        done = []
        for name in names:
            self._reports[name] = self._reports.get(name, 0) + 1
            if self._reports[name] == self._holders[name]:
                done.append(name)
        for b in self.buckets:
            b.ready(done)

    def sync_grads(self) -> None:
        """Sum every gradient over the group that replicates it (table above)."""
        if self._synced:
            raise RuntimeError("gradients already summed this step (sync_grads twice): "
                               "call zero_grad() before the next step")
        self._synced = True
        self._reports.clear()
        for b in self.buckets if self.zero is None else ():   # dp (dense), edp (experts)
            b.finish()
        if self.embedding is not None:            # tied wte: first + last stage
            g = self.gradients()["wte"]
            self.embedding.all_reduce(g, out=g)
        if self.sequence_parallel:                # SP partial sums over tp
            sp = [g for s in sorted(self.stages) for g in self.stages[s].sequence_parallel_grads()]
            allreduce_sequence_parallel_grads(sp, self.mesh.tp)
            for st in self.stages.values():
                st.clear_sequence_parallel_pending()
        if self.zero is not None:                 # ZeRO: reduce-scatter into its shards
            self.zero.reduce_grads()

    def _global_loss(self, result: StepResult, groups: int, share: float) -> dict:
        """Cross-entropy (last stage) + auxiliary losses (every stage), counted
        once per tp group (and per cp group: every cp rank routes the whole
        sequence), summed over the world."""
        ce = result.loss * share if result.loss is not None else 0.0
        aux = sum(result.aux_losses.values()) / groups if self.mesh.coords.cp == 0 else 0.0
        mine = np.array([ce, aux]) if self.mesh.coords.tp == 0 else np.zeros(2)
        ce, aux = self.mesh.world.all_reduce(mine).tolist()
        return {"loss": ce + aux, "ce": ce, "aux": aux, "result": result}

    # ------------------------------------------------------- global norm
    def replicas(self, name: str) -> Comm:
        """The group whose ranks hold the same shard of ``name`` and sum its
        gradient (table above): ``edp`` for experts and routers, ``dp_cp`` (``dp``
        when ``cp = 1``) for dense parameters."""
        return self.mesh.edp if name in self._expert_names() else self.mesh.dp_cp

    def counted_once(self, name: str, *, data_replicas: bool = True) -> bool:
        """Whether this rank counts (and saves) its elements of ``name`` once for
        the whole model — the one rule of the global norm and of checkpoints:
        tp-replicated tensors on tp rank 0, MoE layers on cp rank 0 (routers also
        on ep rank 0), a tied ``wte`` on the first stage, and, with
        ``data_replicas``, rank 0 of :meth:`replicas` (ZeRO passes ``False``: its
        shard owner counts)."""
        key = (name, data_replicas)
        if key not in self._counted:
            c = self.mesh.coords
            once = not (name == "wte" and 0 not in self.stages)
            if name in self._expert_names():      # MoE layers: equal on every cp rank
                once = once and c.cp == 0 and (c.ep == 0 or not name.endswith("router.W"))
            if c.tp != 0:
                once = once and name in set().union(*(st.tp_sharded()
                                                      for st in self.stages.values()))
            if data_replicas:
                once = once and self.replicas(name).rank == 0
            self._counted[key] = once
        return self._counted[key]

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: every distinct element once
        (:meth:`counted_once`); one all-reduce over the world."""
        if self.zero is not None:                 # ZeRO: from the gradient shards
            return self.zero.grad_norm()
        total = 0.0
        for name, g in self.gradients().items():
            if self.counted_once(name):
                flat = g.ravel()
                if flat.dtype in HALF:            # 16-bit gradients: sum squares in float32
                    flat = flat.astype(np.float32)
                total += float(np.dot(flat, flat))
        return math.sqrt(float(self.mesh.world.all_reduce(np.array([total]))[0]))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale every shard so the global norm is at most ``max_norm``; the norm before."""
        if self.zero is not None:
            return self.zero.clip_grad_norm(max_norm)
        return clip_grad_norm(self.gradients(), max_norm, norm=self.grad_norm())

    # ------------------------------------------------ reference-shaped view
    def full_state(self, which: str = "params") -> dict[str, np.ndarray]:
        """Every parameter (or gradient) of the whole model at its reference shape,
        on every rank (collective over the world; a cold path for tests and
        checkpoints)."""
        if self.zero is not None:                 # ZeRO: the values live in the shards
            self.zero.materialize(which)
        local = {}
        for s in sorted(self.stages):
            st = self.stages[s]
            arrays = st.parameters() if which == "params" else st.gradients()
            for name, a in arrays.items():
                local[name] = st.full_tensor(name, a)
        merged = {}
        for part in self.mesh.world.gather_objects(local):
            for name, a in part.items():
                merged.setdefault(name, a)
        if self.zero is not None:
            self.zero.dematerialize(which)
        return merged


def build_model(reference: GPT, mesh: Mesh, **options) -> HybridModel:
    """This rank's part of ``reference`` laid out on ``mesh``; see :class:`HybridModel`
    for the options (``schedule``, ``sequence_parallel``, ``partition_by``,
    ``bucket_bytes``, ``overlap``, ``recompute``).  ``reference`` is left untouched."""
    return HybridModel(reference, mesh, **options)
