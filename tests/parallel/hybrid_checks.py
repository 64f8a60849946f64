"""Hybrid-parallel equivalence checks shared by the threads tests and the MPI script.

:func:`train_layout` runs 20 AdamW steps with global-norm clipping of a 4-layer
GPT (or MoE GPT) in float64 on one layout; :func:`reference_run` runs the same
steps on one device; :func:`errors` compares per-step losses and final
parameters (NaN-aware, :mod:`simpar.testing`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simpar import trace
from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.nn import GPT, GPTConfig
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig
from simpar.optim import AdamW, clip_grad_norm
from simpar.parallel.hybrid import build_model
from simpar.testing import compare, rel_error

VOCAB, SEQ, BATCH, STEPS, CLIP = 13, 8, 8, 20, 0.5


@dataclass(frozen=True)
class Layout:
    name: str
    config: ParallelConfig
    options: dict = field(default_factory=dict)
    moe: bool = False
    tied: bool = False
    m: int = 2
    n_layer: int = 4
    batch: int = BATCH

    @property
    def world_size(self) -> int:
        return self.config.world_size


P = ParallelConfig
LAYOUTS = [
    Layout("dp2", P(dp=2)),
    Layout("dp3 (odd)", P(dp=3), m=1, batch=6),
    Layout("dp4", P(dp=4)),
    Layout("tp2xdp2", P(dp=2, tp=2)),
    Layout("pp2xdp2", P(dp=2, pp=2)),
    Layout("pp3 uneven (4 layers)", P(pp=3), m=4, n_layer=4),
    Layout("tp2xpp2", P(tp=2, pp=2)),
    Layout("dp2xtp2xpp2", P(dp=2, tp=2, pp=2)),
    Layout("tp2+SPxpp2", P(tp=2, pp=2), {"sequence_parallel": True}),
    Layout("interleaved vpp2 pp2xdp2", P(dp=2, pp=2, vpp=2), {"schedule": "interleaved"}),
    Layout("tied pp2", P(pp=2), tied=True),
    Layout("tied interleaved vpp2 dp2, overlap", P(dp=2, vpp=2), tied=True,
           options={"schedule": "interleaved", "overlap": True, "bucket_bytes": 1000}),
    Layout("tied tp2xpp2xdp2", P(dp=2, tp=2, pp=2), tied=True),
    Layout("zb-h1 pp2xdp2", P(dp=2, pp=2), {"schedule": "zb-h1"}, m=4),
    Layout("zb-h1 tp2+SPxpp2", P(tp=2, pp=2), {"schedule": "zb-h1", "sequence_parallel": True},
           m=4),
    Layout("zb-h1 tied tp2xpp2", P(tp=2, pp=2), {"schedule": "zb-h1"}, tied=True, m=4),
    Layout("overlap dp2xpp2, 1 KB buckets", P(dp=2, pp=2), {"overlap": True,
                                                           "bucket_bytes": 1000}),
    Layout("moe ep2 (dp2)", P(dp=2, ep=2), moe=True),
    Layout("moe ep2 in dp4 (edp2)", P(dp=4, ep=2), moe=True),
    Layout("moe tp2xep2", P(dp=2, tp=2, ep=2), moe=True),
    Layout("moe tp2+SPxep2", P(dp=2, tp=2, ep=2), {"sequence_parallel": True}, moe=True),
    Layout("moe tp2+SPxpp2, zb-h1", P(tp=2, pp=2), {"sequence_parallel": True,
                                                   "schedule": "zb-h1"}, moe=True, m=4),
    Layout("moe pp2xep2, m=4", P(dp=2, pp=2, ep=2), moe=True, m=4),
]
BY_NAME = {lay.name: lay for lay in LAYOUTS}


def make_reference(lay: Layout, groups: int = 1):
    kw = dict(vocab_size=VOCAB, seq_len=SEQ, n_layer=lay.n_layer, n_head=4, d_model=16,
              tie_weights=lay.tied)
    if lay.moe:
        return MoEGPT(MoEGPTConfig(**kw, n_experts=4, top_k=2, groups=groups), seed=1)
    return GPT(GPTConfig(**kw), seed=1)


def batches(lay: Layout):
    rng = np.random.default_rng(7)
    shape = (STEPS, lay.batch, SEQ)
    return rng.integers(0, VOCAB, shape), rng.integers(0, VOCAB, shape)


def reference_run(lay: Layout, groups: int | None = None):
    """Losses per step and final parameters of the single-device run (MoE routing
    groups = dp·m, one per data-parallel rank and micro-batch)."""
    X, Y = batches(lay)
    with trace.untraced():
        model = make_reference(lay, lay.config.dp * lay.m if groups is None else groups)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for t in range(STEPS):
            model.zero_grad()
            losses.append(model.loss(X[t], Y[t]))
            clip_grad_norm(model.gradients(), CLIP)
            opt.step(model.gradients())
    return np.array(losses), model.state_dict()


def train_layout(comm, lay: Layout):
    """Every rank: the same 20 steps on ``lay``; (losses, full parameters)."""
    X, Y = batches(lay)
    model = build_model(make_reference(lay, lay.config.dp * lay.m), Mesh(comm, lay.config),
                        **lay.options)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for t in range(STEPS):
        model.zero_grad()
        losses.append(model.step(X[t], Y[t], lay.m)["loss"])
        model.clip_grad_norm(CLIP)
        opt.step(model.gradients())
    return np.array(losses), model.full_state("params")


def errors(got, want) -> dict[str, float]:
    """Relative errors of the per-step losses and of every final parameter."""
    (losses, params), (ref_losses, ref_params) = got, want
    if set(params) != set(ref_params):
        raise AssertionError(f"parameter names differ: {sorted(set(params) ^ set(ref_params))}")
    return {"loss": rel_error(losses, ref_losses), **compare(params, ref_params)}


# ------------------------------------------------------------------ errors
#: (name, case, words every rank's error holds): built by :func:`build_or_error`
BAD_LAYOUTS = [
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


def build_or_error(comm, case) -> str:
    """Build the bad layout ``case``; the error (with ``[events n]``: the messages
    sent before it, when the mesh was built) or ``"no error"``."""
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
