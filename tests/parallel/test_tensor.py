"""Tensor (and sequence) parallelism equals the reference, on both backends.

The checks live in :mod:`tests.parallel.tensor_checks`; here they run in a threads
world for tp = 1..4, and once under ``mpiexec -n 4`` (all tp sizes in one job).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import launch
from simpar.nn import GPT, MLP, CausalSelfAttention, GPTConfig, Linear, TransformerBlock
from simpar.nn import functional as F
from simpar.parallel.tensor import (ColumnParallelLinear, ParallelAttention, ParallelGPT,
                                    ParallelMLP, ParallelTransformerBlock, RowParallelLinear,
                                    vocab_parallel_cross_entropy,
                                    vocab_parallel_cross_entropy_backward)
from simpar.parallel.tensor.mappings import scatter_to_sp_region
from tests.mpi_util import run_mpi
from tests.parallel.tensor_checks import CHECKS, check_gpt
from tests.util import assert_close

TP_SIZES = [1, 2, 3, 4]


def on_tp(check, t):
    """Run ``check(tp)`` on every rank of a t-rank threads world; results per rank."""
    return launch(lambda comm: check(comm.split(0, comm.rank, name="tp")), t, timeout=60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("t", TP_SIZES)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_threads(check, t):
    on_tp(check, t)


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_mpi():
    res = run_mpi(4, "tests/parallel/scripts/tensor_mpi.py", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    for t in TP_SIZES:
        for check in CHECKS:
            assert f"ok tp={t} {check.__name__}" in res.stdout, res.stdout + res.stderr
        # the simulated clock of a GPT step is bit-identical across backends
        line = next(l for l in res.stdout.splitlines() if l.startswith(f"simtime tp={t} "))
        assert line.split()[-1] == repr(on_tp(check_gpt, t)[0])


# ------------------------------------------------------ bad configurations
def _rejects(build, t):
    """``build(tp)`` raises ValueError on every rank, before any message is sent."""
    def fn(comm):
        tp = comm.split(0, comm.rank, name="tp")
        try:
            build(tp)
        except ValueError as e:
            return str(e), len(comm.tracer.select("comm"))
        return None, len(comm.tracer.select("comm"))
    results = launch(fn, t, timeout=30)
    assert all(msg is not None for msg, _ in results), "not rejected on every rank"
    assert all(n == 0 for _, n in results), "communicated before rejecting"
    return results[0][0]


def test_hidden_not_divisible():
    attn = CausalSelfAttention(6, 2, rng=0)
    assert "hidden size h=6" in _rejects(lambda tp: ParallelAttention.from_reference(attn, tp), 4)
    blk = TransformerBlock(6, 6, 24, rng=0)
    msg = _rejects(lambda tp: ParallelTransformerBlock.from_reference(blk, tp), 4)
    assert "h=6" in msg and "tp=4" in msg


def test_heads_not_divisible():
    attn = CausalSelfAttention(12, 2, rng=0)
    msg = _rejects(lambda tp: ParallelAttention.from_reference(attn, tp), 4)
    assert "n_head=2" in msg and "tp=4" in msg
    gpt = GPT(GPTConfig(10, 8, 1, n_head=3, d_model=12))
    assert "n_head=3" in _rejects(lambda tp: ParallelGPT.from_reference(gpt, tp), 2)


def test_ffn_not_divisible():
    mlp = MLP(8, 6, rng=0)
    assert "d_ff=6" in _rejects(lambda tp: ParallelMLP.from_reference(mlp, tp), 4)
    blk = TransformerBlock(8, 4, 6, rng=0)
    assert "d_ff=6" in _rejects(lambda tp: ParallelTransformerBlock.from_reference(blk, tp), 4)


def test_sequence_not_divisible_under_sp():
    gpt = GPT(GPTConfig(10, 10, 1, n_head=4, d_model=8))
    msg = _rejects(lambda tp: ParallelGPT.from_reference(gpt, tp, sequence_parallel=True), 4)
    assert "seq_len=10" in msg and "tp=4" in msg
    gpt = GPT(GPTConfig(10, 8, 1, n_head=4, d_model=8))
    idx = np.zeros((2, 6), dtype=np.int64)
    msg = _rejects(lambda tp: ParallelGPT.from_reference(gpt, tp, True).forward(idx), 4)
    assert "sequence length=6" in msg
    assert "size 5" in _rejects(lambda tp: scatter_to_sp_region(np.zeros((1, 5, 2)), tp), 2)
    # without SP the same sequence is fine
    launch(lambda comm: ParallelGPT.from_reference(gpt, comm).forward(idx), 4, timeout=30)


def test_conflicting_options():
    lin = Linear(4, 8, rng=0)
    msg = _rejects(lambda tp: ColumnParallelLinear.from_reference(
        lin, tp, gather_output=True, sequence_parallel=True), 2)
    assert "gather_output" in msg
    msg = _rejects(lambda tp: RowParallelLinear.from_reference(
        lin, tp, input_is_parallel=False, sequence_parallel=True), 2)
    assert "input_is_parallel" in msg
    assert "n_out=8 is not divisible by parts=3" in _rejects(
        lambda tp: ColumnParallelLinear.from_reference(lin, tp, parts=3), 2)


def test_sp_grads_must_be_finalized():
    blk = TransformerBlock(8, 2, 16, rng=0)

    def fn(comm):
        par = ParallelTransformerBlock.from_reference(blk, comm, sequence_parallel=True)
        par.backward(par.forward(np.ones((1, 2, 8))))
        with pytest.raises(RuntimeError, match="finalize_grads"):
            par.full_gradients()
        par.finalize_grads()
        return sorted(par.full_gradients())
    assert launch(fn, 2, timeout=30)[0] == sorted(blk.gradients())


# ------------------------------------------------------ shapes by hypothesis
SETTINGS = settings(max_examples=8, deadline=None)


@SETTINGS
@given(t=st.integers(1, 4), vocab=st.integers(1, 11), n=st.integers(1, 6),
       seed=st.integers(0, 2**31))
def test_vocab_parallel_cross_entropy_shapes(t, vocab, n, seed):
    """Any vocabulary (smaller than tp too: whole shards of padding) and token count."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, vocab)) * 3
    tgt = rng.integers(0, vocab, n)
    loss_ref, cache = F.cross_entropy(logits, tgt)
    dref = F.cross_entropy_backward(cache, 0.7)

    def fn(comm):
        width = -(-vocab // t)
        mine = np.pad(logits, ((0, 0), (0, width * t - vocab)))[:, comm.rank * width:
                                                              (comm.rank + 1) * width]
        mine = mine + np.where(np.arange(comm.rank * width, (comm.rank + 1) * width) >= vocab,
                               1e3, 0.0)          # huge padding logits must not matter
        loss, c = vocab_parallel_cross_entropy(mine, tgt, vocab, comm)
        d = vocab_parallel_cross_entropy_backward(c, 0.7)
        return loss, comm.all_gather(d, axis=-1)[:, :vocab]
    for loss, d in launch(fn, t, timeout=30):
        assert_close(loss, loss_ref, "loss")
        assert_close(d, dref, "dlogits")


@SETTINGS
@given(t=st.integers(1, 4), b=st.integers(1, 2), s=st.integers(1, 3), n_in=st.integers(1, 3),
       k_out=st.integers(1, 3), sp=st.booleans(), seed=st.integers(0, 2**31))
def test_column_then_row_shapes(t, b, s, n_in, k_out, sp, seed):
    """Column-parallel then row-parallel Linear on random shapes = the two reference
    layers in sequence (the Megatron pairing, no communication in between)."""
    rng = np.random.default_rng(seed)
    s = s * t if sp else s
    l1 = Linear(n_in, k_out * t, rng=rng).init_random_(rng)
    l2 = Linear(k_out * t, n_in, rng=rng).init_random_(rng)
    x, dy = rng.standard_normal((b, s, n_in)), rng.standard_normal((b, s, n_in))
    y_ref = l2.forward(l1.forward(x))
    dx_ref = l1.backward(l2.backward(dy))

    def fn(comm):
        c = ColumnParallelLinear.from_reference(l1, comm, sequence_parallel=sp)
        r = RowParallelLinear.from_reference(l2, comm, sequence_parallel=sp)
        cut = (lambda a: scatter_to_sp_region(a, comm)) if sp else (lambda a: a)
        glue = (lambda a: comm.all_gather(a, axis=1)) if sp else (lambda a: a)
        y = glue(r.forward(c.forward(cut(x))))
        dx = glue(c.backward(r.backward(cut(dy))))
        c.finalize_grads()
        r.finalize_grads()
        return y, dx, c.full_gradients(), r.full_gradients()
    for y, dx, g1, g2 in launch(fn, t, timeout=30):
        assert_close(y, y_ref, "y")
        assert_close(dx, dx_ref, "dx")
        for got, ref in ((g1, l1), (g2, l2)):
            for k, g in ref.gradients().items():
                assert_close(got[k], g, k)


def test_bad_targets_rejected_before_any_message():
    """Targets are checked on every rank before the forward pass communicates
    (and nothing is left saved)."""
    gpt = GPT(GPTConfig(10, 8, 1, n_head=4, d_model=8))
    idx = np.zeros((2, 8), dtype=np.int64)
    for sp in (False, True):
        for bad, text in ((np.full((2, 8), 12), "[0, 10)"), (np.zeros((2, 7), np.int64), "14")):
            def build(tp, bad=bad):
                par = ParallelGPT.from_reference(gpt, tp, sp)
                try:
                    par.loss(idx, bad)
                finally:
                    assert par.saved_keys() == []
            msg = _rejects(build, 2)
            assert text in msg, msg
