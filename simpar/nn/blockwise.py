"""Blockwise attention with the online softmax: attention without the ``s × s`` matrix.

Plain attention (:func:`~simpar.nn.functional.causal_attention_forward`) builds the
scores ``S = QKᵀ/√d`` of every query against every key and keeps the
probabilities ``P = softmax(S)`` for backward: ``a·b·s²`` numbers.  Blockwise
attention visits the keys and values in tiles and keeps, per query row, only a
running maximum ``m``, a running sum ``l`` and an unnormalised output ``acc``
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", Alg. 3;
Dao et al. 2022, FlashAttention, Alg. 1).  For each tile ``j`` of keys::

    S_j  = Q K_jᵀ / √d   (+ causal mask: −∞ where key position > query position)
    m'   = max(m, rowmax(S_j))
    l'   = e^{m − m'} · l + rowsum(e^{S_j − m'})
    acc' = e^{m − m'} · acc + e^{S_j − m'} V_j

and at the end ``O = acc / l`` and ``L = m + log l`` (the log-sum-exp of each
row).  Backward keeps only ``O`` and ``L``, recomputes each tile's
probabilities ``P_j = e^{S_j − L}`` and, with ``D = rowsum(dO ∘ O)``
(Dao et al. 2022, Alg. 4; FlashAttention-2, Dao 2023, §3.1.2)::

    dV_j += P_jᵀ dO      dP_j = dO V_jᵀ      dS_j = P_j ∘ (dP_j − D)
    dQ   += dS_j K_j / √d                    dK_j += dS_jᵀ Q / √d

Tiles are ``block × block`` (queries × keys), so no score array larger than
``block²`` per head ever exists; a tile whose keys all lie after all its queries
is skipped (it is entirely masked), which is how causal attention does about
half the work.  ``block`` need not divide ``s``: the last tile is smaller.

Masking is by **positions**, not by index: every function takes the global
position of each query and key, so the same code serves a whole sequence (the
reference), a contiguous shard, or the two load-balanced chunks of ring
attention (:mod:`simpar.parallel.context`), whose keys arrive from other ranks.

The lower-level pieces — :func:`online_softmax_init`, :func:`online_softmax_update`,
:func:`online_softmax_finish` and :func:`attention_tiles_backward` — work on
head-split arrays ``(b, heads, s, d)``; :func:`blockwise_attention_forward` and
:func:`blockwise_attention_backward` are drop-in equals of the plain pair on
``(b, s, h)`` arrays.  Every function returns the FLOPs it did (matmuls only,
``2·`` per multiply-add, as everywhere in simpar; backward counted as twice the
forward's tiles by the project's convention, although recomputing ``S`` makes it
five matmuls to the forward's two).

Each score tile is reported to the memory ledger (category ``"attention
scores"``) while it exists, so a test can read the largest one off the peak.
"""
from __future__ import annotations

import math

import numpy as np

from .. import trace
from .functional import merge_heads, split_heads

__all__ = ["DEFAULT_BLOCK", "online_softmax_init", "online_softmax_update",
           "online_softmax_finish", "attention_tiles_backward", "causal_tile_flops",
           "blockwise_attention_forward", "blockwise_attention_backward", "tile_flops"]

DEFAULT_BLOCK = 128
SCORES = "attention scores"          # ledger category of the transient score tiles


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"attention block size must be a positive integer, got {block!r}")
    return int(block)


def _tiles(n: int, block: int):
    for i in range(0, n, block):
        yield slice(i, min(i + block, n))


def _visibility(qp: np.ndarray, kp: np.ndarray):
    """``"none"`` (every key after every query: skip), ``"all"`` (no key after any
    query: no mask needed) or the boolean mask ``key position > query position``."""
    if kp.min() > qp.max():
        return "none"
    if kp.max() <= qp.min():
        return "all"
    return kp[None, :] > qp[:, None]


def tile_flops(b: int, heads: int, nq: int, nk: int, d: int) -> float:
    """The two matmuls of one forward tile, ``QKᵀ`` and ``PV``: ``4·b·heads·nq·nk·d``."""
    return 4.0 * b * heads * nq * nk * d


def causal_tile_flops(q_shape, q_pos, k_pos, block: int = DEFAULT_BLOCK) -> float:
    """Forward FLOPs :func:`online_softmax_update` does for queries of shape
    ``(b, heads, sq, d)`` at ``q_pos`` against keys at ``k_pos``: the tiles not
    skipped, without computing them (for a compute region's FLOPs up front)."""
    b, n, _, d = q_shape
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    total = 0.0
    for qs in _tiles(len(q_pos), block):
        qmax = q_pos[qs].max()
        for ks in _tiles(len(k_pos), block):
            if k_pos[ks].min() <= qmax:
                total += tile_flops(b, n, qs.stop - qs.start, ks.stop - ks.start, d)
    return total


# ------------------------------------------------------------------- forward
def online_softmax_init(qh: np.ndarray):
    """Empty running state ``(m, l, acc)`` for queries ``qh`` ``(b, heads, sq, d)``:
    ``m = −∞``, ``l = 0``, ``acc = 0``."""
    b, n, sq, d = qh.shape
    return (np.full((b, n, sq), -np.inf, dtype=qh.dtype), np.zeros((b, n, sq), dtype=qh.dtype),
            np.zeros((b, n, sq, d), dtype=qh.dtype))


def online_softmax_update(state, qh, kh, vh, scale: float, q_pos, k_pos,
                          block: int = DEFAULT_BLOCK) -> float:
    """Fold the keys/values ``kh``, ``vh`` ``(b, heads, sk, d)`` at positions
    ``k_pos`` into the running ``state`` of queries ``qh`` at ``q_pos`` (causal:
    a query sees keys at positions ≤ its own).  Updates ``state`` in place;
    returns the FLOPs done (skipped tiles cost nothing)."""
    m, l, acc = state
    b, n, _, d = qh.shape
    flops = 0.0
    for qs in _tiles(qh.shape[2], block):
        q = qh[:, :, qs] * scale
        mq, lq, aq = m[:, :, qs], l[:, :, qs], acc[:, :, qs]
        for ks in _tiles(kh.shape[2], block):
            vis = _visibility(q_pos[qs], k_pos[ks])
            if isinstance(vis, str) and vis == "none":
                continue
            s = q @ kh[:, :, ks].transpose(0, 1, 3, 2)          # (b, n, bq, bk)
            trace.alloc(SCORES, s.nbytes)
            if not isinstance(vis, str):
                s[:, :, vis] = -np.inf
            m_new = np.maximum(mq, s.max(axis=-1))
            safe = np.where(m_new == -np.inf, 0.0, m_new)     # rows with nothing seen yet
            alpha = np.exp(mq - safe)
            np.exp(s - safe[..., None], out=s)                 # P̃ = e^{S − m'}
            lq *= alpha
            lq += s.sum(axis=-1)
            aq *= alpha[..., None]
            aq += s @ vh[:, :, ks]
            mq[...] = m_new
            trace.free(SCORES, s.nbytes)
            flops += tile_flops(b, n, s.shape[2], s.shape[3], d)
    return flops


def online_softmax_finish(state):
    """``O = acc / l`` and the log-sum-exp ``L = m + log l`` of every row."""
    m, l, acc = state
    return acc / l[..., None], m + np.log(l)


# ------------------------------------------------------------------ backward
def attention_tiles_backward(qh, kh, vh, doh, lse, delta, scale: float, q_pos, k_pos,
                             dq, dk, dv, block: int = DEFAULT_BLOCK) -> float:
    """Gradient contributions of the pairs (queries ``qh`` at ``q_pos``, keys
    ``kh``/``vh`` at ``k_pos``), **added** into ``dq`` (shape of ``qh``) and ``dk``,
    ``dv`` (shape of ``kh``).  ``lse``: the queries' log-sum-exp over *all* their
    keys; ``delta = rowsum(dO ∘ O)``.  Returns the FLOPs (twice the forward's)."""
    b, n, _, d = qh.shape
    flops = 0.0
    for qs in _tiles(qh.shape[2], block):
        q = qh[:, :, qs] * scale
        do, L, D = doh[:, :, qs], lse[:, :, qs, None], delta[:, :, qs, None]
        dqq = dq[:, :, qs]
        for ks in _tiles(kh.shape[2], block):
            vis = _visibility(q_pos[qs], k_pos[ks])
            if isinstance(vis, str) and vis == "none":
                continue
            k, v = kh[:, :, ks], vh[:, :, ks]
            p = q @ k.transpose(0, 1, 3, 2)
            trace.alloc(SCORES, 2 * p.nbytes)
            if not isinstance(vis, str):
                p[:, :, vis] = -np.inf
            p -= L
            np.exp(p, out=p)                                   # P = e^{S − L}
            dv[:, :, ks] += p.transpose(0, 1, 3, 2) @ do
            ds = do @ v.transpose(0, 1, 3, 2)                  # dP
            ds -= D
            ds *= p                                            # dS = P ∘ (dP − D)
            dqq += (ds @ k) * scale
            dk[:, :, ks] += ds.transpose(0, 1, 3, 2) @ q       # q already carries 1/√d
            trace.free(SCORES, 2 * p.nbytes)
            flops += 2 * tile_flops(b, n, p.shape[2], p.shape[3], d)
    return flops


# --------------------------------------------- drop-in equals of the plain pair
def blockwise_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                                block: int = DEFAULT_BLOCK, positions=None):
    """Causal multi-head attention of ``(b, s, h)`` inputs, tile by tile; equal to
    :func:`~simpar.nn.functional.causal_attention_forward`.  ``positions`` (default
    ``0..s−1``) are the tokens' places in the sequence.  Returns ``(y, cache)``,
    the cache ``(qh, kh, vh, O, L, 1/√d, positions, block)`` — ``O(b·s·h)``, no
    ``s²`` term."""
    block = _check_block(block)
    b, s, h = q.shape
    scale = 1.0 / math.sqrt(h // n_head)
    pos = np.arange(s) if positions is None else np.asarray(positions)
    qh, kh, vh = (split_heads(a, n_head) for a in (q, k, v))
    state = online_softmax_init(qh)
    online_softmax_update(state, qh, kh, vh, scale, pos, pos, block)
    o, lse = online_softmax_finish(state)
    return merge_heads(o), (qh, kh, vh, o, lse, scale, pos, block)


def blockwise_attention_backward(dy: np.ndarray, cache):
    """Gradients ``(dq, dk, dv)`` of :func:`blockwise_attention_forward`."""
    qh, kh, vh, o, lse, scale, pos, block = cache
    doh = split_heads(dy, qh.shape[1])
    delta = (doh * o).sum(axis=-1)
    dq, dk, dv = (np.zeros(a.shape, dtype=dy.dtype) for a in (qh, kh, vh))
    attention_tiles_backward(qh, kh, vh, doh, lse, delta, scale, pos, pos, dq, dk, dv, block)
    return merge_heads(dq), merge_heads(dk), merge_heads(dv)
