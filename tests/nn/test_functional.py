"""The plain-math forward/backward pairs of :mod:`simpar.nn.functional`: finite-difference
gradients and independent references.  (Their fast kernels: ``test_kernels.py``.)"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar.nn import functional as F

from .gradcheck import assert_grad_close, numerical_grad

# Derandomized: the same hypothesis-chosen examples on every run, so a rare shape
# whose finite differences are poorly conditioned cannot make CI flaky.
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
dims = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def _loss_of(fn, w):
    """Scalar ``Σ w · fn()`` (a random linear functional of the output)."""
    return lambda: float(np.sum(fn() * w))


# ---------------------------------------------------------------------- linear
@SETTINGS
@given(b=dims, s=dims, n_in=dims, n_out=dims, seed=seeds)
def test_linear_gradients(b, s, n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, s, n_in))
    W = rng.standard_normal((n_in, n_out))
    bias = rng.standard_normal(n_out)
    y = F.linear_forward(x, W, bias)
    np.testing.assert_allclose(y, np.einsum("bsi,io->bso", x, W) + bias, rtol=1e-12)
    w = rng.standard_normal(y.shape)
    dx, dW, db = F.linear_backward(w, x, W)
    f = _loss_of(lambda: F.linear_forward(x, W, bias), w)
    assert_grad_close(dx, numerical_grad(f, x), "x")
    assert_grad_close(dW, numerical_grad(f, W), "W")
    assert_grad_close(db, numerical_grad(f, bias), "b")


def test_linear_flops():
    assert F.linear_flops(10, 3, 7) == 2 * 10 * 3 * 7
    assert F.attention_flops(2, 5, 8) == 4 * 2 * 5 * 5 * 8


# ------------------------------------------------------------------------ GELU
@SETTINGS
@given(n=st.integers(1, 20), seed=seeds)
def test_gelu_gradient_and_formula(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) * 3
    ref = np.array([[0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
                     for v in row] for row in x])
    np.testing.assert_allclose(F.gelu(x), ref, rtol=1e-12, atol=1e-15)
    w = rng.standard_normal(x.shape)
    assert_grad_close(F.gelu_backward(w, x), numerical_grad(_loss_of(lambda: F.gelu(x), w), x), "x")


def test_gelu_keeps_float32_and_inputs():
    x = np.linspace(-4, 4, 11, dtype=np.float32)
    x0 = x.copy()
    dy = np.ones_like(x)
    assert F.gelu(x).dtype == np.float32
    assert F.gelu_backward(dy, x).dtype == np.float32
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------------------- LayerNorm
@SETTINGS
@given(b=dims, s=dims, h=st.integers(3, 6), seed=seeds)
def test_layernorm_gradients(b, s, h, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, s, h))
    gamma = 1 + 0.5 * rng.standard_normal(h)
    beta = rng.standard_normal(h)
    y, cache = F.layernorm_forward(x, gamma, beta)
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = F.layernorm_backward(w, cache)
    f = _loss_of(lambda: F.layernorm_forward(x, gamma, beta)[0], w)
    assert_grad_close(dx, numerical_grad(f, x), "x")
    assert_grad_close(dgamma, numerical_grad(f, gamma), "gamma")
    assert_grad_close(dbeta, numerical_grad(f, beta), "beta")


# --------------------------------------------------------------------- softmax
@SETTINGS
@given(rows=dims, n=st.integers(1, 6), axis=st.sampled_from([0, -1]), seed=seeds)
def test_softmax_gradient(rows, n, axis, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * 2
    y = F.softmax(x, axis=axis)
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)
    np.testing.assert_allclose(y, np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True), rtol=1e-12)
    w = rng.standard_normal(x.shape)
    dx = F.softmax_backward(w, y, axis=axis)
    num = numerical_grad(_loss_of(lambda: F.softmax(x, axis=axis), w), x)
    if np.max(np.abs(num)) > 1e-9:             # a softmax over one element is constant
        assert_grad_close(dx, num, "x")
    else:
        np.testing.assert_allclose(dx, 0, atol=1e-12)


def test_softmax_is_stable_and_pure():
    x = np.array([[1000.0, 1000.0, -1000.0]])
    x0 = x.copy()
    np.testing.assert_allclose(F.softmax(x), [[0.5, 0.5, 0.0]])
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------------------- attention
def _naive_attention(q, k, v, n_head):
    b, s, h = q.shape
    d = h // n_head
    y = np.zeros_like(q)
    for bi in range(b):
        for hd in range(n_head):
            sl = slice(hd * d, (hd + 1) * d)
            for i in range(s):
                scores = np.array([q[bi, i, sl] @ k[bi, j, sl] / math.sqrt(d)
                                   for j in range(i + 1)])
                p = np.exp(scores - scores.max())
                p /= p.sum()
                y[bi, i, sl] = sum(p[j] * v[bi, j, sl] for j in range(i + 1))
    return y


@SETTINGS
@given(b=st.integers(1, 2), s=st.integers(2, 5), n_head=st.integers(1, 3),
       d=st.integers(1, 3), seed=seeds)
def test_attention_gradients(b, s, n_head, d, seed):
    rng = np.random.default_rng(seed)
    h = n_head * d
    q, k, v = (rng.standard_normal((b, s, h)) for _ in range(3))
    y, cache = F.causal_attention_forward(q, k, v, n_head)
    np.testing.assert_allclose(y, _naive_attention(q, k, v, n_head), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal(y.shape)
    dq, dk, dv = F.causal_attention_backward(w, cache)
    f = _loss_of(lambda: F.causal_attention_forward(q, k, v, n_head)[0], w)
    assert_grad_close(dq, numerical_grad(f, q), "q")
    assert_grad_close(dk, numerical_grad(f, k), "k")
    assert_grad_close(dv, numerical_grad(f, v), "v")


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, 4)) for _ in range(3))
    y = F.causal_attention_forward(q, k, v, 2)[0]
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] += 10.0                         # change the future only
    v2[:, 4:] -= 10.0
    y2 = F.causal_attention_forward(q, k2, v2, 2)[0]
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_attention_backward_into_out_buffer():
    rng = np.random.default_rng(1)
    b, s, h = 2, 4, 6
    qkv = rng.standard_normal((b, s, 3 * h))
    y, cache = F.causal_attention_forward(qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:], 3)
    dy = rng.standard_normal(y.shape)
    ref = F.causal_attention_backward(dy, cache)
    buf = np.full((b, s, 3 * h), np.nan)
    views = (buf[..., :h], buf[..., h:2 * h], buf[..., 2 * h:])
    got = F.causal_attention_backward(dy, cache, out=views)
    np.testing.assert_array_equal(np.concatenate(ref, axis=-1), buf)
    assert all(np.shares_memory(g, buf) for g in got)


def test_attention_float32():
    q = np.ones((1, 3, 4), np.float32)
    y, cache = F.causal_attention_forward(q, q, q, 2)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in F.causal_attention_backward(y, cache))


# ------------------------------------------------------------------- embedding
@SETTINGS
@given(b=dims, s=dims, vocab=st.integers(1, 5), h=dims, seed=seeds)
def test_embedding_gradient(b, s, vocab, h, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, h))
    ids = rng.integers(0, vocab, size=(b, s))       # repeats are likely: must add up
    y = F.embedding_forward(ids, table)
    for bi in range(b):
        for si in range(s):
            np.testing.assert_array_equal(y[bi, si], table[ids[bi, si]])
    w = rng.standard_normal(y.shape)
    dtable = F.embedding_backward(w, ids, vocab)
    assert_grad_close(dtable, numerical_grad(_loss_of(lambda: F.embedding_forward(ids, table), w),
                                             table), "table")
    acc = np.ones_like(table)
    F.embedding_backward(w, ids, vocab, out=acc)
    np.testing.assert_allclose(acc, 1 + dtable, rtol=1e-12)


# --------------------------------------------------------------- cross-entropy
@SETTINGS
@given(b=dims, s=dims, vocab=st.integers(2, 6), seed=seeds)
def test_cross_entropy(b, s, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((b, s, vocab)) * 2
    targets = rng.integers(0, vocab, size=(b, s))
    loss, cache = F.cross_entropy(logits, targets)
    z = logits.reshape(-1, vocab)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    ref = -np.mean(np.log(p[np.arange(b * s), targets.reshape(-1)]))
    assert isinstance(loss, float)
    assert loss == pytest.approx(ref, rel=1e-12)
    dloss = 0.5 + rng.random()
    d = F.cross_entropy_backward(cache, dloss)
    num = numerical_grad(lambda: dloss * F.cross_entropy(logits, targets)[0], logits)
    assert_grad_close(d, num, "logits")


def test_cross_entropy_is_stable():
    logits = np.array([[[1e4, 0.0, -1e4]]], dtype=np.float32)
    loss, cache = F.cross_entropy(logits, np.array([[1]]))
    assert loss == pytest.approx(1e4, rel=1e-6)
    d = F.cross_entropy_backward(cache)
    assert np.all(np.isfinite(d)) and d.dtype == np.float32
    loss, _ = F.cross_entropy(np.zeros((2, 3, 7)), np.zeros((2, 3), dtype=int))
    assert loss == pytest.approx(math.log(7), rel=1e-12)
