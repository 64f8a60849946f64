"""The reference GPT: gradients, names, state dicts, tied weights, flops, tracing."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import formulas, trace
from simpar.nn import GPT, GPTConfig, functional as F

from .gradcheck import assert_grad_close, numerical_grad

# Derandomized: the same hypothesis-chosen examples on every run, so a rare shape
# whose finite differences are poorly conditioned cannot make CI flaky.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def expected_names(n_layer, tied):
    names = ["wte", "wpe"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{p}" for p in (
            "ln1.gamma", "ln1.beta", "attn.qkv.W", "attn.qkv.b", "attn.proj.W", "attn.proj.b",
            "ln2.gamma", "ln2.beta", "mlp.fc1.W", "mlp.fc1.b", "mlp.fc2.W", "mlp.fc2.b")]
    names += ["ln_f.gamma", "ln_f.beta"] + ([] if tied else ["lm_head.W"])
    return names


def tiny(tied=False, **kw):
    cfg = dict(vocab_size=7, seq_len=5, n_layer=2, n_head=2, d_model=4, d_ff=6,
               tie_weights=tied)
    cfg.update(kw)
    return GPTConfig(**cfg)


configs = st.builds(
    lambda vocab, seq, layers, heads, d, ff, tied: GPTConfig(
        vocab, seq, layers, heads, max(heads * d, 3) if heads == 1 else heads * d, ff, tied),
    vocab=st.integers(2, 6), seq=st.integers(1, 4), layers=st.integers(1, 2),
    heads=st.integers(1, 2), d=st.integers(2, 3), ff=st.integers(1, 6), tied=st.booleans())


# ------------------------------------------------------------ gradients
@SETTINGS
@given(cfg=configs, b=st.integers(1, 2), seed=st.integers(0, 2**32 - 1))
def test_gpt_gradcheck(cfg, b, seed):
    """Every parameter, random parameter values, loss = random linear functional of logits."""
    rng = np.random.default_rng(seed)
    m = GPT(cfg, seed=seed % 1000).init_random_(rng)
    s = int(rng.integers(1, cfg.seq_len + 1))
    idx = rng.integers(0, cfg.vocab_size, size=(b, s))
    logits = m.forward(idx, key=0)
    assert logits.shape == (b, s, cfg.vocab_size)
    w = rng.standard_normal(logits.shape)
    m.zero_grad()
    assert m.backward(w, key=0) is None
    assert m.saved_keys() == []

    def f():
        out = m.forward(idx, key=1)
        m.clear_saved(1)
        return float(np.sum(out * w))

    for name, p in m.parameters().items():
        if name == "wpe" and s < cfg.seq_len:
            # rows past the sequence get exactly zero gradient; the rest must match
            num = numerical_grad(f, p)
            assert not m.gradients()[name][s:].any()
            assert_grad_close(m.gradients()[name][:s], num[:s], name)
            continue
        assert_grad_close(m.gradients()[name], numerical_grad(f, p), name)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_gradient_is_cross_entropy_gradient(tied):
    rng = np.random.default_rng(11)
    m = GPT(tiny(tied), seed=3).init_random_(rng, std=0.3)
    idx = rng.integers(0, 7, size=(2, 5))
    tgt = rng.integers(0, 7, size=(2, 5))
    m.zero_grad()
    loss = m.loss(idx, tgt)
    assert loss == pytest.approx(m.eval_loss(idx, tgt), rel=1e-14)
    assert m.saved_keys() == []

    def f():
        return m.eval_loss(idx, tgt)

    for name in ("wte", "blocks.0.attn.qkv.W", "ln_f.beta", "blocks.1.mlp.fc2.b"):
        assert_grad_close(m.gradients()[name], numerical_grad(f, m.parameters()[name]), name)


def test_tied_weights_gradient_sums_both_uses():
    rng = np.random.default_rng(12)
    m = GPT(tiny(True), seed=0).init_random_(rng, std=0.3)
    assert "lm_head.W" not in m.parameters() and m.lm_head is None
    idx = rng.integers(0, 7, size=(2, 4))
    logits = m.forward(idx)
    xn = m.ln_f.forward(_final_hidden(m, idx), key="probe")   # recompute the head input
    m.clear_saved("probe")
    np.testing.assert_allclose(logits, xn @ m.params["wte"].T, rtol=1e-12)
    w = rng.standard_normal(logits.shape)
    m.zero_grad()
    m.backward(w)
    head_part = (w.reshape(-1, 7).T @ xn.reshape(-1, 4))
    # the embedding part alone is what remains; both are non-zero and add up
    emb_part = m.grads["wte"] - head_part
    assert np.abs(head_part).max() > 1e-6 and np.abs(emb_part).max() > 1e-6

    def f():
        out = m.forward(idx, key=1)
        m.clear_saved(1)
        return float(np.sum(out * w))
    assert_grad_close(m.grads["wte"], numerical_grad(f, m.params["wte"]), "wte (tied)")


def _final_hidden(m, idx):
    x = m.embed_forward(idx, key="probe")
    for blk in m.blocks:
        x = blk.forward(x, key="probe")
    m.clear_saved("probe")
    return x


def test_gradients_accumulate_over_two_steps():
    rng = np.random.default_rng(13)
    m = GPT(tiny(), seed=0).init_random_(rng, std=0.3)
    idx, tgt = rng.integers(0, 7, size=(2, 5)), rng.integers(0, 7, size=(2, 5))
    m.zero_grad()
    m.loss(idx, tgt)
    once = {k: v.copy() for k, v in m.gradients().items()}
    m.loss(idx, tgt, key="again")
    for k, g in m.gradients().items():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_microbatches_in_flight_match_one_at_a_time():
    rng = np.random.default_rng(14)
    m = GPT(tiny(True), seed=0).init_random_(rng, std=0.3)
    batches = [(rng.integers(0, 7, size=(1, 5)), rng.integers(0, 7, size=(1, 5))) for _ in range(3)]
    m.zero_grad()
    for idx, tgt in batches:
        m.loss(idx, tgt)
    ref = {k: v.copy() for k, v in m.gradients().items()}
    m.zero_grad()
    caches = []
    for mb, (idx, tgt) in enumerate(batches):               # all forwards first (GPipe)
        logits = m.forward(idx, key=mb)
        caches.append(F.cross_entropy(logits, tgt)[1])
    for mb in (2, 0, 1):
        m.backward(F.cross_entropy_backward(caches[mb]), key=mb)
    for k, g in m.gradients().items():
        np.testing.assert_allclose(g, ref[k], rtol=1e-10, atol=1e-14, err_msg=k)


def test_saved_ids_are_copies():
    rng = np.random.default_rng(15)
    m = GPT(tiny(), seed=0)
    idx = rng.integers(0, 7, size=(2, 5))
    dl = rng.standard_normal((2, 5, 7))
    m.forward(idx.copy())
    m.zero_grad()
    m.backward(dl)
    ref = {k: v.copy() for k, v in m.gradients().items()}
    buf = idx.copy()
    m.forward(buf)
    buf[...] = 0
    m.zero_grad()
    m.backward(dl)
    for k, g in m.gradients().items():
        np.testing.assert_array_equal(g, ref[k], err_msg=k)


def test_key_errors():
    m = GPT(tiny(), seed=0)
    idx = np.zeros((1, 3), dtype=int)
    m.forward(idx, key="mb0")
    with pytest.raises(RuntimeError, match="mb0"):
        m.forward(idx, key="mb0")
    with pytest.raises(KeyError, match="mb1"):
        m.backward(np.zeros((1, 3, 7)), key="mb1")


def test_bad_input_is_rejected():
    m = GPT(tiny(), seed=0)
    with pytest.raises(ValueError, match="seq_len=5"):
        m.forward(np.zeros((1, 6), dtype=int))
    with pytest.raises(ValueError, match="7"):
        m.forward(np.full((1, 2), 7))


# ------------------------------------------------------------ names and state
@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_names(tied):
    m = GPT(tiny(tied, n_layer=3), seed=0)
    assert list(m.state_dict()) == expected_names(3, tied)
    assert list(m.gradients()) == expected_names(3, tied)
    c = m.config
    shapes = {"wte": (7, 4), "wpe": (5, 4), "blocks.2.attn.qkv.W": (4, 12),
              "blocks.0.attn.proj.W": (4, 4), "blocks.1.mlp.fc1.W": (4, 6),
              "blocks.1.mlp.fc2.W": (6, 4), "blocks.0.mlp.fc1.b": (6,), "ln_f.gamma": (4,)}
    if not tied:
        shapes["lm_head.W"] = (c.d_model, c.vocab_size)
    for k, shape in shapes.items():
        assert m.parameters()[k].shape == shape, k
    assert m.num_parameters() == sum(v.size for v in m.state_dict().values())
    assert m.param_bytes() == 8 * m.num_parameters()
    assert GPT(tiny(tied), dtype=np.float32).param_bytes() == 4 * GPT(tiny(tied)).num_parameters()


def test_state_dict_is_a_copy_and_parameters_are_live():
    m = GPT(tiny(), seed=0)
    sd = m.state_dict()
    sd["wte"][...] = 5.0
    assert not (m.params["wte"] == 5.0).any()
    m.parameters()["blocks.1.mlp.fc1.W"][0, 0] = 42.0
    assert m.blocks[1].mlp.fc1.params["W"][0, 0] == 42.0


@pytest.mark.parametrize("tied", [False, True])
def test_load_state_dict_round_trip(tied):
    a, b = GPT(tiny(tied), seed=1), GPT(tiny(tied), seed=2)
    idx = np.random.default_rng(0).integers(0, 7, size=(2, 5))
    assert not np.array_equal(a.forward(idx, key=0), b.forward(idx, key=0))
    live = b.parameters()
    b.load_state_dict(a.state_dict())
    for k, v in b.parameters().items():
        assert v is live[k]                                  # copied in place
        np.testing.assert_array_equal(v, a.parameters()[k])
    np.testing.assert_array_equal(a.forward(idx, key=1), b.forward(idx, key=1))
    c = GPT(tiny(tied), seed=3, dtype=np.float32)
    c.load_state_dict(a.state_dict())                        # cast to the model dtype
    assert all(v.dtype == np.float32 for v in c.parameters().values())
    np.testing.assert_allclose(c.params["wte"], a.params["wte"], rtol=1e-6)


def test_load_state_dict_errors():
    m = GPT(tiny(), seed=0)
    before = m.state_dict()
    sd = m.state_dict()
    del sd["blocks.1.ln2.beta"]
    with pytest.raises(KeyError, match=r"blocks\.1\.ln2\.beta"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    sd["blocks.0.attn.bias"] = np.zeros(3)
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.bias"):
        m.load_state_dict(sd)
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    sd["wpe"] = np.zeros((6, 4))
    with pytest.raises(ValueError, match=r"wpe.*\(5, 4\).*\(6, 4\)"):
        m.load_state_dict(sd)
    untied_sd = m.state_dict()
    with pytest.raises(KeyError, match=r"lm_head\.W"):
        GPT(tiny(True)).load_state_dict(untied_sd)
    for k, v in m.state_dict().items():                     # nothing was half-written
        np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------------------ init
def test_same_seed_bit_identical():
    a, b, c = GPT(tiny(), seed=7), GPT(tiny(), seed=7), GPT(tiny(), seed=8)
    for k in a.parameters():
        assert a.parameters()[k].tobytes() == b.parameters()[k].tobytes(), k
    assert any(not np.array_equal(a.parameters()[k], c.parameters()[k]) for k in a.parameters())
    f32 = GPT(tiny(), seed=7, dtype=np.float32)
    for k in a.parameters():
        np.testing.assert_array_equal(f32.parameters()[k], a.parameters()[k].astype(np.float32))


def test_gpt2_style_init():
    m = GPT(GPTConfig(50, 16, 2, 4, 64), seed=0)
    p = m.parameters()
    for k, v in p.items():
        if k.endswith(".b") or k.endswith("beta"):
            assert not v.any(), k
        elif k.endswith("gamma"):
            assert (v == 1).all(), k
        else:
            assert abs(v.std() - 0.02) < 2e-3 and abs(v.mean()) < 2e-3, k


def test_init_random_changes_biases_and_layernorm():
    m = GPT(tiny(), seed=0).init_random_(np.random.default_rng(0))
    assert m.params["wte"].std() > 0.1
    assert m.blocks[0].ln1.params["beta"].any()
    assert not np.allclose(m.blocks[0].ln1.params["gamma"], 1.0)
    assert m.blocks[1].mlp.fc1.params["b"].any()


@pytest.mark.parametrize("vocab", [65, 300])
def test_initial_loss_is_log_vocab(vocab):
    m = GPT(GPTConfig(vocab, 16, 2, 2, 32), seed=0)
    rng = np.random.default_rng(0)
    idx, tgt = rng.integers(0, vocab, size=(4, 16)), rng.integers(0, vocab, size=(4, 16))
    assert m.loss(idx, tgt) == pytest.approx(math.log(vocab), abs=0.05)


def test_float32_model_stays_float32():
    m = GPT(tiny(), seed=0, dtype=np.float32)
    idx = np.random.default_rng(0).integers(0, 7, size=(2, 5))
    assert m.forward(idx).dtype == np.float32
    m.backward(np.ones((2, 5, 7), np.float32))
    assert all(g.dtype == np.float32 for g in m.gradients().values())
    ref = GPT(tiny(), seed=0)
    np.testing.assert_allclose(m.forward(idx, key=1), ref.forward(idx, key=1), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ config, flops, trace
def test_config_validation():
    assert GPTConfig(10, 8, 2, 2, 16).d_ff == 64
    assert GPTConfig(10, 8, 2, 2, 16, d_ff=20).d_ff == 20
    with pytest.raises(ValueError, match="d_model=10.*n_head=4"):
        GPTConfig(10, 8, 2, 4, 10)
    for bad in (dict(vocab_size=0), dict(seq_len=-1), dict(n_layer=2.0), dict(n_head=True),
                dict(d_ff=0)):
        args = dict(vocab_size=10, seq_len=8, n_layer=2, n_head=2, d_model=16)
        args.update(bad)
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            GPTConfig(**args)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 8), s=st.integers(1, 64), L=st.integers(1, 4), heads=st.integers(1, 4),
       d=st.integers(1, 16), vocab=st.integers(2, 100), tied=st.booleans())
def test_flops_formula(b, s, L, heads, d, vocab, tied):
    h = heads * d
    m = GPT(GPTConfig(vocab, s, L, heads, h, tie_weights=tied))
    # Narayanan et al. 2021, appendix: 24bsh² + 4bs²h per layer, plus the LM head
    assert m.flops(b, s) == L * formulas.layer_forward_flops(b, s, h) + 2 * b * s * h * vocab
    ff = 3 * h + 1
    m = GPT(GPTConfig(vocab, s, L, heads, h, d_ff=ff))
    assert m.flops(b, s) == \
        L * (2 * b * s * (4 * h * h + 2 * h * ff) + 4 * b * s * s * h) + 2 * b * s * h * vocab


def test_trace_events_and_ledger():
    m = GPT(tiny(n_layer=2), seed=0)
    idx = np.zeros((2, 4), dtype=int)
    tracer = trace.Tracer(rank=0)
    trace.activate(tracer)
    try:
        m.loss(idx, idx)
    finally:
        trace.activate(None)
    names = [e.name for e in tracer.select(category="compute")]
    assert names == ["embedding.forward", "block0.forward", "block1.forward", "head.forward",
                     "head.backward", "block1.backward", "block0.backward",
                     "embedding.backward"]
    blk = m.blocks[0].flops(2, 4)
    head = 2 * 2 * 4 * 4 * 7
    flops = {e.name: e.flops for e in tracer.events}
    assert flops["block1.forward"] == blk and flops["block0.backward"] == 2 * blk
    assert flops["head.forward"] == head and flops["head.backward"] == 2 * head
    assert sum(flops.values()) == 3 * m.flops(2, 4)
    assert tracer.memory.current["activations"] == 0
    assert tracer.memory.peak["activations"] > 0
