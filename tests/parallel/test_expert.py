"""Expert parallelism on both backends: equivalence with the reference MoE on the
union of the ranks' tokens, communication counted from the tracer, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simpar import launch
from simpar.nn.moe import MoE
from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.parallel.expert import ExpertParallelMoE
from simpar.parallel.hybrid import build_model
from tests.mpi_util import run_mpi
from tests.parallel.scripts import expert_checks as C
from tests.util import assert_close

SCRIPT = "tests/parallel/scripts/expert_checks.py"


# --------------------------------------------------------------- threads
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ep", [1, 2, 3, 4])
def test_layer_equivalence_threads(ep):
    """k = 1, 2; with and without dropping; 1-3 experts per rank."""
    dropped = []
    for k, cf, n in C.cases(ep):
        res = launch(lambda comm: C.check_layer(comm, k, cf, n), ep, cluster=C.CLUSTER,
                     timeout=30)
        dropped.append(res[0]["dropped"] > 0)
    assert any(dropped) and not all(dropped)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ep", [2, 4])
def test_probability_drop_policy_threads(ep):
    launch(lambda comm: C.check_layer(comm, 2, 0.6, 2 * ep, policy="probability"), ep,
           timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ep", [2, 4])
def test_moe_gpt_step_threads(ep):
    launch(lambda comm: C.check_gpt(comm), ep, timeout=30)


@settings(max_examples=8, deadline=None)
@given(ep=st.sampled_from([1, 2, 3, 4]), per=st.integers(1, 3), k=st.integers(1, 3),
       cf=st.sampled_from([None, 0.5, 1.0, 1.5]), b=st.integers(1, 3), s=st.integers(1, 4),
       h=st.integers(1, 5), seed=st.integers(0, 100))
def test_layer_equivalence_random_shapes(ep, per, k, cf, b, s, h, seed):
    n = per * ep
    k = min(k, n)

    def fn(comm):
        rng = np.random.default_rng(seed)
        ref = MoE(h, n, 3, k=k, capacity_factor=cf, groups=ep, rng=rng)
        ref.init_random_(rng, std=0.5)
        x = rng.standard_normal((ep * b, s, h))
        w = rng.standard_normal(x.shape)
        y_ref, _, dx_ref = C._run_reference(ref, x, w)
        layer = ExpertParallelMoE.from_reference(ref, comm)
        mine = slice(comm.rank * b, (comm.rank + 1) * b)
        y = layer.forward(x[mine])
        dx = layer.backward(w[mine])
        assert_close(y, y_ref[mine], "output")
        assert_close(dx, dx_ref[mine], "input gradient")
        for name, g in layer.gradients().items():
            assert_close(g, ref.gradients()[name], name)
    launch(fn, ep, timeout=30)


@pytest.mark.timeout(30)
def test_sim_times_identical_across_backends_and_runs():
    def run():
        return launch(lambda comm: C.check_layer(comm, *C.SIMTIME_CASE[1:])["simtimes"],
                      C.SIMTIME_CASE[0], cluster=C.CLUSTER, timeout=30)[0]
    first = run()
    assert first == run()
    assert any(name == "all_to_all" and end > start for name, start, end in first)


# ---------------------------------------------------------------- errors
@pytest.mark.timeout(30)
def test_errors_on_every_rank_before_any_message():
    launch(C.check_errors, 4, timeout=20)


@pytest.mark.timeout(30)
def test_experts_not_divisible_by_ep_raises_on_every_rank():
    seen = []

    def fn(comm):
        try:
            ExpertParallelMoE.from_reference(MoE(4, 6, rng=0), comm)
        except ValueError as e:
            seen.append((comm.rank, str(e)))
            assert comm.tracer.events == []              # nothing was sent
        from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig
        cfg = MoEGPTConfig(vocab_size=5, seq_len=3, n_layer=1, n_head=1, d_model=4,
                           n_experts=6)
        try:
            build_model(MoEGPT(cfg), Mesh(comm, ParallelConfig(dp=4, ep=4)))
        except ValueError as e:
            seen.append((comm.rank, str(e)))
    launch(fn, 4, timeout=20)
    assert sorted(r for r, _ in seen) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all("n_experts=6 is not divisible by ep=4" in msg for _, msg in seen)


@pytest.mark.timeout(30)
def test_bad_input_shape_raises_before_any_message():
    def fn(comm):
        layer = ExpertParallelMoE.from_reference(MoE(6, 4, rng=0), comm)
        try:
            layer.forward(np.zeros((3, 5)))
        except ValueError as e:
            assert comm.tracer.events == [] and "h=6" in str(e)
            return True
    assert launch(fn, 2, timeout=20) == [True, True]


# ------------------------------------------------------------------- MPI
@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpi_all_cases():
    """One mpiexec -n 4 launch: ep = 4, 3 (+1), 2, 1 on sub-groups of the world."""
    res = run_mpi(4, SCRIPT, timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "ok errors" in out
    for ep in (1, 2, 3, 4):
        for k, cf, n in C.cases(ep):
            assert f"ok layer ep={ep} k={k} cf={cf} experts={n} " in out, out
        assert f"ok probability-policy ep={ep}" in out
    assert "ok gpt ep=2" in out and "ok gpt ep=4" in out
    line = next(x for x in out.splitlines() if x.startswith("simtimes "))
    threads = launch(lambda comm: C.check_layer(comm, *C.SIMTIME_CASE[1:])["simtimes"],
                     C.SIMTIME_CASE[0], cluster=C.CLUSTER, timeout=30)[0]
    assert line[len("simtimes "):] == repr(threads)      # bit-identical simulated clock


# ------------------------------------------------------------------ demo
def _check_demo(text, out_dir, n):
    import re
    assert f"{n} devices" in text
    assert text.count("(OK)") == 3, text
    fwd = next(x for x in text.splitlines() if x.strip().startswith("forward :"))
    bwd = next(x for x in text.splitlines() if x.strip().startswith("backward:"))
    assert fwd.count("all_to_all") == 2 and bwd.count("all_to_all") == 2
    ratios = [float(v) for v in re.findall(r"max/mean tokens per expert (\S+),", text)]
    assert len(ratios) == 2 and all(1.0 <= r <= 8.0 for r in ratios)
    for name in ("ep_load.png", "ep_dispatch_timeline.png"):
        assert (out_dir / name).stat().st_size > 10_000
        assert str(out_dir / name) in text


@pytest.mark.timeout(120)
def test_demo_threads(tmp_path, capsys):
    from simpar.demos import expert_parallel
    expert_parallel.main(["--world-size", "2", "--steps", "3", "--out", str(tmp_path),
                          "--backend", "threads"])
    _check_demo(capsys.readouterr().out, tmp_path, 2)


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_demo_mpi(tmp_path):
    res = run_mpi(4, "-m", "simpar.demos.expert_parallel", "--steps", "3", "--out",
                  str(tmp_path), timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_demo(res.stdout, tmp_path, 4)
    assert res.stdout.count("expert-parallel demo") == 1          # rank 0 prints


@pytest.mark.timeout(30)
def test_deferred_weight_grads_threads():
    """Zero-bubble split on the expert-parallel layer: same gradients."""
    def fn(comm):
        ref, x, w, mine = C._reference(comm, 2, 0.6, 2 * comm.size)
        plain = ExpertParallelMoE.from_reference(ref, comm)
        split = ExpertParallelMoE.from_reference(ref, comm)
        plain.forward(x[mine])
        plain.backward(w[mine])
        split.forward(x[mine])
        split.backward_input(w[mine])
        names = [e.name for e in comm.tracer.events if e.category == "compute"]
        assert "moe.experts.backward_input" in names
        split.backward_weights()
        assert split.saved_keys() == []
        for name, g in plain.gradients().items():
            np.testing.assert_allclose(split.gradients()[name], g, rtol=1e-13, atol=1e-15)
    launch(fn, 2, timeout=20)
