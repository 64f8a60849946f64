"""Modules: gradient checks, accumulation, micro-batch keys, saved copies, ledger, flops."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import formulas, trace
from simpar.nn import (MLP, CausalSelfAttention, Embedding, LayerNorm, Linear, Module,
                       TransformerBlock)
from simpar.nn.module import frozen, is_immutable

from .gradcheck import assert_grad_close, check_module_grads, numerical_grad

# Derandomized: the same hypothesis-chosen examples on every run, so a rare shape
# whose finite differences are poorly conditioned cannot make CI flaky.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


def _block(h=6, n_head=2, d_ff=None, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return TransformerBlock(h, n_head, d_ff, rng=rng, dtype=dtype).init_random_(rng)


MODULE_FACTORIES = {
    "linear": lambda: Linear(5, 3, rng=1).init_random_(np.random.default_rng(2)),
    "linear_nobias": lambda: Linear(5, 3, bias=False, rng=1),
    "layernorm": lambda: LayerNorm(5).init_random_(np.random.default_rng(2)),
    "mlp": lambda: MLP(5, 7, rng=1).init_random_(np.random.default_rng(2)),
    "attention": lambda: CausalSelfAttention(6, 2, rng=1).init_random_(np.random.default_rng(2)),
    "block": lambda: _block(),
}


def _input_for(m, rng, b=2, s=3):
    h = m.params["W"].shape[0] if "W" in m.params else (
        m.h if hasattr(m, "h") else m.fc1.n_in)
    return rng.standard_normal((b, s, h))


# ------------------------------------------------------------ gradient checks
@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 4), n_in=st.integers(1, 5),
       n_out=st.integers(1, 5), bias=st.booleans(), seed=seeds)
def test_linear_gradcheck(b, s, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    m = Linear(n_in, n_out, bias=bias, rng=rng).init_random_(rng)
    assert set(m.parameters()) == ({"W", "b"} if bias else {"W"})
    check_module_grads(m, rng.standard_normal((b, s, n_in)), rng)


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 4), h=st.integers(3, 6), seed=seeds)
def test_layernorm_gradcheck(b, s, h, seed):
    rng = np.random.default_rng(seed)
    check_module_grads(LayerNorm(h).init_random_(rng), rng.standard_normal((b, s, h)), rng)


@SETTINGS
@given(b=st.integers(1, 2), s=st.integers(1, 4), h=st.integers(1, 4),
       d_ff=st.integers(1, 6), seed=seeds)
def test_mlp_gradcheck(b, s, h, d_ff, seed):
    rng = np.random.default_rng(seed)
    m = MLP(h, d_ff, rng=rng).init_random_(rng)
    check_module_grads(m, rng.standard_normal((b, s, h)), rng)


@SETTINGS
@given(b=st.integers(1, 2), s=st.integers(2, 4), n_head=st.integers(1, 3),
       d=st.integers(1, 3), seed=seeds)
def test_attention_gradcheck(b, s, n_head, d, seed):
    rng = np.random.default_rng(seed)
    m = CausalSelfAttention(n_head * d, n_head, rng=rng).init_random_(rng)
    check_module_grads(m, rng.standard_normal((b, s, n_head * d)), rng)


@SETTINGS
@given(b=st.integers(1, 2), s=st.integers(1, 4), n_head=st.integers(1, 2),
       d=st.integers(1, 3), d_ff=st.integers(1, 5), seed=seeds)
def test_block_gradcheck(b, s, n_head, d, d_ff, seed):
    rng = np.random.default_rng(seed)
    h = n_head * d
    if h < 3:       # LayerNorm over 1 or 2 features is (nearly) constant: FD can't see it
        h, n_head = 3, 1
    m = TransformerBlock(h, n_head, d_ff, rng=rng).init_random_(rng)
    check_module_grads(m, rng.standard_normal((b, s, h)), rng)


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(1, 4), vocab=st.integers(1, 6),
       h=st.integers(1, 4), seed=seeds)
def test_embedding_gradcheck(b, s, vocab, h, seed):
    rng = np.random.default_rng(seed)
    m = Embedding(vocab, h, rng=rng).init_random_(rng)
    ids = rng.integers(0, vocab, size=(b, s))
    y = m.forward(ids, key=0)
    w = rng.standard_normal(y.shape)
    assert m.backward(w, key=0) is None

    def f():
        out = m.forward(ids, key=1)
        m.clear_saved(1)
        return float(np.sum(out * w))
    assert_grad_close(m.grads["W"], numerical_grad(f, m.params["W"]), "W")


def test_embedding_rejects_bad_ids():
    m = Embedding(4, 2)
    with pytest.raises(ValueError, match="4"):
        m.forward(np.array([[0, 4]]))
    with pytest.raises(TypeError):
        m.forward(np.array([[0.0, 1.0]]))


# ------------------------------------------------------------ the contract
def _grads_after(m, xs_dys):
    m.zero_grad()
    dxs = [m.backward(dy, key=k) for k, dy in xs_dys]
    return {k: v.copy() for k, v in m.gradients().items()}, dxs


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_gradients_accumulate(name):
    m = MODULE_FACTORIES[name]()
    rng = np.random.default_rng(3)
    x = _input_for(m, rng)
    dy = rng.standard_normal(m.forward(x, key=0).shape)
    g1, _ = _grads_after(m, [(0, dy)])
    m.forward(x, key=0)
    m.forward(x, key=1)
    m.zero_grad()
    m.backward(dy, key=0)
    m.backward(dy, key=1)
    for k, g in m.gradients().items():
        np.testing.assert_allclose(g, 2 * g1[k], rtol=1e-12, atol=1e-15, err_msg=k)


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_two_microbatches_in_flight(name):
    m = MODULE_FACTORIES[name]()
    rng = np.random.default_rng(4)
    xa, xb = _input_for(m, rng), _input_for(m, rng, b=1, s=2)
    ya_ref = m.forward(xa, key="a")
    dya = rng.standard_normal(ya_ref.shape)
    ga, (dxa_ref,) = _grads_after(m, [("a", dya)])
    yb_ref = m.forward(xb, key="b")
    dyb = rng.standard_normal(yb_ref.shape)
    gb, (dxb_ref,) = _grads_after(m, [("b", dyb)])
    # both in flight, backward in the other order
    ya = m.forward(xa, key="a")
    yb = m.forward(xb, key="b")
    assert sorted(m.saved_keys()) == ["a", "b"]
    np.testing.assert_array_equal(ya, ya_ref)
    np.testing.assert_array_equal(yb, yb_ref)
    g, (dxb, dxa) = _grads_after(m, [("b", dyb), ("a", dya)])
    np.testing.assert_allclose(dxa, dxa_ref, rtol=1e-12)
    np.testing.assert_allclose(dxb, dxb_ref, rtol=1e-12)
    for k in g:
        np.testing.assert_allclose(g[k], ga[k] + gb[k], rtol=1e-10, atol=1e-14, err_msg=k)
    assert m.saved_keys() == []


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_saved_activations_are_copies(name):
    m = MODULE_FACTORIES[name]()
    rng = np.random.default_rng(5)
    x = _input_for(m, rng)
    y = m.forward(x.copy(), key=0)
    dy = rng.standard_normal(y.shape)
    g_ref, (dx_ref,) = _grads_after(m, [(0, dy)])
    buf = x.copy()
    m.forward(buf, key=0)
    buf[...] = rng.standard_normal(buf.shape)      # a reused receive buffer
    g, (dx,) = _grads_after(m, [(0, dy.copy())])
    np.testing.assert_array_equal(dx, dx_ref)
    for k in g:
        np.testing.assert_array_equal(g[k], g_ref[k])


def test_immutable_inputs_are_kept_by_reference_others_copied():
    m = Linear(3, 2, rng=0)
    rng = np.random.default_rng(0)
    x = frozen(rng.standard_normal((2, 4, 3)))
    assert is_immutable(x)
    m.forward(x, key="frozen")
    assert m._saved[("", "frozen")][0]["x"] is x             # no copy needed
    buf = rng.standard_normal((2, 4, 3))
    view = buf[...]
    view.flags.writeable = False                             # read-only view, writeable base
    assert not is_immutable(view) and not is_immutable(buf)
    m.forward(view, key="view")
    assert not np.shares_memory(m._saved[("", "view")][0]["x"], buf)
    assert not is_immutable(np.frombuffer(bytes(8)))         # foreign memory
    dy = rng.standard_normal((2, 4, 2))
    ref_dx = dy @ m.params["W"].T
    ref_dW = np.einsum("bsi,bso->io", buf.copy(), dy)
    buf[...] = 0.0                                           # the receive buffer is reused
    m.zero_grad()
    np.testing.assert_allclose(m.backward(dy, key="view"), ref_dx)
    np.testing.assert_allclose(m.grads["W"], ref_dW)


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_forward_backward_do_not_modify_inputs(name):
    m = MODULE_FACTORIES[name]()
    rng = np.random.default_rng(6)
    x = _input_for(m, rng)
    x0 = x.copy()
    y = m.forward(x, key=0)
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    m.backward(dy, key=0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_key_errors_name_the_key(name):
    m = MODULE_FACTORIES[name]()
    x = _input_for(m, np.random.default_rng(7))
    y = m.forward(x, key="mb3")
    with pytest.raises(RuntimeError, match="mb3"):
        m.forward(x, key="mb3")
    m.clear_saved()
    with pytest.raises(KeyError, match="mb9"):
        m.backward(y, key="mb9")


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_memory_ledger_balances(name):
    m = MODULE_FACTORIES[name]()
    x = _input_for(m, np.random.default_rng(8))
    tracer = trace.Tracer(rank=0)
    trace.activate(tracer)
    try:
        y = m.forward(x, key=0)
        held = tracer.memory.current.get("activations", 0)
        assert held == m.saved_bytes() > 0
        m.forward(x, key=1)
        assert tracer.memory.current["activations"] == 2 * held
        m.backward(y, key=0)
        assert tracer.memory.current["activations"] == held
        m.clear_saved(1)
        assert tracer.memory.current["activations"] == 0
        assert tracer.memory.peak["activations"] == 2 * held
    finally:
        trace.activate(None)


def test_linear_saves_input_bytes():
    m = Linear(8, 16, dtype=np.float32)
    x = np.ones((2, 3, 8), np.float32)
    m.forward(x)
    assert m.saved_bytes() == x.nbytes


@pytest.mark.parametrize("name", MODULE_FACTORIES)
def test_float32_stays_float32(name):
    m = MODULE_FACTORIES[name]()
    assert all(p.dtype == np.float64 for p in m.parameters().values())
    # rebuild the same module in float32 and load the float64 weights (cast)
    f32 = {
        "linear": lambda: Linear(5, 3, dtype=np.float32),
        "linear_nobias": lambda: Linear(5, 3, bias=False, dtype=np.float32),
        "layernorm": lambda: LayerNorm(5, dtype=np.float32),
        "mlp": lambda: MLP(5, 7, dtype=np.float32),
        "attention": lambda: CausalSelfAttention(6, 2, dtype=np.float32),
        "block": lambda: TransformerBlock(6, 2, dtype=np.float32),
    }[name]()
    f32.load_state_dict(m.state_dict())
    x = _input_for(m, np.random.default_rng(9))
    y32 = f32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, m.forward(x), rtol=1e-3, atol=1e-4)
    dx = f32.backward(np.ones_like(y32))
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in f32.gradients().values())


# ------------------------------------------------------------ structure
def test_parameter_names_and_live_arrays():
    blk = _block(h=4, n_head=2, d_ff=8)
    names = list(blk.parameters())
    assert names == ["ln1.gamma", "ln1.beta", "attn.qkv.W", "attn.qkv.b", "attn.proj.W",
                     "attn.proj.b", "ln2.gamma", "ln2.beta", "mlp.fc1.W", "mlp.fc1.b",
                     "mlp.fc2.W", "mlp.fc2.b"]
    assert list(blk.gradients()) == names
    assert blk.parameters()["attn.qkv.W"] is blk.attn.qkv.params["W"]
    assert blk.gradients()["mlp.fc2.b"] is blk.mlp.fc2.grads["b"]
    assert blk.attn.qkv.params["W"].shape == (4, 12)
    assert blk.mlp.fc1.params["W"].shape == (4, 8)
    assert blk.num_parameters() == sum(p.size for p in blk.parameters().values())
    assert blk.param_bytes() == 8 * blk.num_parameters()
    assert [n for n, _ in blk.named_modules()] == [
        "", "ln1", "attn", "attn.qkv", "attn.proj", "ln2", "mlp", "mlp.fc1", "mlp.fc2"]
    for name, g in blk.gradients().items():
        assert g.shape == blk.parameters()[name].shape and not g.any()


def test_zero_grad():
    m = MODULE_FACTORIES["mlp"]()
    x = _input_for(m, np.random.default_rng(0))
    m.backward(m.forward(x), key=0)
    assert any(g.any() for g in m.gradients().values())
    m.zero_grad()
    assert not any(g.any() for g in m.gradients().values())


def test_default_init():
    rng = np.random.default_rng(0)
    lin = Linear(300, 200, rng=rng)
    assert not lin.params["b"].any()
    assert abs(lin.params["W"].std() - 0.02) < 1e-3
    ln = LayerNorm(7)
    assert (ln.params["gamma"] == 1).all() and not ln.params["beta"].any()


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="h=6.*n_head=4"):
        CausalSelfAttention(6, 4)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(b=st.integers(1, 4), s=st.integers(1, 16), heads=st.integers(1, 4),
       d=st.integers(1, 8), ff=st.integers(1, 40))
def test_flops(b, s, heads, d, ff):
    h = heads * d
    assert Linear(h, ff).flops(b, s) == 2 * b * s * h * ff
    assert LayerNorm(h).flops(b, s) == 0
    assert MLP(h, ff).flops(b, s) == 4 * b * s * h * ff
    assert CausalSelfAttention(h, heads).flops(b, s) == 8 * b * s * h * h + 4 * b * s * s * h
    assert TransformerBlock(h, heads, ff).flops(b, s) == formulas.layer_forward_flops(b, s, h, ff)
    assert TransformerBlock(h, heads).flops(b, s) == formulas.layer_forward_flops(b, s, h)


def test_block_trace_events():
    blk = _block()
    blk.trace_name = "block7"
    x = np.random.default_rng(0).standard_normal((2, 3, 6))
    tracer = trace.Tracer(rank=0)
    trace.activate(tracer)
    try:
        blk.backward(blk.forward(x), key=0)
    finally:
        trace.activate(None)
    fwd, = tracer.select(name="block7.forward")
    bwd, = tracer.select(name="block7.backward")
    assert fwd.flops == blk.flops(2, 3) and bwd.flops == 2 * blk.flops(2, 3)
    assert fwd.category == "compute"


def test_module_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Module().forward(np.zeros(1))
    with pytest.raises(ValueError):
        Module().add_param("a.b", np.zeros(1))
