"""The fast kernels of :mod:`simpar.nn.kernels` equal the plain math of
:mod:`simpar.nn.functional` (float64, relative error ≤ 1e-12 over hypothesis
shapes), on whole arrays and with blocks shrunk so that every uneven path runs.
The plain functions are checked against finite differences in
``test_functional.py``, so the kernels inherit that check."""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import testing
from simpar.nn import functional as F
from simpar.nn import kernels as K

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
TOL = 1e-12
seeds = st.integers(0, 2**32 - 1)
blocks = st.sampled_from([None, (7, 20), (64, 50)])    # (_BLOCK, _ATT_BLOCK); None: defaults


def assert_same(fast, plain, what: str, tol: float = TOL, scale: float | None = None) -> None:
    """``max |fast − plain| ≤ tol · scale`` (default ``scale = max |plain|``), with the
    same shape and dtype."""
    fast, plain = np.asarray(fast), np.asarray(plain)
    assert fast.shape == plain.shape and fast.dtype == plain.dtype, what
    err = testing.rel_error(fast, plain, scale=scale)          # NaN or inf: inf
    assert err <= tol, f"{what}: fast vs plain relative error {err:.3g} > {tol:g}"


@contextlib.contextmanager
def block_sizes(sizes):
    """Shrink the kernels' cache blocks (``None``: keep the defaults)."""
    old = K._BLOCK, K._ATT_BLOCK
    if sizes is not None:
        K._BLOCK, K._ATT_BLOCK = sizes
    try:
        yield
    finally:
        K._BLOCK, K._ATT_BLOCK = old


@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), sizes=blocks, seed=seeds)
def test_gelu(shape, sizes, seed):
    with block_sizes(sizes):
        rng = np.random.default_rng(seed)
        x, dy = rng.standard_normal(shape) * 3, rng.standard_normal(shape)
        assert_same(K.gelu_fast(x), F.gelu(x), "gelu")
        assert_same(K.gelu_backward_fast(dy, x), F.gelu_backward(dy, x), "gelu_backward")


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 7), h=st.integers(2, 24), sizes=blocks,
       seed=seeds)
def test_layernorm(b, s, h, sizes, seed):
    with block_sizes(sizes):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((b, s, h)) * 2 + 1
        gamma, beta = rng.standard_normal(h), rng.standard_normal(h)
        dy = rng.standard_normal((b, s, h))
        yf, cf = K.layernorm_forward_fast(x, gamma, beta)
        yp, cp = F.layernorm_forward(x, gamma, beta)
        assert_same(yf, yp, "y")
        for a, c, name in zip(cf, cp, ("x̂", "rstd", "gamma")):
            assert_same(a, c, name)
        fast, plain = K.layernorm_backward_fast(dy, cp), F.layernorm_backward(dy, cp)
        # dx is a difference of terms of size |dy γ| / σ that may cancel (exactly for
        # h = 2): measure its error against the terms, not against dx itself
        assert_same(fast[0], plain[0], "dx", scale=np.abs(dy * gamma).max() * cp[1].max())
        assert_same(fast[1], plain[1], "dgamma")
        assert_same(fast[2], plain[2], "dbeta")


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 9), n_head=st.integers(1, 4),
       d=st.integers(1, 5), sizes=blocks, seed=seeds)
def test_attention(b, s, n_head, d, sizes, seed):
    with block_sizes(sizes):
        rng = np.random.default_rng(seed)
        h = n_head * d
        qkv = rng.standard_normal((b, s, 3 * h))
        q, k, v = qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:]     # strided, as in the models
        dy = rng.standard_normal((b, s, h))
        yf, cf = K.attention_forward_fast(q, k, v, n_head)
        yp, cp = F.causal_attention_forward(q, k, v, n_head)
        assert_same(yf, yp, "y")
        assert_same(cf[3], cp[3], "P")
        assert cf[4] == cp[4]
        plain = F.causal_attention_backward(dy, cp)
        buf = np.full((b, s, 3 * h), np.nan)
        views = (buf[..., :h], buf[..., h:2 * h], buf[..., 2 * h:])
        fast = K.attention_backward_fast(dy, cf, out=views)
        for a, c, name in zip(fast, plain, ("dq", "dk", "dv")):
            assert_same(a, c, name)
            assert np.shares_memory(a, buf)
        for a, c, name in zip(K.attention_backward_fast(dy, cf), plain, ("dq", "dk", "dv")):
            assert_same(a, c, name)


@SETTINGS
@given(rows=st.integers(1, 5), n=st.integers(1, 7), axis=st.sampled_from([0, -1]), seed=seeds)
def test_softmax_in_place(rows, n, axis, seed):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((rows, n)) * 3, rng.standard_normal((rows, n))
    y = F.softmax(x, axis)
    assert_same(K.softmax_(x.copy(), axis), y, "softmax")
    assert_same(K.softmax_backward_(dy.copy(), y, axis), F.softmax_backward(dy, y, axis),
                "softmax_backward")


def test_float32_stays_float32():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(1, 4, 6)
    assert K.gelu_fast(x).dtype == K.gelu_backward_fast(x, x).dtype == np.float32
    y, cache = K.layernorm_forward_fast(x, np.ones(6, np.float32), np.zeros(6, np.float32))
    assert y.dtype == np.float32 and all(g.dtype == np.float32
                                         for g in K.layernorm_backward_fast(x, cache))
    y, cache = K.attention_forward_fast(x, x, x, 2)
    assert y.dtype == np.float32 and all(g.dtype == np.float32
                                         for g in K.attention_backward_fast(y, cache))
    np.testing.assert_allclose(y, F.causal_attention_forward(x, x, x, 2)[0], rtol=1e-5)


def test_gelu_backward_in_place(monkeypatch):
    monkeypatch.setattr(K, "_BLOCK", 7)
    rng = np.random.default_rng(23)
    x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    ref = K.gelu_backward_fast(dy, x)
    out = K.gelu_backward_fast(dy, x, out=dy)
    assert out is dy or np.shares_memory(out, dy)
    np.testing.assert_array_equal(dy, ref)
    with pytest.raises(ValueError):
        K.gelu_backward_fast(dy, x, out=np.empty((6, 4)).T)


def test_mask_is_cached_and_read_only():
    m = K._cached_mask(5, np.float32)
    assert m is K._cached_mask(5, np.float32) and not m.flags.writeable
    np.testing.assert_array_equal(m, F.causal_mask(5, np.float32))
