"""Cutting a GPT into pipeline stages.

Stage ``s`` of ``n`` runs a contiguous range of transformer blocks; the first stage
also runs the embedding (``wte``, ``wpe``), the last also the final LayerNorm, the
LM head and — in the executor — the loss::

    stage 0: embedding + blocks[0:k0]   stage 1: blocks[k0:k1]   …   last: blocks[…] + ln_f + head

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

from ...nn import GPT, defer_weight_grads
from ...nn.module import Module
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
    ``layers``, and ``ln_f`` + LM head (last stage) of ``model``.

    ``forward(x, key)`` takes token ids on the first stage and hidden states
    ``(b, s, h)`` elsewhere; it returns hidden states, or logits on the last stage.
    ``backward(dy, key)`` returns the gradient of the stage's input (``None`` on the
    first stage).  Under :func:`~simpar.nn.defer_weight_grads` the backward leaves
    the weight gradients for :meth:`backward_weights` (zero-bubble ``I``/``W``).
    """

    def __init__(self, model: GPT, index: int, n_stages: int, layers: range) -> None:
        super().__init__()
        if not 0 <= index < n_stages:
            raise ValueError(f"stage index {index} outside [0, {n_stages})")
        self.index, self.n_stages, self.layers = index, n_stages, layers
        self.config = model.config              # message shapes: (b, s, d_model), model dtype
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.model = model if (self.is_first or self.is_last) else None
        if model.config.tie_weights and n_stages > 1:
            raise ValueError("pipeline stages need untied embeddings (tie_weights=False): "
                             "wte would live on the first and the last stage")
        if self.is_first:                   # share the reference's arrays: live, same names
            for name in ("wte", "wpe"):
                self.params[name], self.grads[name] = model.params[name], model.grads[name]
        self.blocks = [self.add_child(f"blocks.{i}", model.blocks[i]) for i in layers]
        if self.is_last:
            self.add_child("ln_f", model.ln_f)
            if model.lm_head is not None:
                self.add_child("lm_head", model.lm_head)

    def __repr__(self) -> str:
        parts = (["embedding"] if self.is_first else []) + \
            [f"blocks[{self.layers.start}:{self.layers.stop}]"] + (["head"] if self.is_last else [])
        return f"PipelineStage({self.index}/{self.n_stages}: {' + '.join(parts)})"

    def forward(self, x, key=0):
        if self.is_first:
            x = self.model.embed_forward(x, key)
        for block in self.blocks:
            x = block.forward(x, key)
        if self.is_last:
            x = self.model.head_forward(x, key)
        return x

    def backward(self, dy, key=0):
        if self.is_last:
            dy = self.model.head_backward(dy, key)
        for block in reversed(self.blocks):
            dy = block.backward(dy, key)
        if self.is_first:
            self.model.embed_backward(dy, key)  # weight gradient only, computed at once
            return None
        return dy

    def backward_weights(self, key=0) -> None:
        if self.is_last:
            self.model.head_backward_weights(key)
        for block in reversed(self.blocks):
            block.backward_weights(key)

    def backward_input(self, dy, key=0):
        """The zero-bubble ``I``: :meth:`backward` with weight gradients deferred."""
        with defer_weight_grads():
            return self.backward(dy, key)

    def saved_keys(self) -> list:
        keys = super().saved_keys()
        if self.model is not None:               # the embedding / head records of the GPT
            keys += [k for (slot, k) in self.model._saved if k not in keys]
        return keys

    def flops(self, batch: int, seq: int) -> float:
        return sum(b.flops(batch, seq) for b in self.blocks) + \
            (self.model.head_flops(batch, seq) if self.is_last else 0.0)


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
