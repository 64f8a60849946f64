"""The layers of a GPT as the papers write them: pure forward/backward pairs.

Every function takes arrays and returns arrays; nothing is remembered between
calls.  A forward that hands something to its backward returns it as a ``cache``
(a tuple), which the stateful modules of :mod:`simpar.nn.module` keep per
micro-batch.  Shapes follow the project convention: activations ``(batch, seq,
hidden)``; a linear weight is ``(in, out)`` so a layer computes ``Y = X A + b``
(the parameter ``W`` is Megatron-LM's ``A``).

* ``linear_*``: ``Y = X A + b``; ``dX = dY Aᵀ``, ``dA = Xᵀ dY``
  (Shoeybi et al. 2019, Megatron-LM, §3, whose notation simpar keeps);
* ``gelu``: ``0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`` (Hendrycks & Gimpel
  2016, §2; the approximation GPT-2 uses);
* ``layernorm_*``: ``γ (x − μ)/√(σ² + ε) + β`` over the hidden axis (Ba et al.
  2016, §3: eq. (3) for μ and σ);
* ``softmax``: ``exp(xᵢ) / Σⱼ exp(xⱼ)``;
* ``causal_attention_*``: per head ``softmax(Q Kᵀ/√d + M) V``, heads
  concatenated (Vaswani et al. 2017, §3.2.1 eq. (1), §3.2.2, §3.2.3);
* ``embedding_*``: ``y = E[ids]``; ``dE[v] = Σ_{ids = v} dy`` (Vaswani §3.4);
* ``cross_entropy*``: ``mean(log Σ exp z − z[target])``; gradient
  ``(softmax(z) − onehot(target)) / N``.

This file is written for reading.  The models call the faster versions of GELU,
LayerNorm and attention in :mod:`simpar.nn.kernels` (cache-blocked, in place),
which compute the same values with the same signatures and caches; the tests
check every kernel against the function here (float64, 1e-12) and every function
here against finite differences.

dtype is never changed: float32 in, float32 out.  Constants are Python floats,
which NumPy 2 (NEP 50) treats as "weak" scalars that take the array's dtype; an
``np.float64`` constant would silently upcast a float32 computation.

The ``*_flops`` counts (from :mod:`simpar.formulas`) are **matmul FLOPs only**
(one multiply-add = 2 FLOPs), as in Narayanan et al. 2021, appendix; by
convention the backward pass costs twice the forward.
"""
from __future__ import annotations

import math

import numpy as np

from ..formulas import attention_flops, linear_flops  # noqa: F401  (one definition)
from .precision import mixed

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
@mixed
def linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``y = x @ W + b`` for ``x`` of shape ``(..., n_in)`` and ``W`` of ``(n_in, n_out)``.

    The leading dimensions are flattened so the product is one large GEMM.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ W
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1])


@mixed
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


@mixed
def linear_backward_input(dy: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The input half of :func:`linear_backward`: ``dx = dy @ Wᵀ``."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ W.T).reshape(dy.shape[:-1] + (W.shape[0],))


@mixed
def linear_backward_weight(dy: np.ndarray, x: np.ndarray):
    """The weight half of :func:`linear_backward`: ``(dW, db) = (xᵀ @ dy, Σ dy)``."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return x.reshape(-1, x.shape[-1]).T @ dy2, dy2.sum(axis=0)


# ------------------------------------------------------------------------ GELU
GELU_C = math.sqrt(2.0 / math.pi)   # √(2/π)
GELU_A = 0.044715


@mixed
def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation of GELU (Hendrycks & Gimpel 2016, §2):

    ``gelu(x) = 0.5 x (1 + tanh(u))``,  ``u = √(2/π) (x + 0.044715 x³)``.
    """
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_A * x**3)))


@mixed
def gelu_backward(dy: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``dx = dy · gelu'(x)``; with ``t = tanh(u)`` and ``du/dx = √(2/π)(1 + 3·0.044715 x²)``:

    ``gelu'(x) = 0.5 (1 + t) + 0.5 x (1 − t²) du/dx``.

    ``out`` (shape of ``x``; may be ``dy`` itself) receives ``dx``.
    """
    t = np.tanh(GELU_C * (x + GELU_A * x**3))
    du = GELU_C * (1.0 + 3.0 * GELU_A * x**2)
    return np.multiply(dy, 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du, out=out)


# ------------------------------------------------------------------- LayerNorm
@mixed(keep={(1, 1)})
def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """Layer normalisation over the last axis (Ba et al. 2016, §3, eq. (3)):

    ``μ = mean(x)``, ``σ² = mean((x − μ)²)``, ``x̂ = (x − μ)/√(σ² + ε)``,
    ``y = γ · x̂ + β``.

    Returns ``(y, cache)``; the cache holds ``x̂``, ``1/√(σ² + ε)`` (shape
    ``(..., 1)``) and ``γ`` — not ``x``.
    """
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * rstd
    return gamma * xhat + beta, (xhat, rstd, gamma)


@mixed
def layernorm_backward(dy: np.ndarray, cache):
    """Gradients of LayerNorm; returns ``(dx, dγ, dβ)``.  With ``g = dy · γ``:

    ``dx = (g − mean(g) − x̂ · mean(g · x̂)) / √(σ² + ε)``,
    ``dγ = Σ dy · x̂``, ``dβ = Σ dy`` (sums over every leading axis).
    """
    xhat, rstd, gamma = cache
    g = dy * gamma
    dx = (g - g.mean(axis=-1, keepdims=True)
          - xhat * (g * xhat).mean(axis=-1, keepdims=True)) * rstd
    lead = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


# --------------------------------------------------------------------- softmax
@mixed
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``softmax(x)ᵢ = exp(xᵢ − max x) / Σⱼ exp(xⱼ − max x)`` along ``axis``
    (subtracting the max changes nothing but keeps ``exp`` from overflowing)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@mixed
def softmax_backward(dy: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Given ``y = softmax(x)``: ``dx = y · (dy − Σ dy · y)`` along ``axis``."""
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


# ------------------------------------------------------------------- attention
def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """``(b, s, h)`` → ``(b, n_head, s, h/n_head)``, a view: head ``i`` is the
    slice ``[i·d, (i+1)·d)`` of the hidden axis (Vaswani et al. 2017 §3.2.2)."""
    b, s, h = x.shape
    return x.reshape(b, s, n_head, h // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """``(b, n_head, s, d)`` → ``(b, s, n_head·d)``: concatenate the heads."""
    b, n_head, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n_head * d)


def heads_view(out: np.ndarray, n_head: int) -> np.ndarray:
    """:func:`split_heads` of an output array, guaranteed to be a view into it."""
    view = split_heads(out, n_head)
    if not np.shares_memory(view, out):     # reshape had to copy: writes would be lost
        raise ValueError("attention: output array cannot be viewed as heads without a copy")
    return view


def causal_mask(s: int, dtype) -> np.ndarray:
    """``(s, s)`` additive mask ``M``: 0 on and below the diagonal, −∞ above, so
    position ``i`` attends to positions ``≤ i`` (Vaswani et al. 2017 §3.2.3)."""
    return np.triu(np.full((s, s), -np.inf, dtype=dtype), 1)


@mixed
def causal_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int):
    """Multi-head causal self-attention (Vaswani et al. 2017 §3.2.1, eq. (1)):

    per head ``P = softmax(Q Kᵀ/√d + M)``, ``Y = P V``, ``d = h / n_head``;
    heads concatenated back to ``(b, s, h)``.

    Returns ``(y, cache)``; the cache holds per-head *views* of ``q``, ``k``,
    ``v`` (a caller that may overwrite its inputs must keep copies), ``P``
    (``(b, n_head, s, s)``) and ``1/√d``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1] // n_head)
    qh, kh, vh = (split_heads(a, n_head) for a in (q, k, v))
    p = softmax(qh @ kh.transpose(0, 1, 3, 2) * scale + causal_mask(q.shape[1], q.dtype))
    return merge_heads(p @ vh), (qh, kh, vh, p, scale)


@mixed
def causal_attention_backward(dy: np.ndarray, cache, out=None):
    """Gradients of :func:`causal_attention_forward`; returns ``(dq, dk, dv)``.

    Per head, with ``S = Q Kᵀ/√d + M`` and ``P = softmax(S)``:
    ``dV = Pᵀ dY``, ``dP = dY Vᵀ``, ``dS = P (dP − Σ dP · P)``,
    ``dQ = dS K / √d``, ``dK = dSᵀ Q / √d``.  Masked entries have ``P = 0`` and
    so get no gradient.  ``out`` may give three ``(b, s, h)`` arrays (e.g. views
    of one ``(b, s, 3h)`` buffer) to write the results into.
    """
    qh, kh, vh, p, scale = cache
    dyh = split_heads(dy, qh.shape[1])
    dv = p.transpose(0, 1, 3, 2) @ dyh
    ds = softmax_backward(dyh @ vh.transpose(0, 1, 3, 2), p)
    dq = ds @ kh * scale
    dk = ds.transpose(0, 1, 3, 2) @ qh * scale
    if out is None:
        return merge_heads(dq), merge_heads(dk), merge_heads(dv)
    for o, g in zip(out, (dq, dk, dv)):
        heads_view(o, qh.shape[1])[...] = g
    return tuple(out)


# ------------------------------------------------------------------- embedding
def embedding_forward(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row lookup: ``y[..., :] = table[ids[...], :]``."""
    return table[ids]


@mixed(accumulates=True)
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
@mixed(keep={(1,)})
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
    shifted = z - z.max(axis=1, keepdims=True)        # exp cannot overflow
    e = np.exp(shifted)
    tot = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(tot[:, 0]) - shifted[np.arange(t.shape[0]), t],
                         dtype=np.float64))
    return loss, (e / tot, t, logits.shape)


def cross_entropy_backward(cache, dloss: float = 1.0) -> np.ndarray:
    """``dlogits = dloss · (softmax(logits) − onehot(target)) / N`` (N tokens)."""
    p, t, shape = cache
    n = t.shape[0]
    d = p.copy()
    d[np.arange(n), t] -= 1.0
    d *= float(dloss) / n
    return d.reshape(shape)
