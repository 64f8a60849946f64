"""Activation recomputation on the reference GPT (Korthikanti et al. 2022, §5):
bit-for-bit equal loss and gradients, the ledger's saved bytes per layer equal to
the formula, and the FLOPs added equal to one forward (full) or the attention
core (selective)."""
import numpy as np
import pytest

from simpar import formulas, trace
from simpar.nn import GPT, GPTConfig
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig
from simpar.formulas import recompute_flops, tp_activation_elements as activation_elements

B, S, H, A, V = 2, 8, 16, 4, 11
MODES = ("none", "selective", "full")


def _cfg(tied=False, layers=2):
    return GPTConfig(vocab_size=V, seq_len=S, n_layer=layers, n_head=A, d_model=H,
                     tie_weights=tied)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, S)), rng.integers(0, V, (B, S))


def _run(model, split=False):
    """Loss, gradients, per-block saved bytes and compute events of one step."""
    idx, tgt = _batch()
    tr = trace.Tracer(0)
    trace.activate(tr)
    try:
        x = model.embed_forward(idx, key="m")
        a0 = tr.memory.current.get("activations", 0)
        model.blocks[0].forward(x, key="m")
        per_block = tr.memory.current["activations"] - a0
        model.clear_saved()
        tr.reset()
        if split:
            from simpar.nn import functional as F
            logits = model.forward(idx, key=0)
            loss, cache = F.cross_entropy(logits, tgt)
            model.backward_input(F.cross_entropy_backward(cache), key=0)
            model.backward_weights(0)
        else:
            loss = model.loss(idx, tgt)
    finally:
        trace.activate(None)
    assert model.saved_keys() == []
    return loss, {k: g.copy() for k, g in model.gradients().items()}, per_block, tr.events


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("split", [False, True], ids=["backward", "zero-bubble I+W"])
def test_bit_for_bit_ledger_and_flops(tied, split):
    base = None
    for mode in MODES:
        model = GPT(_cfg(tied), seed=3, recompute=mode).init_random_(np.random.default_rng(4))
        loss, grads, per_block, events = _run(model, split)
        assert per_block == 8 * activation_elements(B, S, H, A, 1, recompute=mode), mode
        flops = sum(e.flops for e in events)
        if base is None:
            base = loss, grads, flops
            continue
        assert loss == base[0], mode
        for k, g in base[1].items():
            np.testing.assert_array_equal(grads[k], g, err_msg=f"{mode} {k}")
        added = flops - base[2]
        assert added == 2 * recompute_flops(B, S, H, 1, mode), mode     # two blocks
        names = [e.name for e in events if e.name.endswith("recompute")]
        assert names == (["block1.recompute", "block0.recompute"] if mode == "full" else
                         ["block1.attn.recompute", "block0.attn.recompute"]), names


def test_formulas_spelled_out_and_next_to_korthikanti():
    """simpar's saved elements per layer (float64 here) against the paper's rows:
    the selective saving is exactly the a·b·s² probabilities (the paper's 5as/h
    term is 5 bytes per score with dropout); full keeps the input (2sbh bytes in
    16-bit = sbh elements)."""
    b, s, h, a = B, S, H, A
    assert activation_elements(b, s, h, a, 1) == 16 * b * s * h + 2 * b * s + a * b * s * s
    assert activation_elements(b, s, h, a, 1, recompute="selective") == 16 * b * s * h + 2 * b * s
    assert activation_elements(b, s, h, a, 1, recompute="full") == b * s * h
    assert 2 * activation_elements(b, s, h, a, 1, recompute="full") == \
        formulas.recompute_activation_bytes_per_layer(s, b, h)              # 2 bytes each
    for t in (1, 2, 4, 8):
        none = activation_elements(b, s, h, a, t, sequence_parallel=True)
        sel = activation_elements(b, s, h, a, t, sequence_parallel=True, recompute="selective")
        assert none - sel == a * b * s * s // t
        paper_none = formulas.activation_bytes_per_layer(s, b, h, a, t, True)
        paper_sel = formulas.recompute_activation_bytes_per_layer(s, b, h, t, selective=True)
        assert paper_none - paper_sel == pytest.approx(5 * a * s * s * b / t)
    assert recompute_flops(b, s, h, 1, "full") == formulas.layer_forward_flops(b, s, h)
    assert recompute_flops(b, s, h, 2, "selective") == 4 * b * s * s * h / 2


def test_moe_gpt_full_and_selective_bit_for_bit():
    cfg = MoEGPTConfig(vocab_size=V, seq_len=S, n_layer=2, n_head=A, d_model=H, n_experts=4,
                       top_k=2, moe_layers=(1,))
    idx, tgt = _batch(1)
    runs = {}
    for mode in MODES:
        m = MoEGPT(cfg, seed=0, recompute=mode).init_random_(np.random.default_rng(2), std=0.4)
        runs[mode] = m.loss(idx, tgt), m.gradients()
        assert m.saved_keys() == []
    for mode in ("selective", "full"):
        assert runs[mode][0] == runs["none"][0]
        for k, g in runs["none"][1].items():
            np.testing.assert_array_equal(runs[mode][1][k], g, err_msg=f"{mode} {k}")


def test_set_recompute_checks_the_mode_and_reaches_every_block():
    m = GPT(_cfg(layers=3), seed=0)
    assert {b.recompute for b in m.blocks} == {"none"}
    m.set_recompute("full")
    assert {b.recompute for b in m.blocks} == {"full"} and m.blocks[2].attn.recompute == "full"
    with pytest.raises(ValueError, match="recompute must be one of"):
        m.set_recompute("some")
    with pytest.raises(ValueError, match="recompute must be one of"):
        GPT(_cfg(), recompute=True)


def test_negative_control_recompute_with_other_weights_differs():
    """The bit-for-bit check can fail: when a weight changes between forward and
    backward, a recomputed forward sees the new weight and the kept activations
    the old one, so the two runs' gradients differ."""
    from simpar.nn import functional as F
    idx, tgt = _batch()
    grads = {}
    for mode in ("none", "full"):
        model = GPT(_cfg(), seed=3, recompute=mode).init_random_(np.random.default_rng(4))
        _, cache = F.cross_entropy(model.forward(idx), tgt)
        model.blocks[0].attn.qkv.params["W"][0, 0] += 1e-6     # changed between F and B
        model.backward(F.cross_entropy_backward(cache))
        grads[mode] = model.gradients()["blocks.0.attn.qkv.W"]
    assert not np.array_equal(grads["none"], grads["full"])
