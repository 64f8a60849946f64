"""Tensor-parallel checks, written once as functions of a tp communicator.

pytest runs them in a threads world (``launch``); ``scripts/tensor_mpi.py`` runs
the same functions under ``mpiexec``.  Every check builds the reference module
from a seed on every rank (same weights everywhere), cuts the shards, runs both
and compares the forward output, the input gradient and every parameter
gradient gathered back to full shape (float64, max relative error <= 1e-10).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from simpar import trace
from simpar.nn import GPT, MLP, CausalSelfAttention, Embedding, GPTConfig, Linear, TransformerBlock
from simpar.parallel.tensor import (ColumnParallelLinear, NaiveTensorParallelMLP, ParallelAttention,
                                    ParallelGPT, ParallelMLP, ParallelTransformerBlock,
                                    RowParallelLinear, VocabParallelEmbedding, ring_bytes,
                                    vocab_parallel_cross_entropy,
                                    vocab_parallel_cross_entropy_backward)
from simpar.formulas import (recompute_flops, tp_activation_elements as activation_elements,
                             tp_layer_comm_elements as layer_comm_elements,
                             tp_mlp_comm_elements as mlp_comm_elements)
from simpar.parallel.tensor.mappings import split_along
from tests.util import assert_close

# shapes divisible by 1, 2, 3 and 4 (hidden, heads, d_ff, sequence)
B, S, H, N_HEAD, D_FF = 2, 12, 24, 12, 48



def rand(seed: int, *shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------------ layouts
# "rep": every rank holds the whole tensor; "seq": my slice of the sequence
# (axis 1); "hid": my slice of the hidden axis (-1).
def to_local(x, layout, tp):
    return {"rep": lambda: x.copy(), "seq": lambda: split_along(x, 1, tp),
            "hid": lambda: split_along(x, -1, tp)}[layout]()


def to_full(x, layout, tp):
    return {"rep": lambda: x, "seq": lambda: tp.all_gather(x, axis=1),
            "hid": lambda: tp.all_gather(x, axis=-1)}[layout]()


def compare_module(ref, par, x, dy, tp, what, inp="rep", out="rep"):
    """Forward, input gradient and every parameter gradient of ``par`` (run on
    shards) against ``ref`` (run on the whole tensors)."""
    with trace.untraced():
        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
    y = par.forward(to_local(x, inp, tp))
    assert_close(to_full(y, out, tp), y_ref, f"{what} forward")
    dx = par.backward(to_local(dy, out, tp))
    assert_close(to_full(dx, inp, tp), dx_ref, f"{what} input gradient")
    par.finalize_grads()
    compare_grads(par.full_gradients(), ref.gradients(), what)


def compare_grads(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: names differ: {set(got) ^ set(want)}"
    for name, g in want.items():
        assert_close(got[name], g, f"{what} gradient {name}")


# ------------------------------------------------------------- the checks
def check_linear_layers(tp) -> None:
    """Column- and row-parallel Linear in every mode (plain, gathered, sequence-parallel)."""
    ref = Linear(H, 36, rng=1).init_random_(np.random.default_rng(2))
    x, dy = rand(3, B, S, H), rand(4, B, S, 36)
    cases = [(ColumnParallelLinear, {}, "rep", "hid"),
             (ColumnParallelLinear, {"gather_output": True}, "rep", "rep"),
             (ColumnParallelLinear, {"sequence_parallel": True}, "seq", "hid")]
    for cls, opts, inp, out in cases:
        ref.zero_grad()
        compare_module(ref, cls.from_reference(ref, tp, **opts), x, dy, tp,
                       f"{cls.__name__}{opts}", inp, out)
    ref = Linear(36, H, rng=5).init_random_(np.random.default_rng(6))
    x, dy = rand(7, B, S, 36), rand(8, B, S, H)
    cases = [(RowParallelLinear, {}, "hid", "rep"),
             (RowParallelLinear, {"input_is_parallel": False}, "rep", "rep"),
             (RowParallelLinear, {"sequence_parallel": True}, "hid", "seq")]
    for cls, opts, inp, out in cases:
        ref.zero_grad()
        compare_module(ref, cls.from_reference(ref, tp, **opts), x, dy, tp,
                       f"{cls.__name__}{opts}", inp, out)


def check_mlp_and_attention(tp) -> None:
    """ParallelMLP, NaiveTensorParallelMLP and ParallelAttention, with and without SP."""
    x, dy = rand(11, B, S, H), rand(12, B, S, H)
    for sp in (False, True):
        io = "seq" if sp else "rep"
        mlp = MLP(H, D_FF, rng=13).init_random_(np.random.default_rng(14))
        compare_module(mlp, ParallelMLP.from_reference(mlp, tp, sp), x, dy, tp,
                       f"ParallelMLP sp={sp}", io, io)
        attn = CausalSelfAttention(H, N_HEAD, rng=15).init_random_(np.random.default_rng(16))
        compare_module(attn, ParallelAttention.from_reference(attn, tp, sp), x, dy, tp,
                       f"ParallelAttention sp={sp}", io, io)
    mlp = MLP(H, D_FF, rng=17).init_random_(np.random.default_rng(18))
    compare_module(mlp, NaiveTensorParallelMLP.from_reference(mlp, tp), x, dy, tp,
                   "NaiveTensorParallelMLP")


def check_block(tp) -> None:
    """TransformerBlock with and without sequence parallelism."""
    x, dy = rand(21, B, S, H), rand(22, B, S, H)
    for sp in (False, True):
        rng = np.random.default_rng(23)
        blk = TransformerBlock(H, N_HEAD, D_FF, rng=rng).init_random_(rng)
        io = "seq" if sp else "rep"
        compare_module(blk, ParallelTransformerBlock.from_reference(blk, tp, sp), x, dy, tp,
                       f"block sp={sp}", io, io)


def check_embedding_and_loss(tp) -> None:
    """Vocab-parallel embedding -> column-parallel head -> vocab-parallel
    cross-entropy, for vocabularies divisible by tp and not (padding)."""
    for vocab in (24, 13, 5):
        for sp in (False, True):
            _embedding_and_loss(tp, vocab, sp)


def _embedding_and_loss(tp, vocab, sp) -> None:
    from simpar.nn import functional as F
    what = f"embedding+loss V={vocab} sp={sp}"
    rng = np.random.default_rng(vocab)
    emb = Embedding(vocab, H, rng=rng).init_random_(rng)
    head = Linear(H, vocab, bias=False, rng=rng).init_random_(rng)
    idx = rng.integers(0, vocab, (B, S))
    tgt = rng.integers(0, vocab, (B, S))
    with trace.untraced():
        logits_ref = head.forward(emb.forward(idx))
        loss_ref, cache = F.cross_entropy(logits_ref, tgt)
        emb.backward(head.backward(F.cross_entropy_backward(cache)))
    p_emb = VocabParallelEmbedding.from_reference(emb, tp, sp)
    p_head = ColumnParallelLinear.from_reference(head, tp, sequence_parallel=sp, pad=True)
    logits = p_head.forward(p_emb.forward(idx))
    assert_close(tp.all_gather(logits, axis=-1)[..., :vocab], logits_ref, f"{what} logits")
    loss, cache = vocab_parallel_cross_entropy(logits, tgt, vocab, tp)
    assert_close(loss, loss_ref, f"{what} loss")
    dlogits = vocab_parallel_cross_entropy_backward(cache)
    n_real = vocab - tp.rank * logits.shape[-1]
    assert not dlogits[..., max(n_real, 0):].any(), "padding logits got a gradient"
    p_emb.backward(p_head.backward(dlogits))
    for par, ref, name in ((p_emb, emb, "embedding"), (p_head, head, "head")):
        par.finalize_grads()
        compare_grads(par.full_gradients(), ref.gradients(), f"{what} {name}")
    assert not p_head.grads["W"][:, max(n_real, 0):].any(), "padding columns got a gradient"


def gpt_config(vocab=24, tie=False) -> GPTConfig:
    return GPTConfig(vocab, S, n_layer=2, n_head=N_HEAD, d_model=H, d_ff=D_FF, tie_weights=tie)


def reference_gpt(cfg: GPTConfig):
    with trace.untraced():
        gpt = GPT(cfg, seed=0).init_random_(np.random.default_rng(1), std=0.3)
        rng = np.random.default_rng(2)
        idx = rng.integers(0, cfg.vocab_size, (B, S))
        tgt = rng.integers(0, cfg.vocab_size, (B, S))
        logits = gpt.forward(idx)
        gpt.clear_saved()
        loss = gpt.loss(idx, tgt)
    return gpt, idx, tgt, logits, loss


def check_gpt(tp) -> float:
    """A 2-layer GPT: logits, loss and every gradient; untied and tied, vocabulary
    divisible and not, with and without SP.  Returns the simulated time of the
    last step (bit-identical across backends)."""
    for vocab, tie in ((24, False), (13, True), (13, False)):
        cfg = gpt_config(vocab, tie)
        gpt, idx, tgt, logits_ref, loss_ref = reference_gpt(cfg)
        for sp in (False, True):
            what = f"GPT V={vocab} tie={tie} sp={sp}"
            par = ParallelGPT.from_reference(gpt, tp, sp)
            logits = tp.all_gather(par.forward(idx), axis=-1)[..., :vocab]
            par.clear_saved()
            assert_close(logits, logits_ref, f"{what} logits")
            tp.barrier()
            tp.tracer.reset()
            loss = par.loss(idx, tgt)
            par.finalize_grads()
            sim_time = tp.tracer.sim_now
            assert_close(loss, loss_ref, f"{what} loss")
            compare_grads(par.full_gradients(), gpt.gradients(), what)
    return sim_time


# ------------------------------------------------------- counting messages
def _comm_since(tp, mark: int):
    return [e for e in tp.tracer.events[mark:] if e.category == "comm" and e.group == tp.name]


def _count(events) -> Counter:
    return Counter(e.name for e in events)


def _elements(events) -> float:
    return sum(ring_bytes(e) for e in events) / 8      # float64


def check_layer_communication(tp) -> None:
    """Per transformer layer: 2 all-reduces forward, 2 backward, 8·bsh(t−1)/t
    elements per device; with SP 2 all-gathers + 2 reduce-scatters each way, the
    same bytes, plus one all-reduce of the 6h sequence-parallel parameter
    gradients when the step is finalised.  Counted inside a 2-layer GPT, layer by
    layer, and for a standalone MLP, naive and Megatron."""
    t, bsh = tp.size, B * S * H
    for sp in (False, True):
        gpt, idx, tgt, _, _ = reference_gpt(gpt_config())
        par = ParallelGPT.from_reference(gpt, tp, sp)
        x = par.embed_forward(idx)
        per_layer = []
        for blk in par.blocks:
            mark = len(tp.tracer.events)
            x = blk.forward(x)
            per_layer.append([_comm_since(tp, mark)])
        logits = par.head_forward(x)
        _, cache = vocab_parallel_cross_entropy(logits, tgt, gpt.config.vocab_size, tp)
        dx = par.head_backward(vocab_parallel_cross_entropy_backward(cache))
        for i in reversed(range(len(par.blocks))):
            mark = len(tp.tracer.events)
            dx = par.blocks[i].backward(dx)
            per_layer[i].append(_comm_since(tp, mark))
        par.embed_backward(dx)
        for fwd, bwd in per_layer:
            want = {"all_gather": 2, "reduce_scatter": 2} if sp else {"all_reduce": 2}
            assert _count(fwd) == want and _count(bwd) == want, (sp, _count(fwd), _count(bwd))
            assert {e.nbytes for e in fwd + bwd} == {bsh * 8}, "every message is (b, s, h)"
            assert _elements(fwd + bwd) == layer_comm_elements(B, S, H, t)
            assert _elements(fwd + bwd) == 8 * bsh * (t - 1) / t
        mark = len(tp.tracer.events)
        par.finalize_grads()
        final = _comm_since(tp, mark)
        # SP: ln1, ln2 (2h each), proj.b, fc2.b (h each) per layer; ln_f (2h); wpe (s·h)
        sp_params = 2 * 6 * H + 2 * H + S * H
        assert [(e.name, e.nbytes) for e in final] == ([("all_reduce", 8 * sp_params)]
                                                       if sp else [])
    for cls, naive in ((ParallelMLP, False), (NaiveTensorParallelMLP, True)):
        mlp = MLP(H, D_FF, rng=31)
        par = cls.from_reference(mlp, tp)
        mark = len(tp.tracer.events)
        par.forward(rand(32, B, S, H))
        par.backward(rand(33, B, S, H))
        events = _comm_since(tp, mark)
        assert _elements(events) == mlp_comm_elements(B, S, H, D_FF, t, naive)
        if naive:
            assert _count(events) == {"all_gather": 2, "all_reduce": 2}
            assert _elements(events) == 3 * B * S * (D_FF + H) * (t - 1) / t
        else:
            assert _count(events) == {"all_reduce": 2}


# ------------------------------------------------------- activation memory
def check_activation_memory(tp) -> None:
    """The ledger's activation bytes after one block forward equal the formula
    of :func:`activation_elements` (spelled out here again), and return to zero
    after backward."""
    t = tp.size
    ledger = tp.tracer.memory
    rng = np.random.default_rng(41)
    blk = TransformerBlock(H, N_HEAD, 4 * H, rng=rng)          # d_ff = 4h, as in the paper
    for sp in (False, True):
        par = ParallelTransformerBlock.from_reference(blk, tp, sp)
        x = rand(42, B, S // t if sp else S, H)
        before = ledger.current.get("activations", 0)
        y = par.forward(x)
        saved = ledger.current["activations"] - before
        b, s, h, a = B, S, H, N_HEAD
        if sp:
            spelled = b * s * h * (2 + 14 / t) + 2 * b * s / t + a * b * s * s / t
        else:
            spelled = b * s * h * (4 + 12 / t) + 2 * b * s + a * b * s * s / t
        assert saved == 8 * activation_elements(B, S, H, N_HEAD, t, 4 * H, sp), (sp, saved)
        assert saved == 8 * spelled, (sp, saved, 8 * spelled)
        par.backward(np.ones_like(y))
        assert ledger.current["activations"] == before


# ------------------------------------------------ zero-bubble I / W split
def check_weight_grad_split(tp) -> None:
    """``backward_input`` then ``backward_weights`` give exactly the gradients of
    one ``backward`` (bit for bit; the tied ``wte`` sums its two uses in the other
order: to rounding) — tied and untied head, with and without SP; after ``I`` no
    linear weight has a gradient yet and its inputs wait under the key; ``W``
    sends no message and leaves nothing saved."""
    for tie in (False, True):
        gpt, idx, tgt, _, _ = reference_gpt(gpt_config(13, tie))
        for sp in (False, True):
            what = f"split tie={tie} sp={sp}"
            plain = ParallelGPT.from_reference(gpt, tp, sp)
            plain.loss(idx, tgt)
            par = ParallelGPT.from_reference(gpt, tp, sp)
            logits = par.forward(idx, key=3)
            _, cache = vocab_parallel_cross_entropy(logits, tgt, 13, tp)
            par.backward_input(vocab_parallel_cross_entropy_backward(cache), key=3)
            assert par.saved_keys() == [3], what
            for name, g in par.gradients().items():
                if name.endswith(("qkv.W", "proj.W", "fc1.W", "fc2.W", "lm_head.W")):
                    assert not g.any(), f"{what}: {name} computed by I"
            mark = len(tp.tracer.events)
            par.backward_weights(key=3)
            assert _comm_since(tp, mark) == [], f"{what}: W communicates"
            names = {e.name for e in tp.tracer.events[mark:]}
            assert "block0.attn.qkv.backward_weights" in names, names
            assert par.saved_keys() == [], what
            plain.finalize_grads()
            par.finalize_grads()
            for name, g in plain.gradients().items():
                if tie and name == "wte":       # two uses summed in the other order
                    assert_close(par.gradients()[name], g, f"{what} {name}")
                else:                           # the very same GEMMs: bit for bit
                    np.testing.assert_array_equal(par.gradients()[name], g, f"{what} {name}")


# ------------------------------------------------ activation recomputation
def check_recompute(tp) -> None:
    """Per block and device, with and without SP, recompute none / selective /
    full: the ledger holds exactly ``activation_elements(..., recompute)`` after
    forward; backward gives bit for bit the gradients of no recomputation; the
    FLOPs added equal :func:`recompute_flops`; full recomputation re-runs the
    forward's collectives in backward (2 all-reduces, or 2 all-gathers + 2
    reduce-scatters under SP), selective none."""
    t = tp.size
    ledger = tp.tracer.memory
    rng = np.random.default_rng(51)
    blk = TransformerBlock(H, N_HEAD, 4 * H, rng=rng).init_random_(rng, std=0.3)
    for sp in (False, True):
        x = to_local(rand(52, B, S, H), "seq" if sp else "rep", tp)
        dy = to_local(rand(53, B, S, H), "seq" if sp else "rep", tp)
        base = None
        for mode in ("none", "selective", "full"):
            what = f"recompute={mode} sp={sp}"
            par = ParallelTransformerBlock.from_reference(blk, tp, sp)
            par.set_recompute(mode)
            before = ledger.current.get("activations", 0)
            par.forward(x, key=1)
            saved = ledger.current["activations"] - before
            assert saved == 8 * activation_elements(B, S, H, N_HEAD, t, 4 * H, sp, mode), \
                (what, saved)
            mark = len(tp.tracer.events)
            dx = par.backward(dy, key=1)
            events = tp.tracer.events[mark:]
            assert ledger.current["activations"] == before, what
            par.finalize_grads()
            got = (dx, par.gradients(), _count(_comm_since(tp, mark)),
                   sum(e.flops for e in events if e.category == "compute"))
            if base is None:
                base = got
                continue
            np.testing.assert_array_equal(got[0], base[0], f"{what} dx")
            for name, g in base[1].items():
                np.testing.assert_array_equal(got[1][name], g, f"{what} {name}")
            assert got[3] - base[3] == recompute_flops(B, S, H, t, mode), (what, got[3], base[3])
            extra = got[2] - base[2]
            if mode == "full":
                want = {"all_gather": 2, "reduce_scatter": 2} if sp else {"all_reduce": 2}
                assert extra == Counter(want) and base[2] - got[2] == Counter(), (what, extra)
            else:
                assert got[2] == base[2], (what, got[2], base[2])


CHECKS = [check_linear_layers, check_mlp_and_attention, check_block, check_embedding_and_loss,
          check_gpt, check_layer_communication, check_activation_memory,
          check_weight_grad_split, check_recompute]
