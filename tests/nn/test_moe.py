"""The reference Mixture-of-Experts layer and the MoE GPT: routing rules checked by
hand and against a plain-loop oracle, gradients by finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simpar import launch
from simpar.nn import GPT, GPTConfig
from simpar.nn import functional as F
from simpar.nn.moe import (MoE, expert_capacity, load_balance_loss, route, router_z_loss,
                           top_k)
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig, MoETransformerBlock
from tests.nn.gradcheck import assert_grad_close, numerical_grad


# ------------------------------------------------------------- capacity, top-k
def test_capacity_formula():
    # C = ceil(k * tokens / experts * capacity_factor), worked by hand
    assert expert_capacity(12, 4, 1, 1.0) == 3
    assert expert_capacity(12, 4, 2, 1.0) == 6
    assert expert_capacity(10, 4, 1, 1.2) == 3          # 3.0 exactly, not 3.0000000000000004
    assert expert_capacity(10, 4, 1, 1.25) == 4         # 3.125
    assert expert_capacity(5, 4, 1, 0.1) == 1           # 0.125
    assert expert_capacity(7, 3, 2, None) == 7          # no limit: every token fits


def test_top_k_ties_go_to_the_lowest_expert_index():
    p = np.array([[0.25, 0.25, 0.25, 0.25],
                  [0.1, 0.4, 0.1, 0.4],
                  [0.3, 0.1, 0.3, 0.3]])
    e1, g1 = top_k(p, 1)
    assert e1[:, 0].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(g1[:, 0], [0.25, 0.4, 0.3])      # Switch: gate = p
    e2, g2 = top_k(p, 2)
    assert e2.tolist() == [[0, 1], [1, 3], [0, 2]]
    np.testing.assert_allclose(g2, [[0.5, 0.5]] * 3)                # renormalised


def _probs(rows):
    p = np.array(rows, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def test_route_position_policy_keeps_first_choices_first():
    # 4 tokens, 3 experts, k=2, capacity 2.  First choices: 0, 0, 0, 1;
    # second choices: 1, 2, 1, 2.  Queues in position order (all first choices,
    # then all second choices):  expert 0: t0 t1 [t2 dropped];  expert 1: t3 t0 [t2 dropped];
    # expert 2: t1 t3.
    p = _probs([[5, 3, 1], [5, 1, 3], [5, 3, 1], [1, 5, 3]])
    r = route(p, k=2, capacity=2, drop_policy="position")
    assert r.experts.tolist() == [[0, 1], [0, 2], [0, 1], [1, 2]]
    assert r.kept.tolist() == [[True, True], [True, True], [False, False], [True, True]]
    tok, cho = r.dispatch()                       # sorted by expert, then queue place
    assert list(zip(tok.tolist(), cho.tolist())) == [(0, 0), (1, 0), (3, 0), (0, 1),
                                                     (1, 1), (3, 1)]
    assert r.routed_per_expert().tolist() == [3, 3, 2]
    assert r.kept_per_expert().tolist() == [2, 2, 2]


def test_route_probability_policy_keeps_the_most_confident():
    # all three tokens want expert 0; capacity 1: the most probable (token 2) wins
    p = _probs([[6, 4], [7, 3], [9, 1]])
    r = route(p, k=1, capacity=1, drop_policy="probability")
    assert r.kept[:, 0].tolist() == [False, False, True]
    r = route(p, k=1, capacity=1, drop_policy="position")
    assert r.kept[:, 0].tolist() == [True, False, False]


def _oracle(probs, k, capacity, policy):
    """Plain loops: the kept set and the dispatch order, from the documented rules."""
    T, n = probs.shape
    choices = [sorted(range(n), key=lambda e: (-probs[t, e], e))[:k] for t in range(T)]
    assignments = [(j, t) for j in range(k) for t in range(T)]          # position order
    if policy == "probability":
        assignments.sort(key=lambda a: -probs[a[1], choices[a[1]][a[0]]])   # stable
    queues = {e: [] for e in range(n)}
    kept = np.zeros((T, k), bool)
    for j, t in assignments:
        q = queues[choices[t][j]]
        if len(q) < capacity:
            q.append((t, j))
            kept[t, j] = True
    order = [a for e in range(n) for a in queues[e]]
    return np.array(choices), kept, order


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), n=st.integers(1, 6), k_seed=st.integers(0, 5),
       cf=st.sampled_from([None, 0.3, 0.5, 1.0, 1.25, 2.0]),
       policy=st.sampled_from(["position", "probability"]), seed=st.integers(0, 1000),
       ties=st.booleans())
def test_route_matches_the_plain_loop_oracle(T, n, k_seed, cf, policy, seed, ties):
    k = 1 + k_seed % n
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 3, size=(T, n)).astype(float) if ties else rng.standard_normal((T, n))
    p = F.softmax(logits)
    C = expert_capacity(T, n, k, cf)
    r = route(p, k, C, policy)
    experts, kept, order = _oracle(p, k, C, policy)
    np.testing.assert_array_equal(r.experts, experts)
    np.testing.assert_array_equal(r.kept, kept)
    tok, cho = r.dispatch()
    assert list(zip(tok.tolist(), cho.tolist())) == order
    assert (r.kept_per_expert() <= C).all()
    assert r.routed_per_expert().sum() == k * T
    if k > 1:
        np.testing.assert_allclose(r.gates.sum(axis=1), 1.0)


# ------------------------------------------------------------------ layer
def _layer(k=1, cf=None, groups=1, policy="position", n=4, h=4, d_ff=6, seed=1, **kw):
    m = MoE(h, n, d_ff, k=k, capacity_factor=cf, groups=groups, drop_policy=policy,
            rng=seed, **kw)
    return m.init_random_(np.random.default_rng(seed + 1), std=0.5)


@pytest.mark.parametrize("k,cf,groups,policy", [
    (1, None, 1, "position"), (2, None, 1, "position"),
    (1, 0.5, 2, "position"), (2, 0.6, 2, "position"), (2, 0.6, 3, "probability")])
def test_gradients_by_finite_differences(k, cf, groups, policy):
    """Loss = Σ w·y + auxiliary losses: input and every parameter (router, experts)."""
    m = _layer(k, cf, groups, policy)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((groups * 2, 3, 4))
    w = rng.standard_normal(x.shape)
    m.forward(x)
    st_ = m.stats[0]
    if cf is not None:
        assert st_.dropped_fraction > 0, "weak test: nothing dropped"
    m.zero_grad()
    dx = m.backward(w)
    assert m.saved_keys() == []

    def f():
        y = m.forward(x, key="fd")
        m.clear_saved("fd")
        return float(np.sum(w * y)) + m.stats["fd"].aux_loss

    assert_grad_close(dx, numerical_grad(f, x), "input")
    for name, p in m.parameters().items():
        if name.startswith("experts.") and np.abs(m.gradients()[name]).max() == 0:
            # an expert that received no token has no gradient: confirm numerically
            assert np.abs(numerical_grad(f, p)).max() < 1e-9, name
            continue
        assert_grad_close(m.gradients()[name], numerical_grad(f, p), name)


def test_dropped_tokens_get_zero_output():
    """Every token prefers expert 0; capacity 2 of 8 tokens: tokens 2-7 are dropped."""
    h, n = 3, 4
    m = MoE(h, n, 5, k=1, capacity_factor=1.0, rng=0)
    m.router.params["W"][...] = 0.0
    m.router.params["W"][:, 0] = 1.0
    x = np.abs(np.random.default_rng(0).standard_normal((8, h))) + 0.5
    y = m.forward(x)
    assert m.stats[0].capacity == 2
    assert m.stats[0].kept_per_expert.tolist() == [2, 0, 0, 0]
    assert m.stats[0].routed_per_expert.tolist() == [8, 0, 0, 0]
    assert m.stats[0].dropped_fraction == 0.75
    np.testing.assert_array_equal(y[2:], 0.0)
    p = F.softmax(x @ m.router.params["W"])
    e0 = m.experts[0]
    for t in (0, 1):                              # kept: gate times the expert's output
        want = p[t, 0] * F.linear_forward(F.gelu(F.linear_forward(
            x[t:t + 1], e0.fc1.params["W"], e0.fc1.params["b"])), e0.fc2.params["W"],
            e0.fc2.params["b"])
        np.testing.assert_allclose(y[t:t + 1], want, rtol=1e-13)
    m.backward(np.ones_like(y))


# -------------------------------------------------------- auxiliary losses
def test_balance_loss_is_one_for_uniform_routing():
    n, T = 4, 12
    logits = np.zeros((T, n))
    logits[np.arange(T), np.arange(T) % n] = 2.0     # token t prefers expert t mod n
    p = F.softmax(logits)
    experts, _ = top_k(p, 1)
    value, _ = load_balance_loss(p, experts)        # f_i = P_i = 1/n
    assert abs(value - 1.0) < 1e-14
    # k = 2, still uniform: second choices spread evenly too
    logits2 = logits.copy()
    logits2[np.arange(T), (np.arange(T) + 1) % n] = 1.0
    p2 = F.softmax(logits2)
    assert abs(load_balance_loss(p2, top_k(p2, 2)[0])[0] - 1.0) < 1e-14
    # collapsed routing: everything on expert 0 with probability ~1 costs ~n
    pc = F.softmax(np.tile([30.0, 0, 0, 0], (T, 1)))
    assert abs(load_balance_loss(pc, top_k(pc, 1)[0])[0] - n) < 1e-9


def test_balance_loss_of_the_layer_is_one_for_uniform_routing():
    h = n = 4
    m = MoE(h, n, 6, k=1, capacity_factor=None, rng=0)
    m.router.params["W"][...] = 3.0 * np.eye(n)
    x = np.tile(np.eye(n), (3, 1))                   # 12 tokens, 3 per expert
    m.forward(x)
    assert m.stats[0].routed_per_expert.tolist() == [3, 3, 3, 3]
    assert abs(m.stats[0].balance_loss - 1.0) < 1e-14
    z = x @ m.router.params["W"]
    lse = np.log(np.exp(z).sum(axis=1))
    assert abs(m.stats[0].z_loss - np.mean(lse ** 2)) < 1e-12
    assert abs(m.stats[0].aux_loss - (0.01 * 1.0 + 0.001 * np.mean(lse ** 2))) < 1e-14


@pytest.mark.parametrize("which", ["balance", "z"])
def test_aux_loss_gradient_reaches_the_router(which):
    """With a zero output gradient, only the auxiliary loss drives the router:
    its gradient is nonzero and matches finite differences."""
    coefs = {"balance_coef": 0.01, "z_coef": 0.0} if which == "balance" else \
        {"balance_coef": 0.0, "z_coef": 0.001}
    m = _layer(k=2, cf=0.75, **coefs)
    x = np.random.default_rng(5).standard_normal((10, 4))
    m.forward(x)
    m.zero_grad()
    dx = m.backward(np.zeros_like(x))
    g = m.gradients()["router.W"]
    assert np.abs(g).max() > 1e-6
    assert np.abs(dx).max() > 1e-6

    def f():
        m.forward(x, key="fd")
        m.clear_saved("fd")
        return m.stats["fd"].aux_loss

    assert_grad_close(g, numerical_grad(f, m.router.params["W"]), "router.W (aux only)")
    assert_grad_close(dx, numerical_grad(f, x), "input (aux only)")
    for name, eg in m.gradients().items():                 # experts see no aux gradient
        if name.startswith("experts."):
            assert not eg.any(), name


def test_z_loss_gradient_formula():
    z = np.random.default_rng(0).standard_normal((5, 3))
    p = F.softmax(z)
    _, dz = router_z_loss(z, p)

    def f():
        return router_z_loss(z, F.softmax(z))[0]
    assert_grad_close(dz, numerical_grad(f, z), "logits")


def test_stats_are_recorded_by_the_tracer():
    def fn(comm):
        m = _layer(k=1, cf=0.75, groups=2)
        x = np.random.default_rng(0).standard_normal((4, 3, 4))
        m.forward(x)
        ev = comm.tracer.select("compute", "moe.router.forward")
        assert len(ev) == 1
        return ev[0].args["moe"], m.stats[0], x, m.router.params["W"].copy()
    rec, stats, x, W = launch(fn, 1, timeout=30)[0]
    # independently: argmax of the router logits, per group of 6 tokens
    choice = np.argmax(x.reshape(-1, 4) @ W, axis=1)
    assert rec["routed_per_expert"] == np.bincount(choice, minlength=4).tolist()
    C = math.ceil(1 * 6 / 4 * 0.75)
    kept = sum(np.minimum(np.bincount(choice[g * 6:(g + 1) * 6], minlength=4), C)
               for g in range(2))
    assert rec["kept_per_expert"] == kept.tolist()
    assert rec["capacity"] == C
    assert rec["dropped_fraction"] == pytest.approx(1 - kept.sum() / 12)
    assert rec["aux_loss"] == stats.aux_loss


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,text", [
    ({"k": 5}, "k=5 is larger than the number of experts n_experts=4"),
    ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"capacity_factor": -1.5}, "-1.5"),
    ({"capacity_factor": float("nan")}, "nan"),
    ({"drop_policy": "random"}, "'random'"),
    ({"k": 0}, "k must be a positive integer, got 0"),
    ({"groups": 0}, "groups must be a positive integer, got 0"),
])
def test_bad_config_is_rejected(kw, text):
    with pytest.raises(ValueError) as info:
        MoE(4, 4, **kw)
    assert text in str(info.value)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., h=4\), got \(3, 5\)"):
        MoE(4, 4, rng=0).forward(np.zeros((3, 5)))


def test_tokens_not_divisible_into_groups():
    m = MoE(4, 4, groups=3, rng=0)
    with pytest.raises(ValueError, match="10 tokens cannot be split into groups=3"):
        m.forward(np.zeros((10, 4)))


# ---------------------------------------------------------------- MoE GPT
def _gpt_config(**kw):
    base = dict(vocab_size=7, seq_len=4, n_layer=2, n_head=2, d_model=4, d_ff=6,
                n_experts=3, top_k=2, capacity_factor=0.8, moe_layers=(1,))
    base.update(kw)
    return MoEGPTConfig(**base)


def test_moe_gpt_without_moe_layers_is_the_dense_gpt():
    cfg = _gpt_config(moe_layers=())
    dense = GPT(GPTConfig(7, 4, 2, 2, 4, 6), seed=5)
    moe = MoEGPT(cfg, seed=5)
    assert list(moe.parameters()) == list(dense.parameters())
    idx = np.random.default_rng(0).integers(0, 7, (2, 4))
    np.testing.assert_array_equal(moe.forward(idx), dense.forward(idx))


def test_moe_gpt_names_and_dense_layers_unchanged():
    dense = GPT(GPTConfig(7, 4, 2, 2, 4, 6), seed=5)
    moe = MoEGPT(_gpt_config(), seed=5)
    names = list(moe.parameters())
    assert "blocks.1.moe.router.W" in names and "blocks.1.moe.experts.2.fc2.b" in names
    assert not any(n.startswith("blocks.1.mlp") for n in names)
    assert isinstance(moe.blocks[1], MoETransformerBlock)
    for name, p in dense.parameters().items():       # block 0, embeddings, head: same draw
        if not name.startswith("blocks.1."):
            np.testing.assert_array_equal(moe.parameters()[name], p)


def test_moe_gpt_loss_adds_aux_and_gradients_by_finite_differences():
    model = MoEGPT(_gpt_config(), seed=0)
    model.init_random_(np.random.default_rng(1), std=0.4)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 7, (2, 4))
    tgt = rng.integers(0, 7, (2, 4))
    loss = model.loss(idx, tgt)
    layer = model.blocks[1].moe
    assert layer.stats[0].dropped_fraction > 0, "weak test: nothing dropped"
    assert layer.stats[0].aux_loss > 0
    ce = model.eval_loss(idx, tgt)
    assert abs(loss - (ce + layer.stats[0].aux_loss)) < 1e-12
    assert model.saved_keys() == []

    def f():
        logits = model.forward(idx, key="fd")
        v = F.cross_entropy(logits, tgt)[0] + model.aux_loss("fd")
        model.clear_saved("fd")
        return v

    for name, p in model.parameters().items():
        g = model.gradients()[name]
        if name.startswith("blocks.1.moe.experts.") and not g.any():
            assert np.abs(numerical_grad(f, p)).max() < 1e-9, name
            continue
        assert_grad_close(g, numerical_grad(f, p), name)


@pytest.mark.parametrize("kw,text", [
    ({"moe_layers": (2,)}, "moe_layers [2] out of range for n_layer=2"),
    ({"top_k": 4}, "k=4 is larger than the number of experts n_experts=3"),
    ({"capacity_factor": 0}, "capacity_factor must be > 0"),
])
def test_moe_gpt_config_errors(kw, text):
    with pytest.raises(ValueError) as info:
        _gpt_config(**kw)
    assert text in str(info.value)


# ------------------------------------------------ deferred weight gradients
def test_deferred_weight_grads_match_the_plain_backward():
    """Zero-bubble split: backward_input, then backward_weights, gives the same
    gradients as one backward (MoE layer and MoE GPT)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    w = rng.standard_normal(x.shape)
    idx = rng.integers(0, 7, (2, 4))
    dlogits = rng.standard_normal((2, 4, 7))
    for make, inp, dy in ((lambda: _layer(k=2, cf=0.6), x, w),
                          (lambda: MoEGPT(_gpt_config(), seed=0).init_random_(
                              np.random.default_rng(1), std=0.4), idx, dlogits)):
        plain, split = make(), make()
        plain.forward(inp)
        dx_plain = plain.backward(dy)
        split.forward(inp)
        dx_split = split.backward_input(dy)
        assert split.gradients()["router.W" if "router.W" in split.gradients()
                                 else "blocks.1.moe.router.W"].any()   # router: not deferred
        split.backward_weights()
        assert split.saved_keys() == []
        if dx_plain is not None:
            np.testing.assert_allclose(dx_split, dx_plain, rtol=0, atol=1e-14)
        for name, g in plain.gradients().items():
            np.testing.assert_allclose(split.gradients()[name], g, rtol=1e-13, atol=1e-15,
                                       err_msg=name)
