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
from tests.parallel.hybrid_checks import (BY_NAME, LAYOUTS, Layout, errors, make_reference,
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


def test_hybrid_bytes_are_the_sum_of_tp_pp_dp_terms():
    """dp2 x tp2 x pp2, m=2: every byte each rank moves, by group, from the formulas."""
    lay = BY_NAME["dp2xtp2xpp2"]
    out = simpar.launch(lambda c: _one_step(c, lay) + (c.rank,), 8)
    b, s, h, t, m = lay.batch // 2 // lay.m, 8, 16, 2, lay.m
    for events, model, rank in out:
        stage = next(iter(model.stages.values()))
        by = defaultdict(float)
        for e in events:
            if e.category == "comm" and e.name != "recv":
                by[e.group] += e.nbytes if e.name == "send" else ring_bytes(e)
        per_mb = len(stage.blocks) * formulas.tp_layer_comm_elements(b, s, h, t)
        ring = 2 * (t - 1) / t
        if stage.is_first:
            per_mb += ring * b * s * h                  # embedding g (forward)
        if stage.is_last:
            per_mb += ring * b * s * h + 3 * ring * b * s   # head f (backward); loss: 3 sums
        assert by["tp"] == pytest.approx(8 * m * per_mb), rank
        assert by["pp"] == pytest.approx(8 * m * b * s * h), rank      # one send per mb
        psi = sum(g.size for g in model.gradients().values())
        assert by["dp"] == pytest.approx(8 * formulas.dp_comm_elements(psi, 2)), rank
        assert set(by) <= {"tp", "pp", "dp", "world"}, by


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
BAD = [
    ("world size", dict(config=ParallelConfig(dp=2, tp=2), world=3), "world size 3"),
    ("ep does not divide dp", dict(config=None, kwargs=dict(dp=3, ep=2)), "ep=2 must divide dp=3"),
    ("tp does not divide heads", dict(config=ParallelConfig(tp=4), world=4,
                                      model=dict(n_head=6, d_model=12)),
     "n_head=6 is not divisible by tp=4"),
    ("tp does not divide ffn", dict(config=ParallelConfig(tp=4), world=4, model=dict(d_ff=18)),
     "d_ff=18 is not divisible by tp=4"),
    ("more stages than layers", dict(config=ParallelConfig(pp=4), world=4, n_layer=3),
     "every stage needs a layer"),
    ("bucket size 0", dict(config=ParallelConfig(dp=2), world=2, bucket_bytes=0),
     "bucket_bytes must be a positive integer, got 0"),
    ("bucket size -5", dict(config=ParallelConfig(dp=2), world=2, bucket_bytes=-5),
     "got -5"),
    ("vpp without interleaved", dict(config=ParallelConfig(pp=2, vpp=2), world=2),
     "need schedule='interleaved'"),
]


def _build_or_error(comm, case):
    try:
        cfg = case["config"]
        lay = Layout("x", cfg or ParallelConfig(), n_layer=case.get("n_layer", 4))
        mesh = Mesh(comm, cfg)
        n0 = len(comm.tracer.events)
        try:
            ref = make_reference(lay)
            if "model" in case:
                ref = GPT(GPTConfig(**{**vars(ref.config), **case["model"]}))
            build_model(ref, mesh, bucket_bytes=case.get("bucket_bytes", 1 << 20))
        except ValueError as e:
            return f"{e} [events {len(comm.tracer.events) - n0}]"
        return "no error"
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("name,case,match", BAD, ids=[b[0] for b in BAD])
def test_bad_layouts_fail_on_every_rank_before_any_message(name, case, match):
    if case["config"] is None:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**case["kwargs"])
        return
    msgs = simpar.launch(lambda c: _build_or_error(c, case), case["world"], timeout=30)
    assert all(match in m for m in msgs), msgs
    assert all("[events" not in m or "[events 0]" in m for m in msgs), msgs


def test_check_layout_needs_no_communicator():
    ref = make_reference(Layout("x", ParallelConfig(), n_layer=2))
    check_layout(ref, ParallelConfig(tp=2, pp=2), "zb-h1")     # I/W split under tp: fine
    with pytest.raises(ValueError, match="interleaved"):
        check_layout(ref, ParallelConfig(pp=1, vpp=2), "1f1b")
    with pytest.raises(ValueError, match="needs a model with MoE"):
        check_layout(ref, ParallelConfig(dp=2, ep=2), "1f1b")


def test_bad_layouts_fail_under_mpi():
    out = run_mpi(4, "tests/parallel/scripts/hybrid_errors_mpi.py", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("case ")]
    assert len(lines) == 4 * 3, out.stdout          # 3 cases, every rank reports each
    assert all("ValueError" in ln for ln in lines), lines
