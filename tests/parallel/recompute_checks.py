"""Activation recomputation composed with pipelines and tensor/sequence parallelism.

:func:`run` trains two AdamW steps of a 4-layer float64 GPT on one layout with a
recompute mode and returns every step's loss and the full gradients of the last
step; :func:`bit_equal` says whether two such runs agree **bit for bit**.  Used
by the threads tests and by ``scripts/recompute_mpi.py`` (the same functions).
"""
from __future__ import annotations

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.optim import AdamW
from simpar.parallel.hybrid import build_model
from tests.parallel.hybrid_checks import Layout, batches, make_reference

P = ParallelConfig
LAYOUTS = {
    "tp2+SPxpp2 1f1b": Layout("tp2+SPxpp2 1f1b", P(tp=2, pp=2), {"sequence_parallel": True},
                              m=4),
    "zb-h1 tp2+SPxpp2": Layout("zb-h1 tp2+SPxpp2", P(tp=2, pp=2),
                               {"schedule": "zb-h1", "sequence_parallel": True}, m=4),
    "zb-h1 pp2xdp2": Layout("zb-h1 pp2xdp2", P(dp=2, pp=2), {"schedule": "zb-h1"}, m=4),
    "moe pp2xep2": Layout("moe pp2xep2", P(dp=2, pp=2, ep=2), moe=True, m=2),
    "interleaved vpp2 pp2xdp2": Layout("interleaved vpp2 pp2xdp2", P(dp=2, pp=2, vpp=2),
                                       {"schedule": "interleaved"}, m=4),
    "cp2 ring xdp2": Layout("cp2 ring xdp2", P(dp=2, cp=2), {"context_parallel": "ring"}),
}
MODES = ("none", "selective", "full")
STEPS = 2


def run(comm, name: str, mode: str):
    """``(losses, gradients of the last step, activation peak bytes)`` on this rank."""
    lay = LAYOUTS[name]
    X, Y = batches(lay)
    model = build_model(make_reference(lay, lay.config.dp * lay.m), Mesh(comm, lay.config),
                        recompute=mode, **lay.options)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    comm.tracer.memory.reset_peak()
    for t in range(STEPS):
        model.zero_grad()
        losses.append(model.step(X[t], Y[t], lay.m)["loss"])
        grads = {k: g.copy() for k, g in model.gradients().items()}
        opt.step(model.gradients())
    return np.array(losses), grads, comm.tracer.memory.peak.get("activations", 0)


def bit_equal(a, b) -> bool:
    (la, ga, _), (lb, gb, _) = a, b
    return (np.array_equal(la, lb) and set(ga) == set(gb)
            and all(np.array_equal(ga[k], gb[k]) for k in ga))


def check_layout(comm, name: str) -> dict:
    """Every mode against ``"none"`` on this rank: ``{mode: (bit equal, peak bytes)}``."""
    runs = {mode: run(comm, name, mode) for mode in MODES}
    return {mode: (bit_equal(runs[mode], runs["none"]), runs[mode][2]) for mode in MODES}
