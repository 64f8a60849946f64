"""ZeRO stages 0-3 (Rajbhandari et al. 2020): every case equals the single-device
reference over 20 AdamW steps with clipping (threads and MPI); the memory ledger
equals ZeRO §5 exactly; the tracer's bytes equal §7; unsupported combinations and
bad arguments fail on every rank before any message; negative controls."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

import simpar
from simpar import formulas
from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.parallel.hybrid import build_model
from simpar.parallel.tensor.accounting import ring_bytes
from simpar.parallel.zero import DistributedOptimizer
from simpar.testing import TOL, worst
from tests.mpi_util import reported_errors, run_mpi
from tests.parallel.hybrid_checks import Layout, errors, make_reference
from tests.parallel import zero_checks
from tests.parallel.zero_checks import BY_NAME, CASES, ZeroCase, reference_run, train_zero

SCRIPT = "tests/parallel/scripts/zero_mpi.py"
P = ParallelConfig


# ----------------------------------------------------------------- equivalence
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zero_equals_reference_threads(case):
    got = simpar.launch(lambda c: train_zero(c, case), case.world_size, timeout=120)
    for r in range(1, case.world_size):
        np.testing.assert_array_equal(got[r][0], got[0][0])
    err = errors(got[0], reference_run(case))
    assert worst(err) <= TOL, {k: v for k, v in err.items() if not v <= TOL}


MPI_RUNS = defaultdict(list)
THREADS_ONLY = {"zero3 cp2xtp2 tied", "zero1 cp2xpp2"}      # CI time: 4-rank MPI runs are slow
for _c in CASES:
    if _c.name not in THREADS_ONLY:
        MPI_RUNS[_c.world_size].append(_c.name)


@pytest.mark.parametrize("n", sorted(MPI_RUNS))
def test_zero_equals_reference_mpi(n):
    out = run_mpi(n, SCRIPT, *MPI_RUNS[n], timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = reported_errors(out.stdout)
    assert set(seen) == set(MPI_RUNS[n]), out.stdout + out.stderr
    assert all(v <= TOL for v in seen.values()), seen


def test_stage0_is_plain_data_parallelism_bit_for_bit():
    """ZeRO-0 through the same interface is exactly the AdamW loop of the hybrid tests."""
    from tests.parallel.hybrid_checks import train_layout
    lay = Layout("dp2", P(dp=2))
    plain = simpar.launch(lambda c: train_layout(c, lay), 2)[0]
    zero0 = simpar.launch(lambda c: train_zero(c, ZeroCase("z0", 0, lay)), 2)[0]
    np.testing.assert_array_equal(plain[0], zero0[0])
    for k in plain[1]:
        np.testing.assert_array_equal(plain[1][k], zero0[1][k])


def test_negative_controls_fail():
    """Not blind: a stage-2 step that skips the parameter all-gather, and a
    ZeRO-3 forward that runs one block without gathering it, both fail."""
    from simpar.parallel import zero as Z
    case = BY_NAME["zero2 dp2"]
    orig = Z._Group.gather_params

    def no_gather(self, i, shard):               # ranks keep only their own updates
        if shard is None:
            return None
        return orig(self, i, shard)
    Z._Group.gather_params = no_gather
    try:
        got = simpar.launch(lambda c: train_zero(c, case, steps=3), 2)[0]
    finally:
        Z._Group.gather_params = orig
    ref_losses = reference_run(case)[0][:3]
    assert got[0][0] == pytest.approx(ref_losses[0], rel=1e-12)   # same start ...
    assert abs(got[0][1:] - ref_losses[1:]).max() > 1e-6          # ... then the ranks drift

    case3 = BY_NAME["zero3 dp2"]
    orig_gathered = Z.DistributedOptimizer.gathered

    def skip_block1(self, units):
        return orig_gathered(self, [u for u in units if u != "blocks.1"])
    Z.DistributedOptimizer.gathered = skip_block1
    try:
        losses, _ = simpar.launch(lambda c: train_zero(c, case3, steps=1), 2)[0]
    finally:
        Z.DistributedOptimizer.gathered = orig_gathered
    assert np.isnan(losses).all()               # a freed parameter is NaN, and shows


def test_negative_control_zero_over_dp_only_under_cp():
    """Not blind: the same ZeRO-1 run sharded over ``dp`` alone (not ``dp × cp``)
    drops the sum over the context-parallel ranks and is far off (the bug once
    shipped: error 2.19)."""
    case = BY_NAME["zero1 cp2xdp2"]
    lay = case.layout

    def over_dp_only(comm):
        from tests.parallel.hybrid_checks import batches
        X, Y = batches(lay)
        model = build_model(make_reference(lay, lay.config.dp * lay.m), Mesh(comm, lay.config),
                            **lay.options)
        model.mesh.dp_cp = model.mesh.dp          # what ZeRO sharded over before the fix
        opt = DistributedOptimizer(model, case.stage, case.optimizer, **case.hyper)
        losses = []
        for t in range(3):
            model.zero_grad()
            losses.append(model.step(X[t], Y[t], lay.m)["loss"])
            opt.clip_grad_norm(zero_checks.CLIP)
            opt.step()
        return np.array(losses)
    got = simpar.launch(over_dp_only, lay.world_size, timeout=120)[0]
    ref = reference_run(case)[0][:3]
    assert got[0] == pytest.approx(ref[0], rel=1e-12)      # same start, then off
    assert worst([abs(got[1:] - ref[1:]).max() / abs(ref).max()]) > 1e-3


def test_train_cli_cp2_zero1_prints_the_losses_of_plain_cp2(tmp_path):
    """``python -m simpar train --cp 2 --zero 1`` (and ``--dp 2 --cp 2 --zero 2``)
    print the losses of the run without ZeRO."""
    import os
    import re
    import subprocess
    import sys
    from tests.mpi_util import ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}

    def losses(*args):
        res = subprocess.run([sys.executable, "-m", "simpar", "train", "--steps", "4",
                              "--batch-size", "4", "--log-every", "1", "--float64", *args,
                              "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        return re.findall(r"step\s+\d+ \| loss (\S+)", res.stdout)
    plain = losses("--cp", "2")
    assert len(plain) == 4 and len(set(plain)) == 4, plain
    assert losses("--cp", "2", "--zero", "1") == plain
    assert losses("--dp", "2", "--cp", "2", "--zero", "2") == losses("--dp", "2", "--cp", "2")


# ------------------------------------------------------ memory, from the ledger
def _ledger_after_step(comm, stage: int, dp: int, optimizer="adamw", cp: int = 1):
    lay = Layout("m", P(dp=dp, cp=cp), m=1)
    X = np.random.default_rng(0).integers(0, 13, (24, 8))
    model = build_model(make_reference(lay), Mesh(comm, lay.config))
    hyper = dict(lr=1e-2) if optimizer == "adamw" else dict(lr=1e-2, momentum=0.9)
    opt = DistributedOptimizer(model, stage, optimizer, **hyper)
    ledger = comm.tracer.memory
    ledger.reset_peak()
    model.zero_grad()
    model.step(X, X, 1)
    opt.clip_grad_norm(0.5)
    opt.step()
    psi = sum(p.size for p in model.parameters().values())
    cur = {k: ledger.current.get(k, 0) for k in ("params", "grads", "optimizer", "activations")}
    return psi, cur, dict(ledger.peak)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_memory_ledger_equals_zero_section5(stage):
    """Per rank, after a step: params + grads + optimizer state = ZeRO §5 with
    8-byte elements (p = g = 8, K = 16 for AdamW, 8 for SGD with momentum),
    exactly, for dp = 1, 2, 4, 8 (the test model's layers divide by 8)."""
    for dp in (1, 2, 4, 8):
        for optimizer, k in (("adamw", 16), ("sgd", 8)):
            out = simpar.launch(lambda c: _ledger_after_step(c, stage, dp, optimizer), dp)
            for psi, cur, peak in out:
                assert psi % 16 == 0
                total = cur["params"] + cur["grads"] + cur["optimizer"]
                want = formulas.zero_memory_bytes(psi, dp, stage, k=k, param_bytes=8,
                                                  grad_bytes=8)
                assert total == want, (stage, dp, optimizer, cur, want)
                assert cur["optimizer"] == k * psi // (dp if stage >= 1 else 1)
                assert cur["params"] == 8 * psi // (dp if stage == 3 else 1)
                assert cur["grads"] == 8 * psi // (dp if stage >= 2 else 1)
                assert cur["activations"] == 0
                if stage == 3 and dp > 1:          # one layer at a time is whole
                    assert cur["params"] < peak["params"] < 8 * psi


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memory_ledger_with_context_parallelism_shards_over_dp_times_cp(stage):
    """cp ranks replicate the weights: ZeRO shards over N = dp·cp (cp2 x dp2: N = 4)."""
    for psi, cur, _ in simpar.launch(lambda c: _ledger_after_step(c, stage, 2, cp=2), 4):
        total = cur["params"] + cur["grads"] + cur["optimizer"]
        assert total == formulas.zero_memory_bytes(psi, 4, stage, k=16, param_bytes=8,
                                                   grad_bytes=8), (stage, cur)
        assert cur["optimizer"] == 16 * psi // 4


def test_memory_ledger_odd_sizes_sum_to_the_model():
    """dp = 3 does not divide the layers: the shards differ by at most a segment's
    padding, and over the ranks they hold every element exactly once."""
    for stage in (1, 2, 3):
        out = simpar.launch(lambda c: _ledger_after_step(c, stage, 3), 3)
        psi = out[0][0]
        assert sum(cur["optimizer"] for _, cur, _ in out) == 16 * psi
        if stage >= 2:
            assert sum(cur["grads"] for _, cur, _ in out) == 8 * psi


# ------------------------------------------------ communication, from the tracer
def _step_bytes(comm, stage: int, dp: int):
    lay = Layout("c", P(dp=dp), m=1)
    X = np.random.default_rng(0).integers(0, 13, (24, 8))
    model = build_model(make_reference(lay), Mesh(comm, lay.config))
    opt = DistributedOptimizer(model, stage, lr=1e-2)
    comm.tracer.reset()
    model.zero_grad()
    model.step(X, X, 1)
    opt.clip_grad_norm(0.5)
    opt.step()
    psi = sum(p.size for p in model.parameters().values())
    by = defaultdict(float)
    for e in comm.tracer.events:
        if e.category == "comm" and e.group == "dp":
            by[e.name] += ring_bytes(e)
    return psi, dict(by)


@pytest.mark.parametrize("dp", [2, 4])
def test_communication_equals_zero_section7(dp):
    """Stages 0-2 move 2Ψ(N−1)/N elements per rank per step, as plain data
    parallelism; stage 3 3Ψ(N−1)/N (1.5×): counted from the tracer."""
    for stage in (0, 1, 2, 3):
        for psi, by in simpar.launch(lambda c: _step_bytes(c, stage, dp), dp):
            total = sum(by.values())
            assert total == pytest.approx(8 * formulas.zero_comm_elements(psi, dp, stage),
                                          rel=1e-12), (stage, by)
            assert total == pytest.approx((1.5 if stage == 3 else 1.0)
                                          * 8 * formulas.dp_comm_elements(psi, dp), rel=1e-12)
            kinds = {0: {"all_reduce"}, 1: {"reduce_scatter", "all_gather"}}
            assert set(by) == kinds.get(stage, {"reduce_scatter", "all_gather"}), by


# ------------------------------------------------------------------ errors
def _build_error(comm, config, stage, optimizer="adamw", model_options=None, moe=False,
                 **hyper):
    lay = Layout("e", config, moe=moe)
    model = build_model(make_reference(lay, config.dp * lay.m), Mesh(comm, config),
                        **(model_options or {}))
    n0 = len(comm.tracer.events)
    try:
        DistributedOptimizer(model, stage(comm.rank) if callable(stage) else stage,
                             optimizer, **hyper)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e} [events {len(comm.tracer.events) - n0}]"
    return "no error"


BAD = [
    ("stage 3 with pp", dict(config=P(dp=2, pp=2), stage=3), "ZeRO-3 is supported with dp x tp"),
    ("stage 3 with ep", dict(config=P(dp=2, ep=2), stage=3, moe=True), "ep=2"),
    ("stage 3 with SP", dict(config=P(dp=2, tp=2), stage=3,
                             model_options={"sequence_parallel": True}), "sequence_parallel"),
    ("stage 4", dict(config=P(dp=2), stage=4), "ZeRO stage must be one of (0, 1, 2, 3), got 4"),
    ("stage True", dict(config=P(dp=2), stage=True), "got True"),
    ("overlap", dict(config=P(dp=2), stage=2, model_options={"overlap": True}),
     "overlap=True is not supported"),
    ("optimizer", dict(config=P(dp=2), stage=1, optimizer="lamb"), "optimizer must be one of"),
    ("negative lr", dict(config=P(dp=2), stage=1, lr=-1.0), "learning rate must be"),
]


@pytest.mark.parametrize("name,case,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_fail_on_every_rank_before_any_message(name, case, match):
    case = dict(case)
    config = case.pop("config")
    msgs = simpar.launch(lambda c: _build_error(c, config, **case), config.world_size,
                         timeout=60)
    assert all(match in m and "[events 0]" in m for m in msgs), msgs


def test_ranks_disagreeing_on_the_stage_are_named():
    msgs = simpar.launch(lambda c: _build_error(c, P(dp=2), lambda r: 1 + r), 2, timeout=60)
    assert all("ZeRO optimizer" in m and "rank 0: (1," in m and "rank 1: (2," in m
               for m in msgs), msgs


def test_not_a_hybrid_model():
    from simpar.nn import GPT, GPTConfig
    with pytest.raises(TypeError, match="needs a HybridModel"):
        DistributedOptimizer(GPT(GPTConfig(vocab_size=5, seq_len=4, n_layer=1, n_head=1,
                                           d_model=4)), 1)
