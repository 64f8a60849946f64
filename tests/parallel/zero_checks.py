"""ZeRO equivalence checks shared by the threads tests and the MPI script: the
20 AdamW steps with global-norm clipping of :mod:`tests.parallel.hybrid_checks`,
with the optimizer (and gradients, parameters) sharded by
:class:`~simpar.parallel.zero.DistributedOptimizer`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.parallel.hybrid import build_model
from simpar.parallel.zero import DistributedOptimizer
from tests.parallel.hybrid_checks import CLIP, STEPS, Layout, batches, make_reference

P = ParallelConfig
RING = {"context_parallel": "ring"}


@dataclass(frozen=True)
class ZeroCase:
    name: str
    stage: int
    layout: Layout
    optimizer: str = "adamw"
    hyper: dict = field(default_factory=lambda: dict(lr=1e-2, weight_decay=0.1))

    @property
    def world_size(self) -> int:
        return self.layout.world_size


CASES = [
    ZeroCase("zero1 dp2", 1, Layout("dp2", P(dp=2))),
    ZeroCase("zero2 dp2", 2, Layout("dp2", P(dp=2))),
    ZeroCase("zero3 dp2", 3, Layout("dp2", P(dp=2))),
    ZeroCase("zero1 dp4", 1, Layout("dp4", P(dp=4))),
    ZeroCase("zero2 dp4", 2, Layout("dp4", P(dp=4))),
    ZeroCase("zero3 dp4", 3, Layout("dp4", P(dp=4))),
    ZeroCase("zero3 dp3 odd, 1 KB", 3, Layout("dp3", P(dp=3), {"bucket_bytes": 1000}, m=1,
                                               batch=6)),
    ZeroCase("zero2 dp3 odd, 1 KB buckets", 2, Layout("dp3", P(dp=3), {"bucket_bytes": 1000},
                                                      m=1, batch=6)),
    ZeroCase("zero1 dp2xtp2xpp2", 1, Layout("dp2xtp2xpp2", P(dp=2, tp=2, pp=2))),
    ZeroCase("zero2 dp2xtp2", 2, Layout("tp2xdp2", P(dp=2, tp=2))),
    ZeroCase("zero3 dp2xtp2 tied", 3, Layout("tp2xdp2", P(dp=2, tp=2), tied=True)),
    ZeroCase("zero1 moe ep2 in dp4", 1, Layout("moe ep2 in dp4", P(dp=4, ep=2), moe=True)),
    ZeroCase("zero2 tied tp2+SPxpp2xdp2", 2, Layout("x", P(dp=2, tp=2, pp=2),
                                                    {"sequence_parallel": True}, tied=True)),
    ZeroCase("zero1 interleaved vpp2 pp2xdp2", 1, Layout("x", P(dp=2, pp=2, vpp=2),
                                                        {"schedule": "interleaved"})),
    ZeroCase("zero1 zb-h1 pp2xdp2", 1, Layout("x", P(dp=2, pp=2), {"schedule": "zb-h1"}, m=4)),
    ZeroCase("zero2 moe pp2xep2, m=4", 2, Layout("x", P(dp=2, pp=2, ep=2), moe=True, m=4)),
    ZeroCase("zero1 sgd momentum dp2", 1, Layout("dp2", P(dp=2)), "sgd",
             dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    # context parallelism: dense parameters sharded over dp x cp (mesh.dp_cp)
    ZeroCase("zero1 cp2", 1, Layout("cp2", P(cp=2), RING)),
    ZeroCase("zero2 cp2 ulysses", 2, Layout("cp2", P(cp=2), {"context_parallel": "ulysses"})),
    ZeroCase("zero3 cp2", 3, Layout("cp2", P(cp=2), RING)),
    ZeroCase("zero1 cp2xdp2", 1, Layout("cp2xdp2", P(cp=2, dp=2), RING)),
    ZeroCase("zero2 cp2xdp2, 1 KB buckets", 2, Layout("cp2xdp2", P(cp=2, dp=2),
                                                      {**RING, "bucket_bytes": 1000})),
    ZeroCase("zero3 cp2xdp2", 3, Layout("cp2xdp2", P(cp=2, dp=2), RING)),
    ZeroCase("zero3 cp2xtp2 tied", 3, Layout("cp2xtp2", P(cp=2, tp=2), RING, tied=True)),
    ZeroCase("zero1 cp2xpp2", 1, Layout("cp2xpp2", P(cp=2, pp=2), RING)),
]
BY_NAME = {c.name: c for c in CASES}


def reference_run(case: ZeroCase):
    """The single-device run of ``case`` (its optimizer)."""
    from simpar import trace
    from simpar.optim import SGD, AdamW, clip_grad_norm
    lay = case.layout
    X, Y = batches(lay)
    with trace.untraced():
        model = make_reference(lay, lay.config.dp * lay.m)
        cls = AdamW if case.optimizer == "adamw" else SGD
        opt = cls(model.parameters(), **case.hyper)
        losses = []
        for t in range(STEPS):
            model.zero_grad()
            losses.append(model.loss(X[t], Y[t]))
            clip_grad_norm(model.gradients(), CLIP)
            opt.step(model.gradients())
    return np.array(losses), model.state_dict()


def train_zero(comm, case: ZeroCase, steps: int = STEPS):
    """Every rank: ``steps`` steps of ``case``; (losses, full parameters)."""
    lay = case.layout
    X, Y = batches(lay)
    model = build_model(make_reference(lay, lay.config.dp * lay.m), Mesh(comm, lay.config),
                        **lay.options)
    opt = DistributedOptimizer(model, case.stage, case.optimizer, **case.hyper)
    losses = []
    for t in range(steps):
        model.zero_grad()
        losses.append(model.step(X[t], Y[t], lay.m)["loss"])
        opt.clip_grad_norm(CLIP)
        opt.step()
    return np.array(losses), model.full_state("params")
