"""Context parallelism (ring attention, Ulysses): the layer equals plain attention
for cp = 2, 3, 4 on threads and MPI; the tracer's messages, bytes and FLOPs, the
memory ledger and the simulated clock equal the formulas of :mod:`simpar.formulas`;
bad inputs fail on every rank before any message."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import simpar
from simpar import formulas, sim
from simpar.nn import blockwise as BW
from simpar.parallel import context as C
from simpar.testing import TOL, worst
from tests.mpi_util import run_mpi
from tests.parallel.context_checks import (B, ERROR_CASES, H, LAYER_CASES, NH, S, core_checks,
                                           error_case, layer_errors, positions_table)

IDS = [f"{s}-{'balanced' if b else 'contiguous'}-tile{t}" for s, b, t in LAYER_CASES]


# ----------------------------------------------------------------- the cut
def test_balanced_chunks():
    assert positions_table(8, 2, True) == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert positions_table(12, 3, True) == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert positions_table(6, 3, False) == [[0, 1], [2, 3], [4, 5]]
    x = np.arange(2 * 24).reshape(2, 24)
    parts = [C.shard_sequence(x, 4, r) for r in range(4)]
    np.testing.assert_array_equal(C.gather_sequence(parts), x)


# ---------------------------------------------------------- equivalence
@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("case", LAYER_CASES, ids=IDS)
def test_layer_equals_reference_threads(cp, case):
    errs = simpar.launch(lambda c: layer_errors(c, *case), cp)
    assert all(e == errs[0] for e in errs)
    assert worst(errs[0]) <= TOL, errs[0]


def test_negative_controls_fail():
    """Not blind: a wrong chunk layout, a dropped ring step and a NaN are caught."""
    wrong = simpar.launch(lambda c: layer_errors(c, "ring", True, 4, data_balanced=False), 2)
    assert worst(wrong[0]) > 1e-3

    orig, local = C.online_softmax_update, threading.local()

    def skip_last(*a, **k):                 # each rank skips its last K/V block
        local.n = getattr(local, "n", 0) + 1
        return 0.0 if local.n == 2 else orig(*a, **k)
    C.online_softmax_update = skip_last
    try:
        dropped = simpar.launch(lambda c: layer_errors(c, "ring", True, 4), 2)
    finally:
        C.online_softmax_update = orig
    assert worst(dropped[0]) > 1e-3

    def nan_grad(comm):
        def tamper(layer, g):
            if comm.rank == 1:
                g[0, -1, 3] = np.nan
        return layer_errors(comm, "ulysses", False, 4, tamper=tamper)
    assert worst(simpar.launch(nan_grad, 2)[0]) == np.inf


@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_equals_reference_and_errors_mpi(n):
    out = run_mpi(n, "tests/parallel/scripts/context_mpi.py", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = {ln.split()[1]: float(ln.split()[2]) for ln in out.stdout.splitlines()
            if ln.startswith("worst ")}
    assert len(seen) == len(LAYER_CASES), out.stdout + out.stderr
    assert all(v <= TOL for v in seen.values()), seen
    formulas_said = [ln for ln in out.stdout.splitlines() if ln.startswith("formula ")]
    assert len(formulas_said) == 4 * n and all(ln.endswith(": ok") for ln in formulas_said), \
        formulas_said
    cases = [ln for ln in out.stdout.splitlines() if ln.startswith("case ")]
    assert len(cases) == n * len(ERROR_CASES), out.stdout
    for case, match in ERROR_CASES.items():
        msgs = [ln for ln in cases if f" {case}: " in ln]
        assert len(msgs) == n and all(match in m and "[events 0]" in m for m in msgs), msgs


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_fails_on_every_rank_before_any_message(case):
    msgs = simpar.launch(lambda c: error_case(c, case), 3 if "2cp" in case else 2)
    assert all(ERROR_CASES[case] in m and "[events 0]" in m for m in msgs), msgs
    if case == "ranks disagree on scheme":
        assert all("rank 0: ('ring'" in m and "rank 1: ('ulysses'" in m for m in msgs), msgs


@pytest.mark.parametrize("cp", [2, 3])
def test_core_checks_threads(cp):
    for checks in simpar.launch(lambda c: core_checks(c), cp):
        assert all(checks.values()), checks


def test_check_context_needs_no_communicator():
    with pytest.raises(ValueError, match="2·cp = 8 chunks: sequence length 12"):
        C.check_context(12, 4, "ring", True)
    C.check_context(12, 4, "ring", False)
    with pytest.raises(ValueError, match="n_head=6 .* not divisible by cp=4"):
        C.check_context(16, 4, "ulysses", False, n_head=6)


# ------------------------------------------------- the tracer and the ledger
def _run_core(comm, scheme, balanced, block, b=B, s=S, h=H, nh=NH):
    rng = np.random.default_rng(comm.rank)
    q, k, v, dy = (rng.standard_normal((b, s // comm.size, h)) for _ in range(4))
    comm.tracer.reset()
    if scheme == "ring":
        y, c = C.ring_attention_forward(q, k, v, nh, comm, balanced, block)
        mid = len(comm.tracer.events)
        C.ring_attention_backward(dy, c, comm)
    else:
        y, c = C.ulysses_attention_forward(q, k, v, nh, comm, balanced, block)
        mid = len(comm.tracer.events)
        C.ulysses_attention_backward(dy, c, comm)
    ev = comm.tracer.events
    return ev[:mid], ev[mid:], comm.tracer.sim_now


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_ring_messages_and_bytes_equal_the_formulas(cp):
    out = simpar.launch(lambda c: _run_core(c, "ring", True, 4), cp)
    fwd_el, bwd_el = formulas.ring_attention_comm_elements(B, S, H, cp)
    m = formulas.ring_attention_messages(cp)
    for fwd, bwd, _ in out:
        sends_f = [e for e in fwd if e.name == "send"]
        sends_b = [e for e in bwd if e.name == "send"]
        assert len(sends_f) == m["forward"]
        assert len(sends_b) == m["backward_kv"] + m["backward_dkv"]
        assert [e.args["tag"] for e in sends_b].count(C.TAG_DKV) == m["backward_dkv"]
        assert sum(e.nbytes for e in sends_f) == 8 * fwd_el
        assert sum(e.nbytes for e in sends_b) == 8 * bwd_el
        assert not [e for e in fwd + bwd if e.category == "comm" and e.name not in
                    ("send", "recv")]


@pytest.mark.parametrize("cp", [2, 4])
def test_ulysses_all_to_alls_equal_the_formulas(cp):
    out = simpar.launch(lambda c: _run_core(c, "ulysses", False, 4), cp)
    moved = formulas.ulysses_comm_elements(B, S, H, cp)
    for fwd, bwd, _ in out:
        for part in (fwd, bwd):
            a2a = [e for e in part if e.category == "comm"]
            assert [e.name for e in a2a] == ["all_to_all"] * 4
            assert all(e.nbytes * (cp - 1) / cp == 8 * moved for e in a2a)


@pytest.mark.parametrize("balanced", [True, False])
def test_causal_work_per_rank_balanced_and_naive(balanced):
    cp, block, s = 4, 2, 32
    out = simpar.launch(lambda c: _run_core(c, "ring", balanced, block, s=s), cp)
    per_tile = 4 * B * H * block * block
    flops = [sum(e.flops for e in fwd if e.name.endswith("ring.forward")) for fwd, _, _ in out]
    want = [per_tile * formulas.ring_attention_tiles(s, cp, r, block, balanced)
            for r in range(cp)]
    assert flops == want
    if balanced:
        assert len(set(flops)) == 1
    else:                      # the last rank works 1 + 2(cp−1)n/(n+1) times the first
        n = s // cp // block
        assert flops[-1] / flops[0] == pytest.approx(1 + 2 * (cp - 1) * n / (n + 1))


@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
def test_activation_memory_falls_as_one_over_cp(scheme):
    b, s, h, nh = 1, 48, 24, 12
    from simpar.nn import CausalSelfAttention

    def held(comm):
        attn = CausalSelfAttention(h, nh, rng=0)
        layer = C.ContextParallelAttention.from_reference(attn, comm, scheme, block=4)
        x = np.random.default_rng(0).standard_normal((b, s // comm.size, h))
        base = comm.tracer.memory.current.get("activations", 0)
        layer.forward(x)
        got = comm.tracer.memory.current["activations"] - base
        return got, comm.tracer.memory.peak.get(BW.SCORES, 0)
    for cp in (1, 2, 4):
        for got, scores in simpar.launch(held, cp):
            assert got == 8 * formulas.context_attention_activation_elements(b, s, h, nh, cp)
            assert 0 < scores <= 2 * (nh // (cp if scheme == "ulysses" else 1)) * 4 * 4 * 8

    def plain(comm):                        # the reference keeps the s² probabilities too
        attn = CausalSelfAttention(h, nh, rng=0)
        base = comm.tracer.memory.current.get("activations", 0)
        attn.forward(np.random.default_rng(0).standard_normal((b, s, h)))
        return comm.tracer.memory.current["activations"] - base
    assert simpar.launch(plain, 1)[0] == 8 * (5 * b * s * h + nh * b * s * s)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
def test_simulated_clock_equals_the_closed_form(cp, scheme):
    """A device slow enough that compute and the K/V transfer are comparable:
    the simulated step is the closed form, communication hidden or not."""
    b, s, h, nh, block = 1, 64, 16, 4, 4
    for flops in (2e9, 2e11):               # comm exposed / hidden
        cluster = sim.ClusterSpec("test", sim.DeviceSpec("slow", flops),
                                  sim.LinkSpec("l", 1e-6, 1 / 10e9),
                                  sim.LinkSpec("l", 1e-6, 1 / 10e9), 64)
        out = simpar.launch(lambda c: _run_core(c, scheme, scheme == "ring", block, b, s, h, nh),
                            cp, cluster=cluster)
        fn = formulas.ring_attention_time if scheme == "ring" else formulas.ulysses_attention_time
        f, bwd = fn(b, s, h, cp, block, flops, cluster.intra, itemsize=8)
        for fwd_ev, _, end in out:
            t_f = max(e.sim_end for e in fwd_ev)
            assert t_f == pytest.approx(f, rel=1e-12)
            assert end == pytest.approx(f + bwd, rel=1e-12)


def test_ring_hides_its_communication_when_blocks_are_long():
    b, s, h, nh, block = 1, 64, 16, 4, 4
    cluster = sim.ClusterSpec("test", sim.DeviceSpec("slow", 2e9), sim.LinkSpec("l", 1e-6, 1e-10),
                              sim.LinkSpec("l", 1e-6, 1e-10), 64)
    out = simpar.launch(lambda c: _run_core(c, "ring", True, block, b, s, h, nh), 4,
                        cluster=cluster)
    for fwd, bwd, end in out:
        compute = sum(e.sim_end - e.sim_start for e in fwd + bwd if e.category == "compute")
        exposed = sum(e.sim_end - e.sim_start for e in fwd + bwd
                      if e.category in ("comm", "idle"))
        assert compute > 0
        # all but the last dK/dV hop home is hidden
        assert exposed == pytest.approx(sim.p2p_time(8 * 2 * b * (s // 4) * h, cluster.intra))
        ov = C.ring_overlap(fwd + bwd, cluster.intra)
        assert ov["messages"] == 10 and ov["imbalance"] == 0.0
        assert ov["hidden"] == pytest.approx(0.9)           # 9 of 10 equal messages
