"""Cutting a GPT into pipeline stages.

Stage ``s`` of ``n`` runs a contiguous range of transformer blocks; the first stage
also runs the embedding (``wte``, ``wpe``), the last also the final LayerNorm, the
LM head and — in the executor — the loss::

    stage 0: embedding + blocks[0:k0]   stage 1: blocks[k0:k1]   …   last: blocks[…] + ln_f + head

The model is a composition of layers ``f_L ∘ … ∘ f_1``, and stage ``s`` holds
one contiguous cell of it, ``F_s = f_{k_s} ∘ … ∘ f_{k_{s−1}+1}``, with cost
``C_s = Σ_{l ∈ s} c_l`` (Huang et al. 2019, GPipe, §2); the step time is set by
the largest ``C_s``.

:func:`partition` chooses the ranges: as equal as possible in **layer count**, or
in **parameter count** (embedding and head included), or given explicitly; uneven
splits are fine, a stage without any block is not.

A :class:`PipelineStage` is cut from a reference :class:`~simpar.nn.GPT` built
with the same seed on every rank: it holds the very block objects of that model
and shares its parameter and gradient arrays, under the reference's names
(``blocks.3.attn.qkv.W``), so gradients can be compared by name.  (For clarity
every rank builds the whole model first; only the stage's pieces are ever used.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from typing import Callable

from ...comm import Comm
from ...nn import GPT
from ...nn import functional as Fn
from ...nn.functional import linear_flops as F_linear_flops
from ...nn.module import Module
from ...nn.moe_gpt import MoETransformerBlock
from ..expert import ExpertParallelMoE
from ..tensor import (ColumnParallelLinear, ParallelGPT, ParallelTransformerBlock,
                      RowParallelLinear, TensorParallelModule, agree_structure,
                      vocab_parallel_cross_entropy, vocab_parallel_cross_entropy_backward)
from .schedules import Schedule

BY = ("layers", "params")


def stage_param_counts(model: GPT, bounds: Sequence[range]) -> list[int]:
    """Parameters held by each stage for the given block ranges."""
    counts = []
    last = len(bounds) - 1
    for s, rng in enumerate(bounds):
        n = sum(model.blocks[i].num_parameters() for i in rng)
        if s == 0:
            n += model.params["wte"].size + model.params["wpe"].size
        if s == last:
            n += model.ln_f.num_parameters()
            n += model.lm_head.num_parameters() if model.lm_head is not None else 0
        counts.append(n)
    return counts


def partition(model: GPT, n_stages: int, by: str | Sequence[int] = "layers") -> list[range]:
    """Block ranges of ``n_stages`` stages.

    ``by="layers"``: layer counts differ by at most one, the earlier stages take the
    extra layers (the last stage also carries the LM head).  ``by="params"``: the
    contiguous split minimising the largest stage's parameter count (embedding and
    head included; exact, by dynamic programming).  A sequence of ints: the layer
    count of each stage, e.g. ``[3, 2, 2]``.
    """
    L = len(model.blocks)
    if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 1:
        raise ValueError(f"n_stages must be a positive integer, got {n_stages!r}")
    if n_stages > L:
        raise ValueError(f"cannot cut a GPT of n_layer={L} into {n_stages} pipeline stages: "
                         f"every stage needs at least one layer")
    if isinstance(by, str):
        if by not in BY:
            raise ValueError(f"partition by={by!r}: choose 'layers', 'params' or a list of "
                             f"layer counts")
        sizes = _even(L, n_stages) if by == "layers" else _balanced_params(model, n_stages)
    else:
        sizes = [int(k) for k in by]
        if len(sizes) != n_stages or sum(sizes) != L or min(sizes) < 1:
            raise ValueError(f"layer counts {list(by)} must be {n_stages} positive integers "
                             f"summing to n_layer={L}")
    bounds, lo = [], 0
    for k in sizes:
        bounds.append(range(lo, lo + k))
        lo += k
    return bounds


def _even(L: int, n: int) -> list[int]:
    q, r = divmod(L, n)
    return [q + (1 if s < r else 0) for s in range(n)]


def _balanced_params(model: GPT, n: int) -> list[int]:
    """Linear partition: minimise the largest stage (ties: the earliest such split)."""
    L = len(model.blocks)
    w = [b.num_parameters() for b in model.blocks]
    head = model.ln_f.num_parameters() + (model.lm_head.num_parameters()
                                          if model.lm_head is not None else 0)
    emb = model.params["wte"].size + model.params["wpe"].size
    prefix = np.concatenate([[0], np.cumsum(w)])

    def cost(s: int, i: int, j: int) -> int:           # stage s holds blocks [i, j)
        return int(prefix[j] - prefix[i]) + (emb if s == 0 else 0) + (head if s == n - 1 else 0)

    INF = float("inf")
    # best[s][j]: smallest max-cost of stages 0..s holding blocks [0, j)
    best = [[INF] * (L + 1) for _ in range(n)]
    arg = [[0] * (L + 1) for _ in range(n)]
    for j in range(1, L + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, n):
        for j in range(s + 1, L + 1):
            for i in range(s, j):
                c = max(best[s - 1][i], cost(s, i, j))
                if c < best[s][j]:
                    best[s][j], arg[s][j] = c, i
    sizes, j = [], L
    for s in range(n - 1, 0, -1):
        i = arg[s][j]
        sizes.append(j - i)
        j = i
    sizes.append(j)
    return sizes[::-1]


class PipelineStage(Module):
    """Stage ``index`` of ``n_stages``: the embedding (first stage), the blocks in
    ``layers``, and ``ln_f`` + LM head + loss (last stage) of ``model``.

    Two ways to cut it, one interface:

    * ``tp=None`` — the pieces are the reference's own modules: the stage holds
      the very block objects of ``model`` and shares its parameter and gradient
      arrays (pass a model of this rank's own; :func:`~simpar.parallel.hybrid.build_model`
      passes a copy);
    * ``tp=<Comm>`` — the pieces are **tensor-parallel** cuts of the reference
      over ``tp`` (:class:`~simpar.parallel.tensor.ParallelTransformerBlock`, the
      vocab-parallel ends of :class:`~simpar.parallel.tensor.ParallelGPT`), with
      ``sequence_parallel`` as an option: then the activations passed between
      stages are sequence shards ``(b, s/t, h)``, as in Megatron-LM.

    MoE blocks of a :class:`~simpar.nn.MoEGPT` get an
    :class:`~simpar.parallel.expert.ExpertParallelMoE` over ``ep`` (a size-1
    group when ``ep`` is ``None``), its auxiliary loss weighted by ``aux_scale``.

    ``forward(x, key)`` takes token ids on the first stage and hidden states
    elsewhere; it returns hidden states, or logits (this rank's vocabulary
    columns under tp) on the last stage, whose :meth:`loss_forward` /
    :meth:`loss_backward` compute the cross-entropy.  ``backward(dy, key)``
    returns the gradient of the stage's input (``None`` on the first stage).
    :meth:`backward_input` / :meth:`backward_weights` are the zero-bubble
    ``I``/``W`` split (Qi et al. 2023, §2), with reference and tensor-parallel
    pieces alike: two explicit calls, as the ZB-H1 schedule's ``I`` and ``W``.
    """

    def __init__(self, model: GPT, index: int, n_stages: int, layers: range,
                 tp: Comm | None = None, sequence_parallel: bool = False,
                 ep: Comm | None = None, aux_scale: float = 1.0) -> None:
        super().__init__()
        if not 0 <= index < n_stages:
            raise ValueError(f"stage index {index} outside [0, {n_stages})")
        if sequence_parallel and tp is None:
            raise ValueError("sequence_parallel needs a tensor-parallel group tp")
        self.index, self.n_stages, self.layers = index, n_stages, layers
        self.config = model.config              # message shapes: (b, s, d_model), model dtype
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.tp, self.sequence_parallel = tp, bool(sequence_parallel)
        self.tied = bool(model.config.tie_weights)
        if tp is None:
            ends, blocks = model, [_moe_cut(model.blocks[i], ep, aux_scale) for i in layers]
        else:
            ends = ParallelGPT.from_reference(model, tp, sequence_parallel, layers=(),
                                              agree=False)
            blocks = [ParallelTransformerBlock.from_reference(
                model.blocks[i], tp, sequence_parallel, ep=ep, aux_scale=aux_scale, agree=False)
                for i in layers]
            agree_structure(tp, f"pipeline stage {index}", [ends, *blocks])   # one exchange
        self.model = ends if (self.is_first or self.is_last) else None
        own = (["wte", "wpe"] if self.is_first else []) + \
            (["wte"] if self.is_last and self.tied and not self.is_first else [])
        for name in own:                    # share the ends' arrays: live, same names
            self.params[name], self.grads[name] = ends.params[name], ends.grads[name]
        self.blocks = [self.add_child(f"blocks.{i}", b) for i, b in zip(layers, blocks)]
        if self.is_last:
            self.add_child("ln_f", ends.ln_f)
            if ends.lm_head is not None:
                self.add_child("lm_head", ends.lm_head)

    def __repr__(self) -> str:
        parts = (["embedding"] if self.is_first else []) + \
            [f"blocks[{self.layers.start}:{self.layers.stop}]"] + (["head"] if self.is_last else [])
        return f"PipelineStage({self.index}/{self.n_stages}: {' + '.join(parts)})"

    # ------------------------------------------------------------ shapes
    def message_shape(self, batch: int, seq: int) -> tuple:
        """Shape of the activation this stage sends on (and of its gradient):
        ``(b, s, h)``, or the sequence shard ``(b, s/t, h)`` under SP."""
        if self.sequence_parallel:
            return (batch, seq // self.tp.size, self.config.d_model)
        return (batch, seq, self.config.d_model)

    def piece_names(self) -> dict[str, list[str]]:
        """Parameter names by piece, in backward order: ``head``, ``blocks.{i}``
        (last to first), ``embedding`` — what :meth:`backward` reports ready."""
        names = list(self.parameters())
        pieces = {}
        if self.is_last:
            pieces["head"] = [n for n in names if n.startswith(("ln_f.", "lm_head."))] + \
                (["wte"] if self.tied and not self.is_first else [])
        for i in reversed(self.layers):
            pieces[f"blocks.{i}"] = [n for n in names if n.startswith(f"blocks.{i}.")]
        if self.is_first:
            pieces["embedding"] = ["wte", "wpe"]
        if self.is_first and self.is_last and self.tied:
            pieces["embedding"] = ["wpe"]
            pieces["head"].append("wte")     # both uses on one stage: final after the head
        return pieces

    # ----------------------------------------------------------- compute
    def forward(self, x, key=0):
        if self.is_first:
            x = self.model.embed_forward(x, key)
        for block in self.blocks:
            x = block.forward(x, key)
        if self.is_last:
            x = self.model.head_forward(x, key)
        return x

    def backward(self, dy, key=0, grads_ready: Callable[[list[str]], None] | None = None):
        """Input gradient of the stage and all its weight gradients;
        ``grads_ready(names)`` is told, piece by piece, which gradients are
        complete (data parallelism's overlap hook)."""
        return self.backward_pass(dy, key, weights=True, grads_ready=grads_ready)

    def backward_input(self, dy, key=0):
        """The zero-bubble ``I``: the stage's input gradient; the linear layers'
        weight gradients wait for :meth:`backward_weights` (``W``)."""
        return self.backward_pass(dy, key, weights=False)

    def backward_pass(self, dy, key=0, *, weights: bool = True,
                      grads_ready: Callable[[list[str]], None] | None = None):
        # no gradient is complete before W when weights=False: grads_ready waits for W
        ready = (grads_ready if weights else None) or _ignore
        pieces = self.piece_names() if grads_ready and weights else {}
        if self.is_last:
            dy = self.model.head_backward(dy, key, weights=weights)
            if not (self.is_first and self.tied):
                ready(pieces.get("head", []))
        for i, block in zip(reversed(self.layers), reversed(self.blocks)):
            dy = block.backward_pass(dy, key, weights=weights)
            ready(pieces.get(f"blocks.{i}", []))
        if self.is_first:
            self.model.embed_backward(dy, key)  # weight gradient only, computed at once
            ready(pieces.get("embedding", []) + (pieces.get("head", []) if self.is_last
                                                  and self.tied else []))
            return None
        return dy

    def backward_weights(self, key=0, grads_ready: Callable[[list[str]], None] | None = None
                         ) -> None:
        """The zero-bubble ``W`` of ``key``: every weight gradient
        :meth:`backward_input` left; then ``grads_ready`` hears of all of them."""
        if self.is_last:
            self.model.head_backward_weights(key)
        for block in reversed(self.blocks):
            block.backward_weights(key)
        if grads_ready:
            grads_ready(list(self.parameters()))

    # -------------------------------------------------------------- loss
    def loss_forward(self, logits, targets):
        """Mean cross-entropy of this micro-batch (vocab-parallel under tp):
        ``(loss, cache)``."""
        if self.tp is None:
            return Fn.cross_entropy(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size, self.tp)

    def loss_backward(self, cache, dloss: float):
        if self.tp is None:
            return Fn.cross_entropy_backward(cache, dloss)
        return vocab_parallel_cross_entropy_backward(cache, dloss)

    def aux_loss(self, key) -> float:
        """Sum of this stage's MoE auxiliary losses in the forward of ``key``."""
        return float(sum(m.stats[key].aux_loss for m in self.moe_layers()))

    def moe_layers(self) -> list:
        return [m for _, m in self.named_modules() if isinstance(m, ExpertParallelMoE)]

    # ------------------------------------------------- parallel bookkeeping
    def sequence_parallel_grads(self) -> list[np.ndarray]:
        """Gradients that are partial sums over this rank's tokens under SP."""
        if not self.sequence_parallel:
            return []
        out = [self.grads["wpe"]] if self.is_first else []
        if self.is_last:
            out += [self.children["ln_f"].grads[n] for n in ("gamma", "beta")]
        for b in self.blocks:
            out += b.sequence_parallel_grads()
        return out

    def clear_sequence_parallel_pending(self) -> None:
        for _, m in self.named_modules():
            if isinstance(m, TensorParallelModule):
                m._grads_pending = False

    def tp_sharded(self) -> set[str]:
        """Names of parameters split over ``tp`` (the rest is replicated over it)."""
        if self.tp is None:
            return set()
        out = {n for n in ("wte",) if n in self.params}
        for full, m, n in self._walk():
            if isinstance(m, ColumnParallelLinear) or (isinstance(m, RowParallelLinear)
                                                       and n == "W"):
                out.add(full)
        return out

    def expert_parallel(self) -> set[str]:
        """Names of parameters inside expert-parallel layers (summed over ``edp``)."""
        prefixes = [name + "." for name, m in self.named_modules()
                    if isinstance(m, ExpertParallelMoE)]
        return {n for n in self.parameters() if n.startswith(tuple(prefixes))} \
            if prefixes else set()

    def full_tensor(self, name: str, local: np.ndarray) -> np.ndarray:
        """Reference-shaped tensor of a stage parameter (a tp collective)."""
        for full, m, n in self._walk():
            if full == name:
                if m is self and self.model is not None:
                    m, n = self.model, name
                if isinstance(m, TensorParallelModule):
                    return m.full_tensor(n, local)
                return local.copy()
        raise KeyError(name)

    def saved_keys(self) -> list:
        keys = super().saved_keys()
        if self.model is not None:               # the embedding / head records of the ends
            keys += [k for k in self.model.saved_keys() if k not in keys]
        return keys

    def flops(self, batch: int, seq: int) -> float:
        head = 0.0
        if self.is_last:
            head = self.model.head_flops(batch, seq) if self.tp is None else \
                F_linear_flops(batch * seq, self.config.d_model,
                               self.model.params["wte"].shape[0] if self.tied
                               else self.model.lm_head.params["W"].shape[1])
        return sum(b.flops(batch, seq) for b in self.blocks) + head


def _ignore(names) -> None:
    return None


def _moe_cut(block, ep: Comm | None, aux_scale: float):
    """A reference block, with its MoE layer (if any) made expert-parallel over ``ep``."""
    if isinstance(block, MoETransformerBlock) and ep is not None:
        block.replace_moe(ExpertParallelMoE.from_reference(block.moe, ep, aux_scale))
    return block


def build_stages(model: GPT, n_stages: int, by: str | Sequence[int] = "layers"
                 ) -> list[PipelineStage]:
    """All ``n_stages`` stages of ``model`` (a rank keeps the ones it holds)."""
    return [PipelineStage(model, s, n_stages, rng)
            for s, rng in enumerate(partition(model, n_stages, by))]


def stages_for_rank(model: GPT, schedule: Schedule, rank: int,
                    by: str | Sequence[int] = "layers") -> dict[int, PipelineStage]:
    """``{stage: PipelineStage}`` of the stages ``rank`` holds in ``schedule``
    (stage ``s`` on rank ``s % p``)."""
    return {s: PipelineStage(model, s, schedule.n_stages, layers)
            for s, layers in enumerate(partition(model, schedule.n_stages, by))
            if schedule.rank_of(s) == rank}
