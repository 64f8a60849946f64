"""Pure forward/backward pairs of the layers of a GPT, with no state.

Every function here takes arrays and returns arrays; nothing is remembered between
calls.  A forward that needs to hand something to its backward returns it as a
``cache`` (a tuple), which the stateful modules of :mod:`simpar.nn.module` keep per
micro-batch.  Shapes follow the project convention: activations ``(batch, seq,
hidden)``, a linear weight is ``(in, out)`` so a layer computes ``Y = X @ W + b``.

dtype is never changed: float32 in, float32 out.  Constants are Python floats, which
NumPy 2 (NEP 50) treats as "weak" scalars that take the array's dtype; an
``np.float64`` constant would silently upcast a float32 computation.

The ``*_flops`` helpers count **matmul FLOPs only** (one multiply-add = 2 FLOPs);
element-wise work (GELU, softmax, LayerNorm) is ignored, as in Narayanan et al.
2021, appendix.  By convention the backward pass costs twice the forward.
"""
from __future__ import annotations

import math

import numpy as np

from ..formulas import attention_flops, linear_flops  # noqa: F401  (one definition)

__all__ = [
    "linear_forward", "linear_backward", "linear_backward_input", "linear_backward_weight",
    "gelu", "gelu_backward",
    "layernorm_forward", "layernorm_backward",
    "softmax", "softmax_backward",
    "causal_attention_forward", "causal_attention_backward",
    "embedding_forward", "embedding_backward",
    "cross_entropy", "cross_entropy_backward",
    "linear_flops", "attention_flops",
]


# ---------------------------------------------------------------------- linear
def linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``y = x @ W + b`` for ``x`` of shape ``(..., n_in)`` and ``W`` of ``(n_in, n_out)``.

    The leading dimensions are flattened so the product is one large GEMM.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ W
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1])


def linear_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray):
    """Gradients of ``y = x @ W + b``; returns ``(dx, dW, db)``.

    ``dx = dy @ Wᵀ``, ``dW = xᵀ @ dy`` and ``db = Σ dy`` (sums over every leading
    dimension: batch and sequence).
    """
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = (dy2 @ W.T).reshape(x.shape)
    dW = x2.T @ dy2
    db = dy2.sum(axis=0)
    return dx, dW, db


def linear_backward_input(dy: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The input half of :func:`linear_backward`: ``dx = dy @ Wᵀ``."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ W.T).reshape(dy.shape[:-1] + (W.shape[0],))


def linear_backward_weight(dy: np.ndarray, x: np.ndarray):
    """The weight half of :func:`linear_backward`: ``(dW, db) = (xᵀ @ dy, Σ dy)``."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return x.reshape(-1, x.shape[-1]).T @ dy2, dy2.sum(axis=0)


# ------------------------------------------------------------ blocked loops
# Element-wise chains (GELU, LayerNorm, softmax) run over blocks of about
# _BLOCK elements so that every pass after the first hits the CPU cache instead of
# main memory; this is what keeps the non-matmul work small next to the GEMMs.
_BLOCK = 1 << 15


def _blocks(n: int, size: int):
    """Slices ``[i, i + size)`` covering ``range(n)``."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1)


# ------------------------------------------------------------------------ GELU
_GELU_C = math.sqrt(2.0 / math.pi)   # √(2/π)
_GELU_A = 0.044715


def _gelu_tanh(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = tanh(√(2/π)(x + 0.044715 x³))``."""
    np.multiply(x, x, out=out)              # x²
    out *= _GELU_C * _GELU_A
    out += _GELU_C                          # c(1 + a x²)
    out *= x                                # c(x + a x³)
    return np.tanh(out, out=out)


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation: ``0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))``."""
    xf = _flat(x)
    y = np.empty_like(xf)
    t = np.empty(min(_BLOCK, xf.size), dtype=xf.dtype)
    for sl in _blocks(xf.size, _BLOCK):
        xs, ts = xf[sl], t[:sl.stop - sl.start]
        _gelu_tanh(xs, ts)
        ts += 1.0
        ts *= 0.5
        np.multiply(ts, xs, out=y[sl])
    return y.reshape(x.shape)


def gelu_backward(dy: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``dx = dy · gelu'(x)`` with ``t = tanh(u)``, ``u = √(2/π)(x + 0.044715 x³)``:

    ``gelu'(x) = 0.5 (1 + t) + 0.5 x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²)``.
    ``out`` (contiguous, shape of ``x``; may be ``dy`` itself) receives ``dx``.
    """
    xf, dyf = _flat(x), _flat(dy)
    if out is not None and not out.flags.c_contiguous:
        raise ValueError("gelu_backward: 'out' must be C-contiguous")
    dx = np.empty_like(xf) if out is None else out.reshape(-1)
    n = min(_BLOCK, xf.size)
    t, g, u = (np.empty(n, dtype=xf.dtype) for _ in range(3))
    for sl in _blocks(xf.size, _BLOCK):
        m = sl.stop - sl.start
        xs, ts, gs, us = xf[sl], t[:m], g[:m], u[:m]
        _gelu_tanh(xs, ts)
        np.multiply(xs, xs, out=gs)         # g = 0.5 x c (1 + 3 a x²)
        gs *= 3.0 * _GELU_A * _GELU_C
        gs += _GELU_C
        gs *= xs
        gs *= 0.5
        np.multiply(ts, ts, out=us)         # 1 − t²
        np.subtract(1.0, us, out=us)
        gs *= us
        ts += 1.0                           # + 0.5 (1 + t)
        ts *= 0.5
        gs += ts
        np.multiply(gs, dyf[sl], out=dx[sl])
    return dx.reshape(x.shape)


# ------------------------------------------------------------------- LayerNorm
def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """``y = γ · x̂ + β`` with ``x̂ = (x − μ) / √(σ² + ε)`` over the last axis.

    Returns ``(y, cache)``; the cache holds ``x̂`` and ``1/√(σ² + ε)`` (not ``x``)
    and ``γ``.
    """
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    xhat, y = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty((x2.shape[0], 1), dtype=x2.dtype)
    for sl in _blocks(x2.shape[0], max(1, _BLOCK // h)):
        xs, xh, ys, r = x2[sl], xhat[sl], y[sl], rstd[sl]
        np.subtract(xs, xs.mean(axis=1, keepdims=True), out=xh)
        np.multiply(xh, xh, out=ys)         # y as scratch for (x − μ)²
        np.sum(ys, axis=1, keepdims=True, out=r)
        r *= 1.0 / h
        r += eps
        np.sqrt(r, out=r)
        np.divide(1.0, r, out=r)
        xh *= r
        np.multiply(xh, gamma, out=ys)
        ys += beta
    shape = x.shape
    return y.reshape(shape), (xhat.reshape(shape), rstd.reshape(shape[:-1] + (1,)), gamma)


def layernorm_backward(dy: np.ndarray, cache):
    """Gradients of LayerNorm; returns ``(dx, dgamma, dbeta)``.

    With ``g = dy · γ``: ``dx = (g − mean(g) − x̂ · mean(g · x̂)) / √(σ² + ε)``,
    ``dγ = Σ dy · x̂``, ``dβ = Σ dy`` (sums over all leading dimensions).
    """
    xhat, rstd, gamma = cache
    h = xhat.shape[-1]
    dy2, xh2, r2 = dy.reshape(-1, h), xhat.reshape(-1, h), rstd.reshape(-1, 1)
    dx = np.empty_like(xh2)
    dgamma = np.zeros(h, dtype=dx.dtype)
    dbeta = np.zeros(h, dtype=dx.dtype)
    rows = max(1, _BLOCK // h)
    scratch = np.empty((min(rows, xh2.shape[0]), h), dtype=dx.dtype)
    for sl in _blocks(xh2.shape[0], rows):
        dys, xh, dxs = dy2[sl], xh2[sl], dx[sl]
        tmp = scratch[:dxs.shape[0]]
        np.multiply(dys, xh, out=tmp)
        dgamma += tmp.sum(axis=0)
        dbeta += dys.sum(axis=0)
        np.multiply(dys, gamma, out=dxs)    # g
        m1 = dxs.sum(axis=1, keepdims=True)
        m1 *= 1.0 / h                       # mean(g)
        np.multiply(dxs, xh, out=tmp)
        m2 = tmp.sum(axis=1, keepdims=True)
        m2 *= 1.0 / h                       # mean(g x̂)
        np.multiply(xh, m2, out=tmp)
        dxs -= tmp
        dxs -= m1
        dxs *= r2[sl]
    return dx.reshape(xhat.shape), dgamma, dbeta


# --------------------------------------------------------------------- softmax
def _softmax_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax of ``x`` in place (``x`` is overwritten and returned)."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    r = x.sum(axis=axis, keepdims=True)
    x *= np.divide(1.0, r, out=r)           # one division per row, then multiplies
    return x


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``softmax(x)ᵢ = exp(xᵢ − max x) / Σⱼ exp(xⱼ − max x)`` along ``axis``."""
    return _softmax_(np.array(x, copy=True), axis)


def _softmax_backward_(dy: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """``softmax_backward`` that overwrites ``dy`` with the result."""
    s = np.multiply(dy, y).sum(axis=axis, keepdims=True)
    dy -= s
    dy *= y
    return dy


def softmax_backward(dy: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Given ``y = softmax(x)``: ``dx = y · (dy − Σ dy · y)`` along ``axis``."""
    return _softmax_backward_(np.array(dy, copy=True), y, axis)


# ------------------------------------------------------------------- attention
_MASKS: dict = {}


def _causal_mask(s: int, dtype) -> np.ndarray:
    """``(s, s)`` additive mask: 0 on and below the diagonal, −∞ above (cached)."""
    k = (s, np.dtype(dtype))
    m = _MASKS.get(k)
    if m is None:
        m = np.zeros((s, s), dtype=dtype)
        m[np.triu_indices(s, 1)] = -np.inf
        m.flags.writeable = False
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[k] = m
    return m


def _split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """``(b, s, h)`` → ``(b, n_head, s, h/n_head)``, a view (heads are contiguous)."""
    b, s, h = x.shape
    return x.reshape(b, s, n_head, h // n_head).transpose(0, 2, 1, 3)


def _heads_view(out: np.ndarray, n_head: int) -> np.ndarray:
    """:func:`_split_heads` of an output array, guaranteed to be a view into it."""
    view = _split_heads(out, n_head)
    if not np.shares_memory(view, out):     # reshape had to copy: writes would be lost
        raise ValueError("attention: output array cannot be viewed as heads without a copy")
    return view


# Attention runs over groups of (batch, heads) whose s × s scores fill about
# _ATT_BLOCK elements, so that the mask, the softmax and the second product find
# the scores in cache.  (Computing only the lower block triangle of the scores, as
# causality allows, was tried: the smaller GEMMs run slower, and the net gain, about
# 2% of a training step, did not pay for the extra loops.)
_ATT_BLOCK = 1 << 19


def _head_groups(b: int, n_head: int, s: int):
    """``(batch index, slice of heads)`` groups of about ``_ATT_BLOCK`` scores."""
    g = max(1, min(n_head, _ATT_BLOCK // (s * s)))
    for i in range(b):
        for j in range(0, n_head, g):
            yield i, slice(j, min(j + g, n_head))


def causal_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int):
    """Multi-head causal self-attention on ``(b, s, h)`` queries, keys and values.

    Head ``i`` is the slice ``[i·d, (i+1)·d)`` of the hidden axis, ``d = h / n_head``.
    Per head: ``P = softmax(q kᵀ / √d + M)`` with ``M`` = −∞ above the diagonal,
    ``y = P v``; heads are concatenated back to ``(b, s, h)``.  Returns
    ``(y, cache)``; the cache holds ``P`` (``(b, n_head, s, s)``) and per-head
    *views* of ``q``, ``k``, ``v`` (a caller that may overwrite its inputs must keep
    copies).
    """
    b, s, h = q.shape
    d = h // n_head
    scale = 1.0 / math.sqrt(d)
    qh, kh, vh = (_split_heads(a, n_head) for a in (q, k, v))   # (b, nh, s, d) views
    att = np.empty((b, n_head, s, s), dtype=q.dtype)
    y = np.empty((b, s, h), dtype=q.dtype)
    yh = _split_heads(y, n_head)
    mask = _causal_mask(s, q.dtype)
    for i, hs in _head_groups(b, n_head, s):
        p = att[i, hs]
        np.matmul(qh[i, hs] * scale, kh[i, hs].transpose(0, 2, 1), out=p)
        p += mask
        _softmax_(p)
        np.matmul(p, vh[i, hs], out=yh[i, hs])
    return y, (qh, kh, vh, att, scale)


def causal_attention_backward(dy: np.ndarray, cache, out=None):
    """Gradients of :func:`causal_attention_forward`; returns ``(dq, dk, dv)``.

    Per head, with ``S = q kᵀ/√d + M`` and ``P = softmax(S)``:
    ``dv = Pᵀ dy``, ``dP = dy vᵀ``, ``dS = P (dP − Σ dP · P)``,
    ``dq = dS k / √d``, ``dk = dSᵀ q / √d``.  Masked entries have ``P = 0`` and so
    get no gradient.  ``out`` may give three ``(b, s, h)`` arrays (e.g. views of one
    ``(b, s, 3h)`` buffer) to write the results into.
    """
    qh, kh, vh, att, scale = cache
    b, n_head, s, d = qh.shape
    if out is None:
        out = tuple(np.empty((b, s, n_head * d), dtype=dy.dtype) for _ in range(3))
    dqh, dkh, dvh = (_heads_view(o, n_head) for o in out)
    dyh = _split_heads(dy, n_head)
    g = max(1, min(n_head, _ATT_BLOCK // (s * s)))
    scratch = np.empty((g, s, s), dtype=dy.dtype)
    for i, hs in _head_groups(b, n_head, s):
        p, dyb = att[i, hs], dyh[i, hs]
        ds = scratch[:p.shape[0]]
        np.matmul(p.transpose(0, 2, 1), dyb, out=dvh[i, hs])          # dv = Pᵀ dy
        np.matmul(dyb, vh[i, hs].transpose(0, 2, 1), out=ds)          # dP = dy vᵀ
        _softmax_backward_(ds, p)                                     # dS
        np.matmul(ds, kh[i, hs], out=dqh[i, hs])                      # dq = dS k / √d
        dqh[i, hs] *= scale
        np.matmul(ds.transpose(0, 2, 1), qh[i, hs], out=dkh[i, hs])   # dk = dSᵀ q / √d
        dkh[i, hs] *= scale
    return tuple(out)




# ------------------------------------------------------------------- embedding
def embedding_forward(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row lookup: ``y[..., :] = table[ids[...], :]``."""
    return table[ids]


def embedding_backward(dy: np.ndarray, ids: np.ndarray, vocab_size: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Scatter-add: ``dtable[v] = Σ_{positions p with ids[p] = v} dy[p]``.

    Repeated ids must add up, which ``dtable[ids] += dy`` would not do;
    ``np.add.at`` is the unbuffered scatter-add.  With ``out`` the rows are added
    into ``out`` (a gradient accumulator) instead of a fresh zero table.
    """
    h = dy.shape[-1]
    dtable = np.zeros((vocab_size, h), dtype=dy.dtype) if out is None else out
    np.add.at(dtable, ids.reshape(-1), dy.reshape(-1, h))
    return dtable


# --------------------------------------------------------------- cross-entropy
def cross_entropy(logits: np.ndarray, targets: np.ndarray):
    """Mean over all tokens of ``−log softmax(logits)[target]``.

    Computed as ``logsumexp(z) − z[target]`` with ``logsumexp(z) = m + log Σ exp(z − m)``,
    ``m = max z``, which never overflows.  Returns ``(loss, cache)``; ``loss`` is a
    Python float; the cache holds the probabilities.
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: {t.shape[0]} targets for {z.shape[0]} tokens")
    p = z - z.max(axis=1, keepdims=True)
    picked = p[np.arange(t.shape[0]), t]
    np.exp(p, out=p)
    tot = p.sum(axis=1, keepdims=True)
    logz = np.log(tot)
    loss = float(np.mean(logz[:, 0] - picked, dtype=np.float64))
    p /= tot
    return loss, (p, t, logits.shape)


def cross_entropy_backward(cache, dloss: float = 1.0) -> np.ndarray:
    """``dlogits = dloss · (softmax(logits) − onehot(target)) / N`` (N tokens)."""
    p, t, shape = cache
    n = t.shape[0]
    d = p.copy()
    d[np.arange(n), t] -= 1.0
    d *= float(dloss) / n
    return d.reshape(shape)
