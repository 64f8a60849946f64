"""Mixed precision (Micikevicius et al. 2018): 16-bit storage with float32
arithmetic and tensor-core matmuls, float32 master weights and Adam state
(2 + 2 + 12 = 16 bytes per parameter, ZeRO §5's K = 12), dynamic loss scaling
agreed across ranks, and training accuracy against float32."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import simpar
from simpar.comm.mesh import ParallelConfig
from simpar.mixed_precision import LossScaler, MixedPrecisionOptimizer
from simpar.nn import GPT, GPTConfig
from simpar.nn import functional as F
from simpar.nn import kernels as K
from simpar.nn.precision import BF16, FP16, acc_dtype, precision_dtype
from simpar.train import train, underflow
from tests.mixed_precision_checks import forced_overflow
from tests.mpi_util import run_mpi

HALVES = [BF16, FP16]
EPS = {BF16: 2.0 ** -8, FP16: 2.0 ** -11}          # unit roundoff of the 16-bit type


def _r(seed, *shape, dt=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dt)


@pytest.mark.parametrize("dt", HALVES, ids=str)
def test_matmul_emulates_tensor_cores(dt):
    """16-bit inputs, float32 accumulation, the result rounded once to 16 bits:
    equal to the exact product of the 16-bit values rounded to 16 bits (to one
    rounding of the float32 sum)."""
    x, W, b = _r(0, 3, 5, 64, dt=dt), _r(1, 64, 24, dt=dt), _r(2, 24, dt=dt)
    y = F.linear_forward(x, W, b)
    assert y.dtype == dt
    exact = (x.astype(np.float64).reshape(-1, 64) @ W.astype(np.float64) + b.astype(np.float64))
    want = exact.astype(np.float32).astype(dt).astype(np.float64)
    err = np.abs(y.reshape(-1, 24).astype(np.float64) - want)
    assert np.all(err <= EPS[dt] * 2 * np.abs(want) + 1e-30)
    assert np.mean(err == 0) > 0.9                       # nearly always the very same bits
    dx, dW, db = F.linear_backward(_r(3, 3, 5, 24, dt=dt), x, W)
    assert dx.dtype == dW.dtype == db.dtype == dt
    # float32 and float64 inputs: the decorator calls the plain function
    x32, W32 = x.astype(np.float32), W.astype(np.float32)
    np.testing.assert_array_equal(F.linear_forward(x32, W32),
                                  (x32.reshape(-1, 64) @ W32).reshape(3, 5, 24))


@pytest.mark.parametrize("dt", HALVES, ids=str)
def test_kernels_store_16_bits_and_reduce_in_float32(dt):
    x = _r(4, 2, 8, 32, dt=dt)
    g, bta = (1 + 0.1 * _r(5, 32)).astype(dt), _r(6, 32, dt=dt)
    y, (xhat, rstd, _) = K.layernorm_forward_fast(x, g, bta, 1e-5)
    assert y.dtype == xhat.dtype == dt and rstd.dtype == np.float32    # statistics: float32
    y32, _ = K.layernorm_forward_fast(x.astype(np.float32), g.astype(np.float32),
                                      bta.astype(np.float32), 1e-5)
    np.testing.assert_allclose(y.astype(np.float32), y32, atol=4 * EPS[dt] * 4)
    q, k, v = (_r(s, 2, 8, 32, dt=dt) for s in (7, 8, 9))
    out, cache = K.attention_forward_fast(q, k, v, 4)
    assert out.dtype == dt and cache[3].dtype == dt                   # P stored in 16 bits
    ref, _ = F.causal_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), 4)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=8 * EPS[dt])
    dq = np.empty((2, 8, 96), dt)
    K.attention_backward_fast(_r(10, 2, 8, 32, dt=dt), cache,
                              out=(dq[..., :32], dq[..., 32:64], dq[..., 64:]))
    _, c64 = F.causal_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), 4)
    want = F.causal_attention_backward(_r(10, 2, 8, 32, dt=dt).astype(np.float64), c64)
    np.testing.assert_allclose(dq[..., :32].astype(np.float64), want[0], atol=0.05)
    loss, (p, _, _) = F.cross_entropy(_r(11, 4, 8, 13, dt=dt), np.zeros((4, 8), int))
    assert p.dtype == np.float32 and isinstance(loss, float)          # the loss in float32
    h = _r(12, 1000, dt=dt)
    assert acc_dtype(h.dtype) == np.float32 and acc_dtype(np.float64) == np.float64


@pytest.mark.parametrize("dt", HALVES, ids=str)
def test_gpt_in_16_bits_is_close_to_float32(dt):
    cfg = GPTConfig(vocab_size=13, seq_len=8, n_layer=2, n_head=2, d_model=16)
    idx, tgt = np.random.default_rng(0).integers(0, 13, (2, 2, 8))
    m32, m16 = GPT(cfg, seed=0, dtype=np.float32), GPT(cfg, seed=0, dtype=dt)
    l32, l16 = m32.loss(idx, tgt), m16.loss(idx, tgt)
    assert abs(l16 - l32) < 20 * EPS[dt] * l32
    for name, g in m32.gradients().items():
        g16 = m16.gradients()[name]
        assert g16.dtype == dt
        a, b = g16.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b) + 1e-6, name


def test_loss_scaler_halves_on_overflow_and_doubles_after_clean_steps():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    for overflow, want in ((False, 8), (False, 8), (False, 16), (True, 8), (True, 4),
                           (False, 4), (False, 4), (False, 8)):
        s.update(overflow)
        assert s.scale == want
    assert s.skipped == 2
    with pytest.raises(ValueError, match="init_scale"):
        LossScaler(init_scale=0)
    with pytest.raises(TypeError, match="16-bit"):
        MixedPrecisionOptimizer({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_dtype("fp8")


def test_forced_overflow_skips_the_step_on_every_rank_threads():
    got = simpar.launch(forced_overflow, 4, timeout=60)
    for steps in got:
        assert [t for t, *_ in steps] == [True, False, True, True]       # step 1 skipped
        assert [s for _, s, _, _ in steps] == [1024, 512, 512, 1024]      # halved, regrown
        assert [k for _, _, k, _ in steps] == [0, 1, 1, 1]                # skipped count
    assert len({tuple(d for *_, d in steps[:2]) for steps in got[::2]}) == 1  # dp replicas agree
    assert got[0][1][3] == got[0][0][3]                    # the skipped step left the weights


def test_negative_control_an_unagreed_check_lets_ranks_diverge():
    """Without the all-reduce, only the rank that saw the inf skips: the data-
    parallel replicas of its parameters stop being equal."""
    got = simpar.launch(lambda c: forced_overflow(c, agree=False), 4, timeout=60)
    assert [t for t, *_ in got[3]] == [True, False, True, True]
    assert [t for t, *_ in got[1]] == [True, True, True, True]
    assert got[1][-1][3] != got[3][-1][3]                  # dp replicas (ranks 1, 3) differ


@pytest.mark.mpi
def test_forced_overflow_mpi():
    out = run_mpi(4, "tests/mixed_precision_checks.py", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("rank ")]
    assert len(lines) == 4, out.stdout + out.stderr
    for ln in lines:
        assert ln.split()[2:] == ["1:1024:0", "0:512:1", "1:512:1", "1:1024:1"], ln


SMALL = dict(seq_len=32, n_layer=2, n_head=2, d_model=32)


def _run(steps, **kw):
    return simpar.launch(lambda c: train(c, ParallelConfig(), steps=steps, model=SMALL,
                                         log_every=0, **kw), 1, timeout=300)[0]


def test_memory_is_16_bytes_per_parameter_from_the_ledger():
    def job(comm):
        out = train(comm, ParallelConfig(dp=2), steps=1, batch_size=4, model=SMALL,
                    precision="bf16", log_every=0)
        n = sum(p.size for p in out["model"].parameters().values())
        return n, dict(comm.tracer.memory.current)
    for n, mem in simpar.launch(job, 2, timeout=60):
        assert mem["params"] == 2 * n and mem["grads"] == 2 * n       # 16-bit weights, grads
        assert mem["optimizer"] == 12 * n                              # master 4 + m 4 + v 4
        assert mem["params"] + mem["grads"] + mem["optimizer"] == 16 * n


def test_200_steps_bf16_and_fp16_within_2_percent_of_float32_and_fp16_underflows():
    ref = np.mean(_run(200, precision="fp32")["loss"][-10:])
    for p in ("bf16", "fp16"):
        out = _run(200, precision=p)
        assert abs(np.mean(out["loss"][-10:]) - ref) <= 0.02 * ref, (p, out["loss"][-10:], ref)
        assert np.mean([s for _, s in out["zero_grads"]]) < 0.01, p    # scaled: normal range
    raw = _run(20, precision="fp16", loss_scaling=False)
    below = np.mean([s for _, s in raw["zero_grads"]])
    assert raw["loss_scale"] == 1.0 and below > 0.05, below   # precision lost under 2^-14


def test_underflow_counts_zero_and_subnormal():
    g = {"a": np.array([0, 1e-6, 1e-3, 0], np.float16), "b": np.array([1.0, 0], BF16)}
    z, s = underflow(g)
    assert (z, s) == (3 / 6, 1 / 6)
    assert ml_dtypes.finfo(BF16).tiny < 1e-37                 # bfloat16: float32's range


def test_train_precision_options_and_errors():
    out = _run(2, precision="bf16")
    assert len(out["loss"]) == 2 and out["mfu_machine"] > 0 and out["hfu_sim"] > 0
    for bad in ({"zero": 1}, {"moe_experts": 4}):
        with pytest.raises(ValueError, match="not supported yet"):
            simpar.launch(lambda c: train(c, ParallelConfig(dp=2), steps=1, batch_size=4,
                                          precision="fp16", log_every=0, **bad), 2, timeout=60)


@pytest.mark.parametrize("n", [2, 4])
def test_zero_stages_with_master_weights_follow_zero_section_5_to_the_byte(n):
    """Composable: ZeRO's DistributedOptimizer built over MixedPrecisionOptimizer
    (float32 masters and moments of the shard a rank owns) holds exactly
    Rajbhandari et al. §5's bytes: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N."""
    from simpar import formulas
    from simpar.comm.mesh import Mesh
    from simpar.parallel import zero
    from simpar.parallel.hybrid import build_model
    cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=2, n_head=2, d_model=16)
    psi = GPT(cfg).num_parameters()

    def job(comm, stage):
        model = build_model(GPT(cfg, seed=1, dtype=BF16), Mesh(comm, ParallelConfig(dp=n)))
        opt = zero.DistributedOptimizer(model, stage, "adamw-mp", lr=1e-2)
        before = {k: p.copy() for k, p in model.parameters().items()}
        x, y = np.random.default_rng(0).integers(0, 16, (2, 4, 8))
        model.zero_grad()
        model.step(x, y, 1)
        opt.step()
        m = comm.tracer.memory.current
        moved = stage == 3 or any(not np.array_equal(before[k], p)
                                  for k, p in model.parameters().items())
        return sum(m.get(k, 0) for k in ("params", "grads", "optimizer")), moved
    for stage in (0, 1, 2, 3):
        for total, moved in simpar.launch(lambda c: job(c, stage), n, timeout=60):
            assert total == formulas.zero_memory_bytes(psi, n, stage), (stage, total)
            assert moved


def test_train_bf16_with_zero_stages():
    """``train(precision="bf16", zero=1..3)``: ZeRO over float32 masters; the
    model state per rank is §5's, and the losses follow the unsharded bf16 run."""
    from simpar import formulas

    def job(comm, stage):
        out = train(comm, ParallelConfig(dp=2), steps=3, batch_size=4, model=SMALL,
                    precision="bf16", zero=stage, log_every=0)
        n = GPT(out["model"].config).num_parameters()
        m = comm.tracer.memory.current
        return out["loss"], sum(m.get(k, 0) for k in ("params", "grads", "optimizer")), n
    base = simpar.launch(lambda c: job(c, 0), 2, timeout=60)[0][0]
    for stage in (1, 2, 3):
        for losses, state, n in simpar.launch(lambda c: job(c, stage), 2, timeout=60):
            np.testing.assert_allclose(losses, base, rtol=2e-3)
            assert state == formulas.zero_memory_bytes(n, 2, stage), (stage, state)
