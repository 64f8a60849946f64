"""Context parallelism composed by the hybrid builder: cp2, cp2×tp2 (+SP),
cp2×dp2, cp2×pp2, cp4, cp2×dp2×tp2 and MoE GPTs at cp2, cp2×dp2×ep2, cp2×pp2 and
cp2×tp2 equal the single-device reference over 20 AdamW steps (float64, 1e-10)
on threads and MPI; the gradient sum over cp and the MoE layer's whole-sequence
routing group are needed (negative controls); bad layouts fail on every rank before any message;
``python -m simpar train --cp 2 --attention ring|ulysses``."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

import simpar
from simpar.testing import TOL, worst
from tests.mpi_util import reported_errors, run_mpi
from tests.parallel.context_hybrid_checks import (BAD, CP_BY_NAME, CP_LAYOUTS, CP_MORE,
                                                  bad_case)
from tests.parallel.hybrid_checks import errors, reference_run, train_layout

SCRIPT = "tests/parallel/scripts/context_hybrid_mpi.py"


ALL = CP_LAYOUTS + CP_MORE


@pytest.mark.parametrize("lay", ALL, ids=[lay.name for lay in ALL])
def test_cp_layout_equals_reference_threads(lay):
    got = simpar.launch(lambda c: train_layout(c, lay), lay.world_size, timeout=180)
    for r in range(1, lay.world_size):
        np.testing.assert_array_equal(got[r][0], got[0][0])
    err = errors(got[0], reference_run(lay))
    assert worst(err) <= TOL, {k: v for k, v in err.items() if not v <= TOL}


# under MPI: cp2 (both schemes), cp4, and cp2 with each of tp, dp, pp (CI time)
MPI_NAMES = ["cp2 ring", "cp2 ulysses", "cp2 ring contiguous, tile 3", "cp4 ring tied",
             "cp2xtp2 ulysses", "cp2xtp2+SP ring", "cp2xdp2 ring", "cp2xpp2 ulysses tied",
             "moe cp2 ring", "moe cp2xdp2xep2 ulysses"]
MPI_RUNS = defaultdict(list)
for _name in MPI_NAMES:
    MPI_RUNS[CP_BY_NAME[_name].world_size].append(_name)


@pytest.mark.parametrize("n", sorted(MPI_RUNS))
def test_cp_layouts_equal_reference_mpi(n):
    out = run_mpi(n, SCRIPT, *MPI_RUNS[n], timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = reported_errors(out.stdout, sep="|")
    assert set(seen) == set(MPI_RUNS[n]), out.stdout + out.stderr
    assert all(v <= TOL for v in seen.values()), seen


def test_negative_control_without_the_cp_gradient_sum(monkeypatch):
    from tests.parallel import hybrid_checks as hc
    lay = CP_BY_NAME["cp2 ring"]
    orig = hc.build_model

    def build(*a, **k):
        model = orig(*a, **k)
        model.buckets = []                        # drop the dp x cp gradient sum
        return model
    # patched once, here, not by each rank's thread: a rank that read another's
    # patch as "the original" would restore the patch, breaking later tests
    monkeypatch.setattr(hc, "build_model", build)
    got = simpar.launch(lambda c: train_layout(c, lay), 2, timeout=120)[0]
    assert worst(errors(got, reference_run(lay))) > 1e-6


def test_negative_control_moe_routing_each_cp_ranks_tokens_alone(monkeypatch):
    """Without the whole-sequence routing group (each cp rank routing its own
    tokens, as production frameworks do) the MoE GPT is not the reference's."""
    from simpar.parallel.expert import ExpertParallelMoE
    lay = CP_BY_NAME["moe cp2 ring"]
    monkeypatch.setattr(ExpertParallelMoE, "cut_sequence", lambda *a, **k: None)
    got = simpar.launch(lambda c: train_layout(c, lay), 2, timeout=120)[0]
    assert worst(errors(got, reference_run(lay))) > 1e-6


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_cp_layouts_fail_on_every_rank_before_any_message(name):
    cfg, _, _, match = BAD[name]
    msgs = simpar.launch(lambda c: bad_case(c, name), cfg.world_size, timeout=60)
    assert all(match in m and "[events 0]" in m for m in msgs), msgs
    if name == "ranks disagree on scheme":
        assert all("'ulysses'" in m and "rank 0" in m and "rank 1" in m for m in msgs), msgs
    if name == "ranks disagree on cp":
        assert all("rank 0: ParallelConfig(dp=1" in m and "cp=2)" in m and
                   "rank 1: ParallelConfig(dp=2" in m for m in msgs), msgs


def test_bad_cp_layouts_fail_under_mpi():
    out = run_mpi(2, SCRIPT, "--errors", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("case ")]
    two = [n for n, b in BAD.items() if b[0].world_size == 2]
    assert len(lines) == 2 * len(two), out.stdout + out.stderr
    for n in two:
        got = [ln for ln in lines if ln.startswith(f"case {n}: ")]
        assert len(got) == 2 and all(BAD[n][3] in ln and "[events 0]" in ln for ln in got), got


def test_step_rejects_a_sequence_the_cut_cannot_take():
    from simpar.comm.mesh import Mesh
    from simpar.parallel.hybrid import build_model
    from tests.parallel.hybrid_checks import Layout, make_reference
    lay = CP_BY_NAME["cp2 ring"]

    def run(comm):
        model = build_model(make_reference(Layout("x", lay.config)), Mesh(comm, lay.config),
                            **lay.options)
        n0 = len(comm.tracer.events)
        try:
            model.step(np.zeros((2, 6), np.int64), np.zeros((2, 6), np.int64))
        except ValueError as e:
            return f"{e} [events {len(comm.tracer.events) - n0}]"
        return "no error"
    msgs = simpar.launch(run, 2)
    assert all("sequence length 6 is not divisible by 4 [events 0]" in m for m in msgs), msgs


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_train_command_line(attention, tmp_path):
    from simpar.train import main
    out = main(["--cp", "2", "--attention", attention, "--steps", "3", "--log-every", "0",
                "--out", str(tmp_path), "--batch-size", "4", "--float64"])
    ref = main(["--steps", "3", "--log-every", "0", "--out", str(tmp_path), "--batch-size",
                "4", "--float64"])
    assert all(math.isfinite(v) for v in out["loss"])
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-10)
