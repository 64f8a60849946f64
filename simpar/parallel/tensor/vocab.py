"""The vocabulary split over the tp group: embedding lookup and cross-entropy.

The vocabulary ``V`` is padded to ``V_pad = t·⌈V/t⌉`` and rank ``i`` owns the rows
(embedding) or columns (logits) ``[i·V_pad/t, (i+1)·V_pad/t)``; the padding sits
at the end of the last rank(s) and is never looked up nor allowed into the loss.

* **Embedding** (Megatron-LM §3): each rank looks up the ids that fall in its
  range and writes zeros for the others; the sum over ranks (``g``: all-reduce, or
  a reduce-scatter along the sequence under sequence parallelism) is the lookup.
* **Cross-entropy** on logit shards, never gathering the ``(b, s, V)`` logits:
  ``loss = log Σ_v exp(z_v − m) − (z_target − m)`` needs only three sums over the
  vocabulary, each a ``(b·s)``-sized all-reduce: the max ``m`` (for stability),
  the target logit (held by exactly one rank) and ``Σ exp``.  The loss is the
  mean over all ``b·s`` tokens — every rank holds every token.
"""
from __future__ import annotations

import numpy as np

from ... import trace
from ...comm import Comm
from ...nn import Embedding
from ...nn.layers import check_ids
from ...nn.precision import mixed
from .layers import TensorParallelModule, pad_along, padded_size, shard
from .mappings import (reduce_from_tp_region, reduce_from_tp_region_backward,
                       reduce_scatter_to_sp_region, reduce_scatter_to_sp_region_backward)


def vocab_range(vocab_size: int, tp: Comm) -> tuple[int, int, int]:
    """``(start, n_real, n_local)``: this rank's first vocabulary id, how many of its
    ``n_local = V_pad / t`` rows are real (the rest is padding; may be 0)."""
    n_local = padded_size(vocab_size, tp.size) // tp.size
    start = tp.rank * n_local
    return start, int(np.clip(vocab_size - start, 0, n_local)), n_local


# -------------------------------------------------------------------- embedding
def embedding_shard_forward(ids: np.ndarray, table: np.ndarray, start: int):
    """Rows of my shard ``table`` for the ids in ``[start, start + len(table))``,
    zeros for the others.  Returns ``(y, local ids, mask of my ids)``."""
    local = ids - start
    mine = (local >= 0) & (local < table.shape[0])
    local = np.where(mine, local, 0)
    y = table[local]
    y[~mine] = 0.0
    return y, local, mine


@mixed(inplace=(3,))
def embedding_shard_backward(dy: np.ndarray, local: np.ndarray, mine: np.ndarray,
                             dtable: np.ndarray) -> None:
    """Scatter-add ``dy`` of my ids into ``dtable`` (repeated ids add up)."""
    np.add.at(dtable, local[mine], dy[mine])


class VocabParallelEmbedding(TensorParallelModule):
    """``y = W[ids]`` with the rows of ``W`` (``V × h``) split over ``tp``.

    Output: replicated ``(b, s, h)`` after an all-reduce, or with
    ``sequence_parallel`` this rank's sequence shard ``(b, s/t, h)`` after a
    reduce-scatter (Korthikanti et al. 2022 §4.2.2).
    """

    settings = ("vocab_size", "h", "sequence_parallel")

    def __init__(self, vocab_size: int, h: int, tp: Comm, sequence_parallel: bool = False,
                 dtype=np.float64, trace_name: str = "embedding") -> None:
        super().__init__(tp, sequence_parallel)
        self.vocab_size, self.h, self.trace_name = vocab_size, h, trace_name
        self.start, _, n_local = vocab_range(vocab_size, tp)
        self.add_param("W", np.zeros((n_local, h), dtype))
        self.agree()

    @classmethod
    def from_reference(cls, emb: Embedding, tp: Comm, sequence_parallel: bool = False,
                       trace_name: str = "embedding") -> "VocabParallelEmbedding":
        """Cut this rank's rows (zero-padded) from a reference :class:`~simpar.nn.Embedding`."""
        W = emb.params["W"]
        m = cls(emb.vocab, emb.h, tp, sequence_parallel, W.dtype, trace_name)
        m.params["W"][...] = shard_vocab(W, tp)
        return m

    def full_tensor(self, name, local):
        return self.tp.all_gather(local, axis=0)[:self.vocab_size]

    def forward(self, ids, key=0):
        ids = np.asarray(ids)
        check_ids(ids, self.vocab_size)
        with trace.compute(f"{self.trace_name}.forward"):
            y, local, mine = embedding_shard_forward(ids, self.params["W"], self.start)
        self._save(key, local=local, mine=mine)
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(y, self.tp)
        return reduce_from_tp_region(y, self.tp)

    def backward_pass(self, dy, key=0, *, weights=True):
        """Scatter-add into this rank's rows (no GEMM: done by ``I`` too)."""
        if self.sequence_parallel:
            dy = reduce_scatter_to_sp_region_backward(dy, self.tp)
        else:
            dy = reduce_from_tp_region_backward(dy, self.tp)
        s = self._pop(key)
        with trace.compute(f"{self.trace_name}.backward"):
            embedding_shard_backward(dy, s["local"], s["mine"], self.grads["W"])
        return None


def shard_vocab(table: np.ndarray, tp: Comm) -> np.ndarray:
    """This rank's rows of a ``(V, h)`` table, padded with zero rows to ``V_pad``."""
    full = pad_along(table, 0, padded_size(table.shape[0], tp.size))
    return shard(full, 0, tp.rank, tp.size)


# ---------------------------------------------------------------- cross-entropy
@mixed(keep={(1,)})
def vocab_parallel_cross_entropy(logits: np.ndarray, targets: np.ndarray, vocab_size: int,
                                 tp: Comm):
    """Mean cross-entropy over all tokens from this rank's logit columns.

    ``logits``: ``(..., V_pad/t)``, this rank's vocabulary shard (see
    :func:`vocab_range`); ``targets``: ids ``(...)`` in ``[0, V)``.  Returns
    ``(loss, cache)`` with ``loss`` a Python float, the same on every rank.
    """
    start, n_real, n_local = vocab_range(vocab_size, tp)
    if logits.shape[-1] != n_local:
        raise ValueError(f"logits have {logits.shape[-1]} vocabulary columns; a shard of "
                         f"V={vocab_size} over tp={tp.size} has {n_local}")
    t = np.asarray(targets).reshape(-1)
    check_ids(t, vocab_size)
    z = logits.reshape(-1, n_local)[:, :n_real]        # the padding never enters
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: {t.shape[0]} targets for {z.shape[0]} tokens")
    rows = np.arange(t.shape[0])
    # 1. m = max over the whole vocabulary (for a stable exp)
    m = z.max(axis=1) if n_real else np.full(z.shape[0], -np.inf, z.dtype)
    m = tp.all_reduce(np.ascontiguousarray(m), op="max")
    z = z - m[:, None]
    # 2. the target's logit z_t − m: one rank holds it, the others add 0
    local_t = t - start
    mine = (local_t >= 0) & (local_t < n_real)
    local_t = np.where(mine, local_t, 0)
    picked = np.where(mine, z[rows, local_t] if n_real else 0.0, 0.0).astype(z.dtype)
    picked = tp.all_reduce(picked)
    # 3. Σ exp(z − m) over the whole vocabulary
    np.exp(z, out=z)
    sumexp = tp.all_reduce(np.ascontiguousarray(z.sum(axis=1)))
    loss = float(np.mean(np.log(sumexp) - picked, dtype=np.float64))
    z /= sumexp[:, None]                               # my columns of softmax(z)
    return loss, (z, local_t, mine, logits.shape)


def vocab_parallel_cross_entropy_backward(cache, dloss: float = 1.0) -> np.ndarray:
    """My logit columns' gradient: ``dloss · (softmax − onehot(target)) / N``; the
    padding columns get exactly zero."""
    p, local_t, mine, shape = cache
    n = local_t.shape[0]
    d = np.zeros((n, shape[-1]), dtype=p.dtype)
    d[:, :p.shape[1]] = p
    d[np.arange(n)[mine], local_t[mine]] -= 1.0
    d *= float(dloss) / n
    return d.reshape(shape)
