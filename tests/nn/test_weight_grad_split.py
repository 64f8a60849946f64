"""The zero-bubble split of a backward pass: input gradients now (``I``), weight
gradients later (``W``), as two explicit calls: ``backward_input(dy, key)`` and
``backward_weights(key)``; ``backward`` is both.  No hidden state decides what a
call computes (checked: no thread-local state under ``simpar/nn`` or
``simpar/parallel``)."""
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import trace
from simpar.nn import GPT, MLP, CausalSelfAttention, GPTConfig, Linear, TransformerBlock
from simpar.nn import functional as F

from .gradcheck import assert_grad_close, numerical_grad

FACTORIES = {
    "linear": lambda rng: Linear(5, 3, rng=rng).init_random_(rng),
    "mlp": lambda rng: MLP(5, 7, rng=rng).init_random_(rng),
    "attention": lambda rng: CausalSelfAttention(6, 2, rng=rng).init_random_(rng),
    "block": lambda rng: TransformerBlock(6, 2, 5, rng=rng).init_random_(rng),
}


def _h(m):
    return {"linear": 5, "mlp": 5}.get(m, 6)


def split_backward(m, dy, key):
    dx = m.backward_input(dy, key)
    m.backward_weights(key)
    return dx


@pytest.mark.parametrize("name", FACTORIES)
def test_split_equals_plain_backward_and_finite_differences(name):
    rng = np.random.default_rng(3)
    m = FACTORIES[name](rng)
    x = rng.standard_normal((2, 3, _h(name)))
    w = rng.standard_normal(m.forward(x, key="ref").shape)
    dx_ref = m.backward(w, key="ref")
    ref = {k: g.copy() for k, g in m.gradients().items()}
    m.zero_grad()
    m.forward(x, key=1)
    dx = split_backward(m, w, 1)
    assert m.saved_keys() == []
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-13, atol=1e-14)
    for k, g in m.gradients().items():
        np.testing.assert_allclose(g, ref[k], rtol=1e-13, atol=1e-14, err_msg=k)

    def f():
        out = m.forward(x, key="fd")
        m.clear_saved("fd")
        return float(np.sum(out * w))
    assert_grad_close(dx, numerical_grad(f, x), "input")
    for k, p in m.parameters().items():
        assert_grad_close(m.gradients()[k], numerical_grad(f, p), k)


def test_weight_grads_wait_for_backward_weights():
    rng = np.random.default_rng(0)
    blk = FACTORIES["block"](rng)
    x = rng.standard_normal((1, 4, 6))
    blk.forward(x, key=0)
    blk.backward_input(rng.standard_normal((1, 4, 6)), key=0)
    g = blk.gradients()
    assert all(not g[k].any() for k in g if k.endswith((".W", ".b")))      # linear: later
    assert g["ln1.gamma"].any() and g["ln2.beta"].any()                    # LayerNorm: now
    assert blk.saved_keys() == [0]                                         # W's inputs kept
    blk.backward_weights(0)
    assert all(g[k].any() for k in g) and blk.saved_keys() == []
    with pytest.raises(KeyError, match="key 0"):
        blk.backward_weights(0)                                            # twice


@settings(max_examples=8, deadline=None)
@given(tied=st.booleans(), b=st.integers(1, 2), s=st.integers(1, 4), seed=st.integers(0, 999))
def test_gpt_split_backward(tied, b, s, seed):
    """Whole GPT: the split gives the plain gradients; finite differences on a few params."""
    rng = np.random.default_rng(seed)
    cfg = GPTConfig(vocab_size=7, seq_len=4, n_layer=2, n_head=2, d_model=6, d_ff=5,
                    tie_weights=tied)
    m = GPT(cfg, seed=seed).init_random_(rng)
    idx = rng.integers(0, 7, size=(b, s))
    w = rng.standard_normal((b, s, 7))
    m.forward(idx, key=0)
    m.backward(w, key=0)
    ref = {k: g.copy() for k, g in m.gradients().items()}
    m.zero_grad()
    m.forward(idx, key=1)
    m.backward_input(w, key=1)
    m.backward_weights(1)
    assert m.saved_keys() == []
    for k, g in m.gradients().items():
        np.testing.assert_allclose(g, ref[k], rtol=1e-12, atol=1e-14, err_msg=k)

    def f():
        out = m.forward(idx, key="fd")
        m.clear_saved("fd")
        return float(np.sum(out * w))
    for k in ("wte", "blocks.1.attn.qkv.W", "ln_f.gamma"):
        assert_grad_close(m.gradients()[k], numerical_grad(f, m.parameters()[k]), k)


def test_trace_flops_and_ledger():
    """I + W cost exactly the plain backward; W costs the linear layers' forward
    FLOPs; the ledger holds W's inputs until W and is empty afterwards."""
    cfg = GPTConfig(vocab_size=11, seq_len=4, n_layer=1, n_head=2, d_model=6)
    m = GPT(cfg, seed=0)
    idx = np.zeros((2, 4), dtype=np.int64)
    tr = trace.Tracer(0)
    trace.activate(tr)
    try:
        m.forward(idx, key=0)
        m.backward_input(np.ones((2, 4, 11)), key=0)
        held = tr.memory.current["activations"]
        m.backward_weights(0)
    finally:
        trace.activate(None)
    fl = {e.name: e.flops for e in tr.events}
    blk = m.blocks[0]
    assert fl["block0.backward_input"] + fl["block0.backward_weights"] == 2 * fl["block0.forward"]
    assert fl["block0.backward_weights"] == sum(
        F.linear_flops(8, a, b) for a, b in ((6, 18), (6, 6), (6, 24), (24, 6)))
    assert fl["block0.backward_weights"] == blk.weight_grad_flops(2, 4)
    assert fl["head.backward_input"] == fl["head.backward_weights"] == fl["head.forward"]
    assert held > 0 and tr.memory.current["activations"] == 0


def test_a_plain_backward_defers_nothing_and_calls_interleave():
    """``backward`` after a ``backward_input`` of another key computes its own weight
    gradients at once (no state carries over from one call to the next)."""
    rng = np.random.default_rng(1)
    blk = FACTORIES["block"](rng)
    x = rng.standard_normal((1, 4, 6))
    dy = rng.standard_normal((1, 4, 6))
    blk.forward(x, key="a")
    blk.forward(x, key="b")
    blk.backward_input(dy, key="a")
    blk.backward(dy, key="b")                      # complete: W of "b" is done
    assert blk.saved_keys() == ["a"]               # only a's W inputs wait
    blk.backward_weights("a")
    g = {k: v.copy() for k, v in blk.gradients().items()}
    blk.zero_grad()
    for key in ("c", "d"):
        blk.forward(x, key=key)
        blk.backward(dy, key=key)
    for k in g:
        np.testing.assert_allclose(g[k], blk.gradients()[k], rtol=1e-13, atol=1e-14, err_msg=k)


def test_no_thread_local_state_in_nn_or_parallel():
    root = pathlib.Path(__file__).resolve().parents[2] / "simpar"
    hits = [f"{p}:{i}" for d in ("nn", "parallel") for p in sorted((root / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"threading\.local|contextvars|defer_weight_grads", line)]
    assert hits == []
