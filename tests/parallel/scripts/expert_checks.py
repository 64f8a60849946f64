"""Expert-parallel checks, written once as functions of a communicator.

``tests/parallel/test_expert.py`` runs them in a threads world; under MPI::

    mpiexec -n 4 python tests/parallel/scripts/expert_checks.py

runs every case on sub-groups of the 4-rank world (ep = 4, 3 (+ a lone rank),
2, 1), prints ``ok <case>`` per case from each group's rank 0 and the simulated
times of one case (``simtimes ...``) for the cross-backend comparison.

Each case: a reference MoE (``groups = ep``) runs on the union of the group's
batches; the expert-parallel layer cut from it runs on each rank's batch.  The
output, the global loss (probe ``Σ w·y`` plus auxiliary losses) and every
gradient must agree to 1e-10 (float64); the tracer must show exactly two
all-to-alls forward and two backward moving the bytes routing kept.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from simpar import sim, trace  # noqa: E402
from simpar.nn.moe import MoE  # noqa: E402
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig  # noqa: E402
from simpar.comm.mesh import Mesh, ParallelConfig  # noqa: E402
from simpar.parallel.expert import ExpertParallelMoE  # noqa: E402
from simpar.parallel.hybrid import build_model  # noqa: E402
from tests.util import assert_close  # noqa: E402

CLUSTER = sim.a100_cluster(devices_per_node=2)     # ep = 4 spans two "nodes"
SIMTIME_CASE = (4, 2, 0.6, 4)                       # (ep, k, capacity factor, experts)

# (k, capacity_factor, experts per rank): no dropping (None) and dropping (small factor)
CASES = [(1, None, 1), (1, 0.75, 1), (2, None, 2), (2, 0.6, 1), (1, 0.75, 3)]


def cases(ep: int) -> list[tuple]:
    """``(k, capacity_factor, n_experts)`` for an ep-rank group (at least 2 experts)."""
    return [(k, cf, max(2, per * ep)) for k, cf, per in CASES]


def _reference(comm, k, cf, n_experts, h=6, d_ff=8, b=2, s=5, seed=0, policy="position"):
    """The reference layer and the union batch (the same on every rank of ``comm``)."""
    rng = np.random.default_rng([seed, comm.size, k, n_experts])
    ref = MoE(h, n_experts, d_ff, k=k, capacity_factor=cf, groups=comm.size,
              drop_policy=policy, rng=rng, trace_name="moe")
    ref.init_random_(rng, std=0.5)        # a router that is far from uniform
    x = rng.standard_normal((comm.size * b, s, h))
    w = rng.standard_normal(x.shape)       # probe: loss = Σ w·y + aux
    return ref, x, w, slice(comm.rank * b, (comm.rank + 1) * b)


def _run_reference(ref, x, w):
    with trace.untraced():                # the reference is not part of the traced run
        y = ref.forward(x)
        loss = float(np.sum(w * y)) + ref.stats[0].aux_loss
        dx = ref.backward(w)
    return y, loss, dx


def _comm_events(tracer, since):
    return [e for e in tracer.events[since:] if e.category == "comm"]


def check_layer(comm, k, cf, n_experts, policy="position") -> dict:
    """Equivalence, communication count and bytes, load statistics."""
    ref, x, w, mine = _reference(comm, k, cf, n_experts, policy=policy)
    y_ref, loss_ref, dx_ref = _run_reference(ref, x, w)
    st_ref = ref.stats[0]
    if cf is not None and comm.size > 1:
        assert st_ref.dropped_fraction > 0, "weak test: nothing was dropped"
    if cf is None:
        assert st_ref.dropped_fraction == 0

    layer = ExpertParallelMoE.from_reference(ref, comm)
    tracer = comm.tracer
    n0 = len(tracer.events)
    y = layer.forward(x[mine])
    fwd = _comm_events(tracer, n0)
    n1 = len(tracer.events)
    dx = layer.backward(w[mine])
    bwd = _comm_events(tracer, n1)

    # what routing sent, from this layer's own statistics (tracer event args)
    route_ev = [e for e in tracer.events[n0:n1] if e.name == "moe.router.forward"]
    assert len(route_ev) == 1
    kept_r = np.array(route_ev[0].args["moe"]["kept_per_expert"], dtype=np.int64)
    routed_r = np.array(route_ev[0].args["moe"]["routed_per_expert"], dtype=np.int64)
    aux_r = route_ev[0].args["moe"]["aux_loss"]
    assert aux_r == layer.stats[0].aux_loss

    # ---- equivalence: output, global loss, every gradient
    assert_close(y, y_ref[mine], "output")
    assert_close(dx, dx_ref[mine], "input gradient")
    local = float(np.sum(w[mine] * y)) + aux_r / comm.size
    loss = float(comm.all_reduce(np.array([local]))[0])
    assert_close(loss, loss_ref, "loss (probe + auxiliary)")
    ref_grads = ref.gradients()
    for name, g in layer.gradients().items():
        assert_close(g, ref_grads[name], name)
    assert set(layer.gradients()) == {"router.W"} | {
        n for n in ref_grads if n.startswith("experts.") and
        layer.first <= int(n.split(".")[1]) < layer.first + layer.n_local}

    # ---- load statistics: the ranks' records add up to the reference's
    table = comm.all_gather(np.stack([kept_r, routed_r])[None], axis=0)   # (ep, 2, E)
    np.testing.assert_array_equal(table[:, 0].sum(axis=0), st_ref.kept_per_expert)
    np.testing.assert_array_equal(table[:, 1].sum(axis=0), st_ref.routed_per_expert)
    aux_mean = float(comm.all_reduce(np.array([aux_r]))[0]) / comm.size
    assert_close(aux_mean, st_ref.aux_loss, "auxiliary loss")

    # ---- communication: counted from the tracer, bytes = what routing kept
    h, item = x.shape[-1], x.itemsize
    per = n_experts // comm.size
    sent = table[:, 0].sum(axis=1)                                  # rows each rank sends
    # rows the experts of each rank receive
    held = table[:, 0].reshape(comm.size, comm.size, per).sum(axis=(0, 2))
    assert [e.name for e in fwd] == ["all_gather", "all_to_all", "all_to_all"], fwd
    assert [e.name for e in bwd] == ["all_to_all", "all_to_all", "all_reduce"], bwd
    assert fwd[0].nbytes == comm.size * n_experts * 8               # the counts table
    assert fwd[1].nbytes == sent.max() * h * item                   # dispatch
    assert fwd[2].nbytes == held.max() * h * item                   # combine
    assert bwd[0].nbytes == sent.max() * h * item                   # combine⁻¹ (like dispatch)
    assert bwd[1].nbytes == held.max() * h * item                   # dispatch⁻¹ (like combine)
    assert bwd[2].nbytes == h * n_experts * item                    # router gradient sum
    assert all(e.group == comm.name for e in fwd + bwd)
    assert layer.saved_keys() == []
    return {"dropped": st_ref.dropped_fraction,
            "simtimes": [(e.name, e.sim_start, e.sim_end) for e in tracer.events[n0:]]}


def check_gpt(comm, top_k=2, cf=1.0) -> None:
    """A training step of an MoE GPT (layer 1 of 2 is MoE) with experts split over
    ``comm``: global loss and every gradient equal the reference on the union batch."""
    cfg = MoEGPTConfig(vocab_size=11, seq_len=6, n_layer=2, n_head=2, d_model=8, d_ff=12,
                       n_experts=4, top_k=top_k, capacity_factor=cf, moe_layers=(1,),
                       groups=comm.size)
    rng = np.random.default_rng(7)
    b = 2
    idx = rng.integers(0, cfg.vocab_size, size=(comm.size * b, cfg.seq_len))
    tgt = rng.integers(0, cfg.vocab_size, size=idx.shape)

    ref = MoEGPT(cfg, seed=3)
    ref.init_random_(np.random.default_rng(4), std=0.3)
    sd = ref.state_dict()
    with trace.untraced():
        loss_ref = ref.loss(idx, tgt)

    start = MoEGPT(cfg, seed=3)
    start.load_state_dict(sd)
    model = build_model(start, Mesh(comm, ParallelConfig(dp=comm.size, ep=comm.size)))
    loss = model.step(idx, tgt)["loss"]              # the global batch; rank r keeps rows r·b…
    assert_close(loss, loss_ref, "GPT loss (cross-entropy + auxiliary)")
    ref_grads = ref.gradients()
    for name, g in model.gradients().items():
        assert_close(g, ref_grads[name], name)
    layer = model.stages[0].blocks[1].moe
    mine_experts = {f"experts.{e}." for e in layer.experts}
    assert set(model.gradients()) == {
        n for n in ref_grads if ".moe.experts." not in n
        or any(p in n.split(".moe.")[1] + "." for p in mine_experts)}


def check_errors(comm) -> None:
    """Bad configurations raise ValueError naming the values, before any message."""
    n0 = len(comm.tracer.events)
    if comm.size > 1 and 6 % comm.size:
        try:
            ExpertParallelMoE.from_reference(MoE(4, 6, rng=0), comm)
            raise AssertionError("no error for experts not divisible by ep")
        except ValueError as e:
            assert f"n_experts=6 is not divisible by ep={comm.size}" in str(e), e
    for kw, text in (({"k": 5}, "k=5"), ({"capacity_factor": 0.0}, "0.0"),
                     ({"capacity_factor": -1}, "-1")):
        try:
            MoE(4, 4, **kw)
            raise AssertionError(f"no error for {kw}")
        except ValueError as e:
            assert text in str(e), e
    assert [e for e in comm.tracer.events[n0:] if e.category == "comm"] == []


# ---------------------------------------------------------------- under MPI
def _mpi_main() -> None:
    from simpar.comm import mpi
    world = mpi.world(CLUSTER, check=True)
    mpi.abort_on_exception()
    check_errors(world)
    if world.rank == 0:
        print("ok errors", flush=True)
    groups = {4: (0, world.rank), 3: (int(world.rank >= 3), world.rank),
              2: (world.rank // 2, world.rank), 1: (world.rank, 0)}
    simtimes = None
    for ep, (color, key) in groups.items():
        comm = world.split(color, key, name="ep")
        say = print if world.rank == 0 else (lambda *a, **k: None)
        for k, cf, n in cases(comm.size):
            if (comm.size, k, cf, n) == SIMTIME_CASE:
                comm.tracer.reset()                # start the clock at 0, as a fresh world does
            res = check_layer(comm, k, cf, n)
            if (comm.size, k, cf, n) == SIMTIME_CASE:
                simtimes = res["simtimes"]
            say(f"ok layer ep={comm.size} k={k} cf={cf} experts={n} "
                f"dropped={res['dropped']:.3f}", flush=True)
        check_layer(comm, 2, 0.6, 2 * comm.size, policy="probability")
        say(f"ok probability-policy ep={comm.size}", flush=True)
        if comm.size in (2, 4):
            check_gpt(comm)
            say(f"ok gpt ep={comm.size}", flush=True)
        world.barrier()
    say("simtimes " + repr(simtimes), flush=True)


if __name__ == "__main__":
    _mpi_main()
