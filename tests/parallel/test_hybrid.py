"""Hybrid parallelism: every layout equals the single-device reference (threads and
MPI), the communication counted from the tracer equals the formulas, overlap
hides exactly the communication it overlaps, and bad layouts fail clearly."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

import simpar
from simpar import formulas
from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.nn import GPT, GPTConfig
from simpar.parallel.hybrid import build_model, check_layout
from simpar.parallel.tensor.accounting import ring_bytes
from simpar.testing import TOL, worst
from tests.mpi_util import reported_errors, run_mpi
from tests.parallel.hybrid_checks import (BAD_LAYOUTS, BY_NAME, LAYOUTS, Layout,
                                          build_or_error, errors, make_reference,
                                          reference_run, train_layout)

SCRIPT = "tests/parallel/scripts/hybrid_mpi.py"


# ----------------------------------------------------------------- equivalence
@pytest.mark.parametrize("lay", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_layout_equals_reference_threads(lay):
    got = simpar.launch(lambda c: train_layout(c, lay), lay.world_size, timeout=120)
    for r in range(1, lay.world_size):            # every rank reports the same losses
        np.testing.assert_array_equal(got[r][0], got[0][0])
    err = errors(got[0], reference_run(lay))
    assert worst(err) <= TOL, {k: v for k, v in err.items() if not v <= TOL}


MPI_RUNS = defaultdict(list)
for _lay in LAYOUTS:
    MPI_RUNS[_lay.world_size].append(_lay.name)


@pytest.mark.parametrize("n", sorted(MPI_RUNS))
def test_layouts_equal_reference_mpi(n):
    out = run_mpi(n, SCRIPT, *MPI_RUNS[n], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = reported_errors(out.stdout)
    assert set(seen) == set(MPI_RUNS[n]), out.stdout + out.stderr
    bad = {k: v for k, v in seen.items() if not v <= TOL}
    assert not bad, bad


def test_negative_controls_fail(monkeypatch):
    """The check is not blind: wrong MoE grouping, a skipped gradient sum and a
    NaN in one parameter are each caught."""
    from tests.parallel import hybrid_checks as hc
    lay = BY_NAME["moe ep2 in dp4 (edp2)"]
    got = simpar.launch(lambda c: train_layout(c, lay), lay.world_size, timeout=120)[0]
    assert worst(errors(got, reference_run(lay, groups=1))) > 1e-6   # aux weighted wrongly

    orig = hc.build_model

    def build(*a, **k):
        model = orig(*a, **k)
        model.buckets = model.buckets[:1]         # drop the edp (expert) bucket sync
        return model
    with monkeypatch.context() as patch:          # patched once, not by every rank's thread
        patch.setattr(hc, "build_model", build)
        got = simpar.launch(lambda c: train_layout(c, lay), lay.world_size, timeout=120)[0]
    assert worst(errors(got, reference_run(lay))) > 1e-6
    losses, params = simpar.launch(lambda c: train_layout(c, BY_NAME["dp2"]), 2)[0]
    params[sorted(params)[-1]].flat[3] = np.nan                        # not the first key
    assert worst(errors((losses, params), reference_run(BY_NAME["dp2"]))) == math.inf


# ---------------------------------------------------- communication, counted
def _one_step(comm, lay: Layout, **options):
    X = np.random.default_rng(0).integers(0, 13, (lay.batch, 8))
    model = build_model(make_reference(lay), Mesh(comm, lay.config), **{**lay.options, **options})
    comm.tracer.reset()
    model.zero_grad()
    model.step(X, X, lay.m)
    return comm.tracer.events, model


@pytest.mark.parametrize("bucket", [1000, 4096, 50_000, 1 << 20])
def test_data_parallel_bytes_and_calls(bucket):
    lay = Layout("dp2", ParallelConfig(dp=2))
    out = simpar.launch(lambda c: _one_step(c, lay, bucket_bytes=bucket), 2)
    events, model = out[0]
    psi = sum(g.size for g in model.gradients().values())
    dp = [e for e in events if e.group == "dp" and e.category == "comm"]
    assert len(dp) == math.ceil(psi * 8 / (bucket // 8 * 8))
    assert sum(ring_bytes(e) for e in dp) == pytest.approx(8 * formulas.dp_comm_elements(psi, 2))


def _bytes_by_group(events) -> dict:
    """Bytes each rank moves, by group: sends as sent, collectives in the ring model."""
    by = defaultdict(float)
    for e in events:
        if e.category == "comm" and e.name != "recv":
            by[e.group] += e.nbytes if e.name == "send" else ring_bytes(e)
    return by


def _tp_bytes(stage, b, s, h, t, m, mlp=True) -> float:
    """A stage's tensor-parallel bytes per step: its blocks, the embedding on the
    first stage, head and loss on the last (float64, m micro-batches)."""
    per_mb = len(stage.blocks) * formulas.tp_layer_comm_elements(b, s, h, t, mlp)
    if stage.is_first:
        per_mb += formulas.tp_embedding_comm_elements(b, s, h, t)
    if stage.is_last:
        per_mb += formulas.tp_head_loss_comm_elements(b, s, h, t)
    return 8 * m * per_mb


def test_hybrid_bytes_are_the_sum_of_tp_pp_dp_terms():
    """dp2 x tp2 x pp2, m=2: every byte each rank moves, by group, from the formulas."""
    lay = BY_NAME["dp2xtp2xpp2"]
    out = simpar.launch(lambda c: _one_step(c, lay) + (c.rank,), 8)
    b, s, h, t, m = lay.batch // 2 // lay.m, 8, 16, 2, lay.m
    for events, model, rank in out:
        stage = next(iter(model.stages.values()))
        by = _bytes_by_group(events)
        assert by["tp"] == pytest.approx(_tp_bytes(stage, b, s, h, t, m)), rank
        assert by["pp"] == pytest.approx(8 * m * b * s * h), rank      # one send per mb
        psi = sum(g.size for g in model.gradients().values())
        assert by["dp"] == pytest.approx(8 * formulas.dp_comm_elements(psi, 2)), rank
        assert set(by) <= {"tp", "pp", "dp", "world"}, by


def _ep_rows(out, ranks, mb):
    """The largest rows sent and received by a member of the ep group ``ranks``
    for micro-batch ``mb``, per MoE layer: from the layers' load statistics."""
    kept = {r: [layer.stats[mb].kept_per_expert for layer in out[r][1].moe_layers()]
            for r in ranks}
    n_local = len(next(iter(kept.values()))[0]) // len(ranks)
    rows = []
    for i in range(len(kept[ranks[0]])):
        sent = max(int(kept[r][i].sum()) for r in ranks)
        received = max(sum(int(kept[src][i][j * n_local:(j + 1) * n_local].sum())
                           for src in ranks) for j in range(len(ranks)))
        rows.append((sent, received))
    return rows


@pytest.mark.parametrize("name", ["moe tp2xep2", "moe pp2xep2, m=4"])
def test_hybrid_bytes_with_experts_are_the_sum_of_tp_pp_ep_dp_terms(name):
    """With MoE layers: the tp, pp and dp terms as above (an MoE block's feed-forward
    is replicated over tp: attention only), plus each MoE layer's all-to-alls,
    router all-reduce and count table over ep (:func:`formulas.ep_moe_comm_bytes`,
    rows from the routing statistics); experts summed over edp (size 1 here)."""
    lay = BY_NAME[name]
    cfg = lay.config
    out = simpar.launch(lambda c: _one_step(c, lay) + (Mesh(c, cfg).ep.world_ranks,),
                        cfg.world_size)
    b, s, h, m = lay.batch // cfg.dp // lay.m, 8, 16, lay.m
    n_experts = out[0][1].config.n_experts
    for rank, (events, model, ep_ranks) in enumerate(out):
        by = _bytes_by_group(events)
        assert model.moe_layers() and cfg.ep == len(ep_ranks) == 2
        want_ep = sum(formulas.ep_moe_comm_bytes(sent, recv, h, n_experts, cfg.ep)
                      for mb in range(m) for sent, recv in _ep_rows(out, list(ep_ranks), mb))
        assert by["ep"] == pytest.approx(want_ep, rel=1e-12), rank
        want_tp = sum(_tp_bytes(st, b, s, h, cfg.tp, m, mlp=False) for st in model.stages.values())
        assert by.get("tp", 0.0) == pytest.approx(want_tp), rank
        if cfg.pp > 1:
            assert by["pp"] == pytest.approx(8 * m * b * s * h), rank
        dense = sum(g.size for n, g in model.gradients().items() if n not in
                    model._expert_names())
        assert by["dp"] == pytest.approx(8 * formulas.dp_comm_elements(dense, cfg.dp)), rank
        assert set(by) <= {"tp", "pp", "dp", "ep", "world"}, by


def test_overlap_hides_exactly_the_overlapped_communication():
    lay = Layout("dp2", ParallelConfig(dp=2), m=2)

    def both(comm):
        off, _ = _one_step(comm, lay, bucket_bytes=2000, overlap=False)
        t_off = max(e.sim_end for e in off)
        on, model = _one_step(comm, lay, bucket_bytes=2000, overlap=True)
        t_on = max(e.sim_end for e in on)
        comm_time = sum(e.sim_end - e.sim_start for e in on if e.args.get("async"))
        exposed = sum(e.sim_end - e.sim_start for e in on if e.name == "wait all_reduce")
        return t_off, t_on, comm_time, exposed, len(model.buckets[0].bounds)
    t_off, t_on, comm_time, exposed, n = simpar.launch(both, 2)[0]
    assert n > 3 and comm_time > 0
    assert t_on < t_off
    assert t_off - t_on == pytest.approx(comm_time - exposed, rel=1e-9)


# ------------------------------------------------------------------ errors
def _before_first_message(name: str, msg: str) -> bool:
    """The error came before any traced message (the world-size error comes from
    the Mesh itself, before there is a model to build)."""
    return "[events 0]" in msg or (name == "world size" and "[events" not in msg)


@pytest.mark.parametrize("name,case,match", BAD_LAYOUTS, ids=[b[0] for b in BAD_LAYOUTS])
def test_bad_layouts_fail_on_every_rank_before_any_message(name, case, match):
    if case["config"] is None:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**case["kwargs"])
        return
    msgs = simpar.launch(lambda c: build_or_error(c, case), case["world"], timeout=30)
    assert all(match in m for m in msgs), msgs
    assert all(_before_first_message(name, m) for m in msgs), msgs


def test_check_layout_needs_no_communicator():
    ref = make_reference(Layout("x", ParallelConfig(), n_layer=2))
    check_layout(ref, ParallelConfig(tp=2, pp=2), "zb-h1")     # I/W split under tp: fine
    with pytest.raises(ValueError, match="interleaved"):
        check_layout(ref, ParallelConfig(pp=1, vpp=2), "1f1b")
    with pytest.raises(ValueError, match="needs a model with MoE"):
        check_layout(ref, ParallelConfig(dp=2, ep=2), "1f1b")


def test_bad_layouts_fail_under_mpi():
    """Every bad layout of the threads test, under mpiexec (each on as many ranks
    as it needs): the error on every member, before the first message."""
    out = run_mpi(4, "tests/parallel/scripts/hybrid_errors_mpi.py", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("case ")]
    cases = [(n, c, m) for n, c, m in BAD_LAYOUTS if c["config"] is not None]
    assert len(lines) == sum(c["world"] for _, c, _ in cases), out.stdout
    for name, case, match in cases:
        mine = [ln for ln in lines if ln.startswith(f"case {name} rank ")]
        assert len(mine) == case["world"], (name, out.stdout)
        assert all(match in ln for ln in mine), mine
        assert all(_before_first_message(name, ln) for ln in mine), mine
