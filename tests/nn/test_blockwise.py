"""Blockwise attention with the online softmax equals plain attention (float64,
1e-10) for block sizes that do and do not divide the sequence, has the right
gradients (finite differences), never holds more than a block² score tile, and
masks by positions (permuted and sharded positions give the same rows)."""
from __future__ import annotations

import numpy as np
import pytest

from simpar import trace
from simpar.nn import functional as F
from simpar.nn import blockwise as BW
from simpar.testing import TOL, rel_error

from .gradcheck import assert_grad_close, numerical_grad


def _qkv(b, s, h, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, s, h)).astype(dtype) for _ in range(3)] + \
        [rng.standard_normal((b, s, h)).astype(dtype)]


@pytest.mark.parametrize("s,block", [(16, 4), (16, 16), (16, 64), (13, 4), (13, 5), (7, 1),
                                     (1, 3)])
def test_blockwise_equals_plain(s, block):
    b, nh, h = 2, 3, 12
    q, k, v, dy = _qkv(b, s, h)
    y0, c0 = F.causal_attention_forward(q, k, v, nh)
    y, c = BW.blockwise_attention_forward(q, k, v, nh, block)
    assert rel_error(y, y0) <= TOL
    for got, want in zip(BW.blockwise_attention_backward(dy, c),
                         F.causal_attention_backward(dy, c0)):
        assert rel_error(got, want) <= TOL


def test_blockwise_gradients_finite_differences():
    b, s, nh, h = 1, 7, 2, 4
    q, k, v, w = _qkv(b, s, h, seed=3)
    y, cache = BW.blockwise_attention_forward(q, k, v, nh, block=3)
    dq, dk, dv = BW.blockwise_attention_backward(w, cache)

    def f():
        return float((BW.blockwise_attention_forward(q, k, v, nh, block=3)[0] * w).sum())
    assert_grad_close(dq, numerical_grad(f, q), "q")
    assert_grad_close(dk, numerical_grad(f, k), "k")
    assert_grad_close(dv, numerical_grad(f, v), "v")


def test_negative_control_wrong_recurrence_is_caught():
    """Dropping the rescale e^{m−m'} of the running sum breaks equality."""
    q, k, v, _ = _qkv(2, 16, 8, seed=1)
    y0 = F.causal_attention_forward(q, k, v, 2)[0]
    orig = np.exp
    try:
        calls = {"n": 0}

        def bad_exp(x, *a, **kw):           # the alpha factor: e^{m − m'} -> 1
            calls["n"] += 1
            r = orig(x, *a, **kw)
            return np.ones_like(r) if calls["n"] % 2 == 1 and "out" not in kw else r
        BW.np.exp = bad_exp
        y = BW.blockwise_attention_forward(q, k, v, 2, block=4)[0]
    finally:
        BW.np.exp = orig
    assert rel_error(y, y0) > 1e-3


def test_positions_mask_and_permutation():
    """Attention by positions: a permuted sequence gives the permuted rows."""
    b, s, nh, h = 1, 12, 2, 8
    q, k, v, dy = _qkv(b, s, h, seed=5)
    perm = np.random.default_rng(0).permutation(s)
    y0 = F.causal_attention_forward(q, k, v, nh)[0]
    y, c = BW.blockwise_attention_forward(q[:, perm], k[:, perm], v[:, perm], nh, 5,
                                          positions=perm)
    assert rel_error(y, y0[:, perm]) <= TOL
    g0 = F.causal_attention_backward(dy, F.causal_attention_forward(q, k, v, nh)[1])
    for got, want in zip(BW.blockwise_attention_backward(dy[:, perm], c), g0):
        assert rel_error(got, want[:, perm]) <= TOL


def test_no_full_score_matrix_and_causal_skipping():
    b, s, nh, h, block = 1, 64, 2, 8, 16
    q, k, v, dy = _qkv(b, s, h)
    tr = trace.Tracer()
    trace.activate(tr)
    try:
        _, cache = BW.blockwise_attention_forward(q, k, v, nh, block)
        fwd_peak = tr.memory.peak[BW.SCORES]
        BW.blockwise_attention_backward(dy, cache)
    finally:
        trace.activate(None)
    assert fwd_peak == b * nh * block * block * 8            # one tile, never s x s
    assert tr.memory.peak[BW.SCORES] == 2 * b * nh * block * block * 8
    assert tr.memory.current[BW.SCORES] == 0
    st = BW.online_softmax_init(F.split_heads(q, nh))
    n = s // block
    flops = BW.online_softmax_update(st, *(F.split_heads(a, nh) for a in (q, k, v)), 1.0,
                                     np.arange(s), np.arange(s), block)
    assert flops == BW.tile_flops(b, nh, block, block, h // nh) * n * (n + 1) // 2


def test_float32_stays_float32():
    q, k, v, dy = _qkv(2, 10, 8, dtype=np.float32)
    y, c = BW.blockwise_attention_forward(q, k, v, 2, 4)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in BW.blockwise_attention_backward(dy, c))
    assert rel_error(y, F.causal_attention_forward(q, k, v, 2)[0]) < 1e-5


@pytest.mark.parametrize("block", [0, -1, 2.5, True])
def test_bad_block_size(block):
    q, k, v, _ = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="block size must be a positive integer"):
        BW.blockwise_attention_forward(q, k, v, 2, block)
