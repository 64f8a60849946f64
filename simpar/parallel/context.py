"""Context parallelism: the sequence split over ``cp`` ranks, attention exact.

Every layer of a transformer but attention works token by token, so cutting the
sequence over ``cp`` ranks cuts their work and activations by ``cp`` with no
communication at all.  Attention mixes tokens; two ways to keep it exact:

**Ring attention** (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context", §3, Alg. 1).  Each rank keeps its
queries and passes its keys and values round the ring; at step ``t`` rank ``r``
holds the K/V block of rank ``r − t`` and folds it into its running online
softmax (:mod:`simpar.nn.blockwise`)::

    for t = 0 … cp−1:                      (src = r − t mod cp)
        isend(KV, r+1); irecv(KV', r−1)    # next block travels …
        m, l, acc ← update(Q_r, KV_src)    # … while this one is computed
        KV ← KV'
    O_r = acc / l,  L_r = m + log l

``cp − 1`` K/V transfers per rank per forward, each hidden behind a block's
compute when ``2·b·(s/cp)·h`` bytes move faster than the block's
``O(b·(s/cp)²·h)`` FLOPs (the overlap shows on the simulated clock:
``figures/cp_ring_overlap.png``).  Backward passes K/V round the ring again and,
behind them, the partial ``dK, dV`` of each block, which arrive home after
``cp`` hops: ``cp − 1`` K/V and ``cp`` dK/dV transfers per rank.

**Causal load balancing** (Megatron-core context parallelism; Brandon et al.
2023, "Striped Attention", §3 discusses the same imbalance).  With the causal
mask, the rank holding the first ``s/cp`` tokens skips almost every block and
the last one skips none.  Cut the sequence into ``2·cp`` chunks and give rank
``i`` chunks ``i`` and ``2·cp − 1 − i``: every rank then does the same number of
tiles, ``(2cp − 1)n² + n(n + 1)`` for ``n`` tiles per chunk
(:func:`simpar.formulas.ring_attention_tiles`).

**Ulysses** (Jacobs et al. 2023, "DeepSpeed Ulysses", §3.1, Fig. 2).  An
all-to-all turns the sequence shards of ``q``, ``k``, ``v`` into head shards —
every rank then holds the **whole sequence** for ``heads/cp`` heads, runs
ordinary attention on them, and a second all-to-all turns the output back::

    q, k, v : (b, s/cp, h) ──all-to-all──► (b, s, h/cp) ──attention──► (b, s, h/cp)
                                                            ──all-to-all──► (b, s/cp, h)

4 all-to-alls forward (q, k, v, output) and 4 backward (their adjoints, in the
other direction), each moving ``(cp − 1)/cp`` of the ``b·(s/cp)·h`` a rank
holds; heads must be divisible by ``cp``.

Both schemes are exact: tested equal to plain attention in float64 (1e-10).
:class:`ContextParallelAttention` is the layer (QKV and output projections
around either core; composed with tensor parallelism, the heads are first split
over ``tp``); :func:`use_context_parallel` puts it into a transformer block, as
:func:`~simpar.parallel.hybrid.build_model` does for a mesh with ``cp > 1``.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .. import trace
from ..comm import Comm
from ..nn.blockwise import (DEFAULT_BLOCK, attention_tiles_backward, blockwise_attention_backward,
                            blockwise_attention_forward, causal_tile_flops, online_softmax_finish,
                            online_softmax_init, online_softmax_update)
from ..nn.functional import merge_heads, split_heads
from ..nn.module import frozen
from .sequence import all_gather_sequence, chunk_positions, gather_sequence, own_chunks
from .tensor.layers import TensorParallelModule

__all__ = ["SCHEMES", "check_context", "chunk_positions", "shard_sequence", "gather_sequence",
           "all_gather_sequence", "own_chunks",
           "ring_attention_forward", "ring_attention_backward", "seq_to_heads", "heads_to_seq",
           "ulysses_attention_forward", "ulysses_attention_backward", "ring_overlap",
           "ContextParallelAttention", "use_context_parallel"]

SCHEMES = ("ring", "ulysses")
TAG_KV, TAG_DKV = 71, 72          # ring messages: the K/V stream and the dK/dV stream


# ----------------------------------------------------------- the sequence cut
def check_context(seq: int, cp: int, scheme: str = "ring", balanced: bool = True,
                  n_head: int | None = None) -> None:
    """Every check that needs no message (the same ``ValueError`` on every rank)."""
    if scheme not in SCHEMES:
        raise ValueError(f"context-parallel attention scheme {scheme!r}: choose one of "
                         f"{', '.join(SCHEMES)}")
    if isinstance(cp, bool) or not isinstance(cp, (int, np.integer)) or cp < 1:
        raise ValueError(f"cp={cp!r} must be a positive integer")
    chunks = 2 * cp if balanced else cp
    if seq % chunks:
        why = (f"load-balanced context parallelism cuts the sequence into 2·cp = {chunks} "
               "chunks" if balanced else f"context parallelism cuts the sequence into cp = "
               f"{chunks} shards")
        raise ValueError(f"{why}: sequence length {seq} is not divisible by {chunks}")
    if scheme == "ulysses" and n_head is not None and n_head % cp:
        raise ValueError(f"Ulysses all-to-all splits the heads over cp: n_head={n_head} (per "
                         f"tensor-parallel rank) is not divisible by cp={cp}")


def shard_sequence(x: np.ndarray, cp: int, rank: int, balanced: bool = True,
                   axis: int = 1) -> np.ndarray:
    """This rank's tokens of ``x`` along ``axis`` (a copy), after the checks of
    :func:`check_context`."""
    check_context(x.shape[axis], cp, "ring", balanced)
    return np.take(x, chunk_positions(x.shape[axis], cp, rank, balanced), axis=axis)


# ------------------------------------------------------------- ring attention
def ring_attention_forward(q, k, v, n_head: int, cp: Comm, balanced: bool = True,
                           block: int = DEFAULT_BLOCK, name: str = "attn"):
    """Causal attention of this rank's tokens ``(b, s/cp, h)`` (positions from
    :func:`chunk_positions`) against the whole sequence, K/V round the ring.

    Returns ``(y, cache)``; the cache holds ``q, k, v`` (as given), ``O`` and the
    log-sum-exp ``L`` of this rank's rows — ``O(b·(s/cp)·h)``, no ``s²`` term."""
    b, sl, h = q.shape
    P, r = cp.size, cp.rank
    seq = sl * P
    scale = 1.0 / math.sqrt(h // n_head)
    pos = [chunk_positions(seq, P, i, balanced) for i in range(P)]
    qh = split_heads(q, n_head)
    state = online_softmax_init(qh)
    kv = np.stack([k, v])                                   # one message: (2, b, s/cp, h)
    for t in range(P):
        src = (r - t) % P
        if t < P - 1:                                       # the next block is on its way …
            send = cp.isend(kv, (r + 1) % P, TAG_KV)
            recv = cp.irecv(kv.shape, kv.dtype, (r - 1) % P, TAG_KV)
        kh, vh = split_heads(kv[0], n_head), split_heads(kv[1], n_head)
        flops = causal_tile_flops(qh.shape, pos[r], pos[src], block)
        with trace.compute(f"{name}.ring.forward", flops=flops, step=t, src=src):
            online_softmax_update(state, qh, kh, vh, scale, pos[r], pos[src], block)
        if t < P - 1:                                       # … while this one is computed
            kv = recv.wait()
            send.wait()
    o, lse = online_softmax_finish(state)
    return merge_heads(o), (q, k, v, o, lse, scale, balanced, block, name)


def ring_attention_backward(dy, cache, cp: Comm):
    """``(dq, dk, dv)`` of :func:`ring_attention_forward`: K/V travel the ring
    again; each block's partial ``dK, dV`` follows it and arrives home after
    ``cp`` hops (``cp − 1`` K/V and ``cp`` dK/dV transfers per rank)."""
    q, k, v, o, lse, scale, balanced, block, name = cache
    b, sl, h = q.shape
    n_head = o.shape[1]
    P, r = cp.size, cp.rank
    seq = sl * P
    pos = [chunk_positions(seq, P, i, balanced) for i in range(P)]
    qh, doh = split_heads(q, n_head), split_heads(dy, n_head)
    delta = (doh * o).sum(axis=-1)                          # D = rowsum(dO ∘ O)
    dq = np.zeros(qh.shape, dtype=dy.dtype)
    kv = np.stack([k, v])
    sends = []
    for t in range(P):
        src = (r - t) % P
        if t < P - 1:
            send = cp.isend(kv, (r + 1) % P, TAG_KV)
            recv = cp.irecv(kv.shape, kv.dtype, (r - 1) % P, TAG_KV)
        if t > 0:                                           # block src's dK/dV so far
            partial = cp.irecv(kv.shape, kv.dtype, (r - 1) % P, TAG_DKV)
        dkv = np.zeros_like(kv)
        kh, vh = split_heads(kv[0], n_head), split_heads(kv[1], n_head)
        flops = 2 * causal_tile_flops(qh.shape, pos[r], pos[src], block)
        with trace.compute(f"{name}.ring.backward", flops=flops, step=t, src=src):
            attention_tiles_backward(qh, kh, vh, doh, lse, delta, scale, pos[r], pos[src], dq,
                                     split_heads(dkv[0], n_head), split_heads(dkv[1], n_head),
                                     block)
        if t > 0:
            dkv += partial.wait()
        if P > 1:
            sends.append(cp.isend(dkv, (r + 1) % P, TAG_DKV))   # on to the next rank
        if t < P - 1:
            kv = recv.wait()
            send.wait()
    if P > 1:                                               # my own block, home after cp hops
        dkv = cp.irecv(kv.shape, kv.dtype, (r - 1) % P, TAG_DKV).wait()
    for s in sends:
        s.wait()
    return merge_heads(dq), np.ascontiguousarray(dkv[0]), np.ascontiguousarray(dkv[1])


# ------------------------------------------------------------------- Ulysses
def seq_to_heads(x: np.ndarray, cp: Comm) -> np.ndarray:
    """All-to-all ``(b, s/cp, h)`` sequence shard → ``(b, s, h/cp)`` head shard:
    rank ``j`` gets the hidden columns of head group ``j`` of every rank's tokens
    (rank order = sequence chunk order).  Its adjoint is :func:`heads_to_seq`."""
    b, sl, h = x.shape
    P = cp.size
    send = np.ascontiguousarray(x.reshape(b, sl, P, h // P).transpose(2, 0, 1, 3))
    got, _ = cp.all_to_all(send, [1] * P)                   # (P, b, s/cp, h/cp)
    return got.transpose(1, 0, 2, 3).reshape(b, P * sl, h // P)


def heads_to_seq(y: np.ndarray, cp: Comm) -> np.ndarray:
    """All-to-all ``(b, s, h/cp)`` head shard → ``(b, s/cp, h)`` sequence shard;
    the inverse (and adjoint) of :func:`seq_to_heads`."""
    b, s, hp = y.shape
    P = cp.size
    send = np.ascontiguousarray(y.reshape(b, P, s // P, hp).transpose(1, 0, 2, 3))
    got, _ = cp.all_to_all(send, [1] * P)                   # (P, b, s/cp, h/cp)
    return got.transpose(1, 2, 0, 3).reshape(b, s // P, P * hp)


def ulysses_attention_forward(q, k, v, n_head: int, cp: Comm, balanced: bool = False,
                              block: int = DEFAULT_BLOCK, name: str = "attn"):
    """Causal attention of sequence shards ``(b, s/cp, h)`` by two all-to-alls
    around ordinary (blockwise) attention on ``n_head/cp`` heads of the whole
    sequence.  Returns ``(y, cache)``."""
    P = cp.size
    check_context(q.shape[1] * P, P, "ulysses", balanced, n_head)
    seq = q.shape[1] * P
    pos = np.concatenate([chunk_positions(seq, P, i, balanced) for i in range(P)])
    qg, kg, vg = (seq_to_heads(a, cp) for a in (q, k, v))   # 3 all-to-alls
    heads = n_head // P
    flops = causal_tile_flops((qg.shape[0], heads, seq, qg.shape[2] // heads), pos, pos, block)
    with trace.compute(f"{name}.ulysses.forward", flops=flops):
        y, inner = blockwise_attention_forward(qg, kg, vg, heads, block, positions=pos)
    return heads_to_seq(y, cp), (inner, flops, name)         # the 4th


def ulysses_attention_backward(dy, cache, cp: Comm):
    """``(dq, dk, dv)``: the adjoint all-to-alls in reverse order, 4 in all."""
    inner, flops, name = cache
    dyg = seq_to_heads(dy, cp)
    with trace.compute(f"{name}.ulysses.backward", flops=2 * flops):
        grads = blockwise_attention_backward(dyg, inner)
    return tuple(heads_to_seq(g, cp) for g in grads)


def ring_overlap(events, link) -> dict:
    """How much of the ring's communication the block compute hid, from one rank's
    events on the simulated clock: ``transfer`` = Σ ``α + n·β`` of the messages
    received (over ``link``), ``exposed`` = the part the receiver waited for
    (its ``recv`` events), ``hidden = 1 − exposed / transfer``; ``imbalance`` =
    idle time waiting for a peer that had not sent yet (a late sender)."""
    from ..formulas import p2p_time
    recvs = [e for e in events if e.category == "comm" and e.name == "recv"]
    transfer = sum(p2p_time(e.nbytes, link) for e in recvs)
    exposed = sum(e.sim_end - e.sim_start for e in recvs)
    idle = sum(e.sim_end - e.sim_start for e in events
               if e.category == "idle" and e.name == "wait recv")
    return {"messages": len(recvs), "transfer": transfer, "exposed": exposed,
            "hidden": 1.0 - exposed / transfer if transfer else 1.0, "imbalance": idle}


# ---------------------------------------------------------------- the layer
class ContextParallelAttention(TensorParallelModule):
    """Causal self-attention of this rank's share of the sequence: ``qkv`` and
    ``proj`` (the reference's :class:`~simpar.nn.layers.Linear` pieces, or the
    tensor-parallel column/row pieces over ``tp``) around a ring or Ulysses core
    over ``cp``.  Input and output ``(b, s/cp, h)`` (under sequence parallelism
    ``(b, s/(cp·tp), h)``); parameter names are those of the attention it
    replaces (``qkv.W``, ``qkv.b``, ``proj.W``, ``proj.b``).

    What is saved for backward, elements per rank (``sl = s/cp``, ``hl = h/tp``,
    ``a`` heads): the QKV input ``b·sl·h``; ``q, k, v`` ``3·b·sl·hl``; the core's
    output ``O`` ``b·sl·hl`` and log-sum-exp ``b·(a/tp)·sl``; the projection's
    input ``b·sl·hl`` — all falling as ``1/cp``
    (:func:`simpar.formulas.context_attention_activation_elements`); plain
    attention keeps ``a·b·s²`` probabilities on top.
    """

    def __init__(self, qkv, proj, h: int, n_head: int, cp: Comm, scheme: str = "ring",
                 tp: Comm | None = None, sequence_parallel: bool = False,
                 balanced: bool | None = None, block: int = DEFAULT_BLOCK,
                 trace_name: str = "attn") -> None:
        super().__init__(tp, sequence_parallel)
        t = 1 if tp is None else tp.size
        balanced = (scheme == "ring") if balanced is None else bool(balanced)
        if scheme not in SCHEMES:
            raise ValueError(f"context-parallel attention scheme {scheme!r}: choose one of "
                             f"{', '.join(SCHEMES)}")
        if scheme == "ulysses" and (n_head // t) % cp.size:
            raise ValueError(f"Ulysses all-to-all splits the heads over cp: n_head={n_head}"
                             + (f" / tp={t} = {n_head // t} heads per tensor-parallel rank"
                                if t > 1 else "") + f" is not divisible by cp={cp.size}")
        self.h, self.n_head, self.cp, self.scheme = h, n_head, cp, scheme
        self.h_local, self.n_head_local = h // t, n_head // t
        self.balanced, self.block, self.trace_name = balanced, int(block), trace_name
        self.qkv = self.add_child("qkv", qkv)
        self.proj = self.add_child("proj", proj)
        cp.agree("context-parallel attention (scheme, load balancing, block, heads, hidden)",
                 (scheme, balanced, self.block, n_head, h))

    @classmethod
    def from_reference(cls, attn, cp: Comm, scheme: str = "ring", balanced: bool | None = None,
                       block: int = DEFAULT_BLOCK) -> "ContextParallelAttention":
        """From a reference :class:`~simpar.nn.CausalSelfAttention` (copies of its
        ``qkv`` and ``proj`` with zero gradients; the reference is left untouched)."""
        qkv, proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
        for m in (qkv, proj):
            m.zero_grad()
            m._saved.clear()          # a copy: its records were never on this ledger
        return cls(qkv, proj, attn.h, attn.n_head, cp, scheme, balanced=balanced, block=block)

    @classmethod
    def from_parallel(cls, attn, cp: Comm, scheme: str = "ring", balanced: bool | None = None,
                      block: int = DEFAULT_BLOCK) -> "ContextParallelAttention":
        """Around the very ``qkv``/``proj`` pieces of a tensor-parallel
        :class:`~simpar.parallel.tensor.attention.ParallelAttention`."""
        return cls(attn.qkv, attn.proj, attn.h, attn.n_head, cp, scheme, attn.tp,
                   attn.sequence_parallel, balanced, block, attn.trace_name)

    def full_tensor(self, name, local):
        return local.copy()

    def forward(self, x, key=0):
        hl = self.h_local
        qkv = self.qkv.forward(x, key)                      # (b, s/cp, 3h/t)
        q, k, v = qkv[..., :hl], qkv[..., hl:2 * hl], qkv[..., 2 * hl:]
        if self.scheme == "ring":
            y, c = ring_attention_forward(q, k, v, self.n_head_local, self.cp, self.balanced,
                                          self.block, self.trace_name)
            self._save(key, q=q, k=k, v=v, o=c[3], lse=c[4], rest=c[5:])
        else:
            y, c = ulysses_attention_forward(q, k, v, self.n_head_local, self.cp, self.balanced,
                                             self.block, self.trace_name)
            qh, kh, vh, o, lse = c[0][:5]
            self._save(key, q=qh, k=kh, v=vh, o=o, lse=lse, rest=(c[0][5:], *c[1:]))
        return self.proj.forward(frozen(y), key)

    def backward(self, dy, key=0):
        return self.backward_pass(dy, key, weights=True)

    def backward_pass(self, dy, key=0, *, weights: bool = True):
        """Backward of the projections and the core; ``weights=False`` (the
        zero-bubble ``I``) leaves the projections' weight gradients for
        :meth:`backward_weights`."""
        hl = self.h_local
        dy = _child_backward(self.proj, dy, key, weights)
        s = self._pop(key)
        if self.scheme == "ring":
            grads = ring_attention_backward(dy, (s["q"], s["k"], s["v"], s["o"], s["lse"],
                                                 *s["rest"]), self.cp)
        else:
            inner, *rest = s["rest"]
            grads = ulysses_attention_backward(
                dy, ((s["q"], s["k"], s["v"], s["o"], s["lse"], *inner), *rest), self.cp)
        dqkv = np.empty(dy.shape[:-1] + (3 * hl,), dtype=dy.dtype)
        for i, g in enumerate(grads):
            dqkv[..., i * hl:(i + 1) * hl] = g
        return _child_backward(self.qkv, dqkv, key, weights)

    def flops(self, batch: int, seq: int) -> float:
        """The projections' FLOPs (the core records its own compute regions)."""
        return float(sum(c.flops(batch, seq) for c in self.children.values()))


def _child_backward(m, dy, key, weights: bool):
    if hasattr(m, "backward_pass"):
        return m.backward_pass(dy, key, weights=weights)
    if not weights:
        raise ValueError(f"{type(m).__name__} cannot defer its weight gradients")
    return m.backward(dy, key)


def use_context_parallel(block, cp: Comm, scheme: str = "ring", balanced: bool | None = None,
                         tile: int = DEFAULT_BLOCK):
    """Swap the attention of a transformer block (reference or tensor-parallel)
    for a :class:`ContextParallelAttention` over ``cp``, in place; returns the block."""
    attn = block.attn
    if hasattr(attn, "tp"):
        new = ContextParallelAttention.from_parallel(attn, cp, scheme, balanced, tile)
    else:
        new = ContextParallelAttention(attn.qkv, attn.proj, attn.h, attn.n_head, cp, scheme,
                                       balanced=balanced, block=tile,
                                       trace_name=f"{getattr(block, 'trace_name', 'block')}.attn")
    block.attn = block.children["attn"] = new
    return block
