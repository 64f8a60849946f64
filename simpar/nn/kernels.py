"""Fast kernels: the same maths as :mod:`simpar.nn.functional`, arranged for speed.

Read :mod:`~simpar.nn.functional` first: it writes every layer as the paper does.
The models (:mod:`simpar.nn.layers`, the tensor-parallel layers) call the kernels
here instead, which compute the same values (tested equal in float64 to 1e-12,
``tests/nn/test_kernels.py``) with the same signatures and caches, only faster:

* :func:`gelu_fast`, :func:`gelu_backward_fast` — ``0.5x(1 + tanh(√(2/π)(x +
  0.044715x³)))`` (Hendrycks & Gimpel 2016, §2) as :func:`~.functional.gelu`,
  over cache blocks, in place;
* :func:`layernorm_forward_fast`, :func:`layernorm_backward_fast` —
  ``γ(x − μ)/√(σ² + ε) + β`` (Ba et al. 2016, §3) as
  :func:`~.functional.layernorm_forward` / ``_backward``, over blocks of rows;
* :func:`attention_forward_fast`, :func:`attention_backward_fast` — per head
  ``softmax(Q Kᵀ/√d + M) V`` (Vaswani et al. 2017, §3.2.1 eq. (1)) as
  :func:`~.functional.causal_attention_forward` / ``_backward``, over groups of
  heads, with the softmax in place in the saved scores.

**Why blocks.**  An element-wise chain such as GELU is about ten NumPy passes over
its array.  On a whole ``(b, s, 4h)`` activation every pass streams main memory;
cut into blocks of ``_BLOCK`` elements (256 KiB of float64), every pass after the
first finds its block in the CPU cache.  Attention runs over groups of
``(batch, heads)`` whose ``s × s`` scores fill about ``_ATT_BLOCK`` elements, so
the mask, the softmax and the second product find the scores in cache.  (Computing
only the lower block triangle of the scores, as causality allows, was tried: the
smaller GEMMs run slower, and the net gain, about 2% of a training step, did not
pay for the extra loops.)
"""
from __future__ import annotations

import math

import numpy as np

from .functional import GELU_A, GELU_C, causal_mask, heads_view, split_heads
from .precision import mixed

__all__ = [
    "gelu_fast", "gelu_backward_fast", "layernorm_forward_fast", "layernorm_backward_fast",
    "softmax_", "softmax_backward_", "attention_forward_fast", "attention_backward_fast",
]

_BLOCK = 1 << 15          # elements per block of an element-wise chain
_ATT_BLOCK = 1 << 19      # attention scores per (batch, head-group) block


def _blocks(n: int, size: int):
    """Slices ``[i, i + size)`` covering ``range(n)``."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1)


# ------------------------------------------------------------------------ GELU
def _tanh_u(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = t = tanh(u)``, ``u = c(x + a x³)``, in two temporaries' worth of passes."""
    np.multiply(x, x, out=out)              # x²
    out *= GELU_C * GELU_A
    out += GELU_C                           # c(1 + a x²)
    out *= x                                # c(x + a x³)
    return np.tanh(out, out=out)


@mixed
def gelu_fast(x: np.ndarray) -> np.ndarray:
    """:func:`~.functional.gelu`, ``0.5 x (1 + t)``, over cache blocks."""
    xf = _flat(x)
    y = np.empty_like(xf)
    t = np.empty(min(_BLOCK, xf.size), dtype=xf.dtype)
    for sl in _blocks(xf.size, _BLOCK):
        xs, ts = xf[sl], t[:sl.stop - sl.start]
        _tanh_u(xs, ts)
        ts += 1.0
        ts *= 0.5
        np.multiply(ts, xs, out=y[sl])
    return y.reshape(x.shape)


@mixed
def gelu_backward_fast(dy: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`~.functional.gelu_backward` over cache blocks:
    ``dx = dy · (0.5 (1 + t) + 0.5 x (1 − t²) c (1 + 3a x²))``.  ``out``
    (C-contiguous, shape of ``x``; may be ``dy`` itself) receives ``dx``."""
    xf, dyf = _flat(x), _flat(dy)
    if out is not None and not out.flags.c_contiguous:
        raise ValueError("gelu_backward: 'out' must be C-contiguous")
    dx = np.empty_like(xf) if out is None else out.reshape(-1)
    n = min(_BLOCK, xf.size)
    t, g, u = (np.empty(n, dtype=xf.dtype) for _ in range(3))
    for sl in _blocks(xf.size, _BLOCK):
        m = sl.stop - sl.start
        xs, ts, gs, us = xf[sl], t[:m], g[:m], u[:m]
        _tanh_u(xs, ts)
        np.multiply(xs, xs, out=gs)         # g = 0.5 x c (1 + 3 a x²)
        gs *= 3.0 * GELU_A * GELU_C
        gs += GELU_C
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
@mixed(keep={(1, 1)})
def layernorm_forward_fast(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                           eps: float = 1e-5):
    """:func:`~.functional.layernorm_forward` over blocks of rows; same cache
    ``(x̂, 1/√(σ² + ε), γ)``."""
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


@mixed
def layernorm_backward_fast(dy: np.ndarray, cache):
    """:func:`~.functional.layernorm_backward` over blocks of rows:
    ``dx = (g − mean(g) − x̂ · mean(g · x̂)) / √(σ² + ε)`` with ``g = dy · γ``."""
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
@mixed(inplace=(0,))
def softmax_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`~.functional.softmax` in place (``x`` is overwritten and returned)."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    r = x.sum(axis=axis, keepdims=True)
    x *= np.divide(1.0, r, out=r)           # one division per row, then multiplies
    return x


@mixed(inplace=(0,))
def softmax_backward_(dy: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`~.functional.softmax_backward` that overwrites ``dy`` with the result."""
    s = np.multiply(dy, y).sum(axis=axis, keepdims=True)
    dy -= s
    dy *= y
    return dy


# ------------------------------------------------------------------- attention
_MASKS: dict = {}


def _cached_mask(s: int, dtype) -> np.ndarray:
    """:func:`~.functional.causal_mask`, built once per ``(s, dtype)``, read-only."""
    key = (s, np.dtype(dtype))
    m = _MASKS.get(key)
    if m is None:
        m = causal_mask(s, dtype)
        m.flags.writeable = False
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[key] = m
    return m


def _head_groups(b: int, n_head: int, s: int):
    """``(batch index, slice of heads)`` groups of about ``_ATT_BLOCK`` scores."""
    g = _group_size(n_head, s)
    for i in range(b):
        for j in range(0, n_head, g):
            yield i, slice(j, min(j + g, n_head))


def _group_size(n_head: int, s: int) -> int:
    return max(1, min(n_head, _ATT_BLOCK // (s * s)))


def attention_forward_fast(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int):
    """:func:`~.functional.causal_attention_forward` over head groups: per group
    ``P = softmax(q kᵀ/√d + M)`` in place in the saved scores, then ``y = P v``
    straight into the output's head view.  Same cache ``(q, k, v, P, 1/√d)``, with
    the per-head views of the caller's ``q, k, v`` (also in 16 bits: not rounded
    again from float32 copies)."""
    y, att, scale = _attention_core(q, k, v, n_head)
    return y, (*(split_heads(a, n_head) for a in (q, k, v)), att, scale)


@mixed
def _attention_core(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int):
    """``(y, P, 1/√d)`` of :func:`attention_forward_fast`."""
    b, s, h = q.shape
    scale = 1.0 / math.sqrt(h // n_head)
    qh, kh, vh = (split_heads(a, n_head) for a in (q, k, v))   # (b, nh, s, d) views
    att = np.empty((b, n_head, s, s), dtype=q.dtype)
    y = np.empty((b, s, h), dtype=q.dtype)
    yh = split_heads(y, n_head)
    mask = _cached_mask(s, q.dtype)
    for i, hs in _head_groups(b, n_head, s):
        p = att[i, hs]
        np.matmul(qh[i, hs] * scale, kh[i, hs].transpose(0, 2, 1), out=p)
        p += mask
        softmax_(p)
        np.matmul(p, vh[i, hs], out=yh[i, hs])
    return y, att, scale


@mixed
def attention_backward_fast(dy: np.ndarray, cache, out=None):
    """:func:`~.functional.causal_attention_backward` over head groups, writing
    ``dq, dk, dv`` into ``out`` (three ``(b, s, h)`` arrays, e.g. views of one
    ``(b, s, 3h)`` buffer) when given."""
    qh, kh, vh, att, scale = cache
    b, n_head, s, d = qh.shape
    if out is None:
        out = tuple(np.empty((b, s, n_head * d), dtype=dy.dtype) for _ in range(3))
    dqh, dkh, dvh = (heads_view(o, n_head) for o in out)
    dyh = split_heads(dy, n_head)
    scratch = np.empty((_group_size(n_head, s), s, s), dtype=dy.dtype)
    for i, hs in _head_groups(b, n_head, s):
        p, dyb = att[i, hs], dyh[i, hs]
        ds = scratch[:p.shape[0]]
        np.matmul(p.transpose(0, 2, 1), dyb, out=dvh[i, hs])          # dv = Pᵀ dy
        np.matmul(dyb, vh[i, hs].transpose(0, 2, 1), out=ds)          # dP = dy vᵀ
        softmax_backward_(ds, p)                                      # dS
        np.matmul(ds, kh[i, hs], out=dqh[i, hs])                      # dq = dS k / √d
        dqh[i, hs] *= scale
        np.matmul(ds.transpose(0, 2, 1), qh[i, hs], out=dkh[i, hs])   # dk = dSᵀ q / √d
        dkh[i, hs] *= scale
    return tuple(out)
