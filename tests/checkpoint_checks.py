"""Checkpoint scenarios shared by the threads tests and the MPI script.

:func:`run`: train 8 steps of a tiny float64 GPT with ``simpar.train.train``,
checkpoint every 4, and resume from step 4 on other layouts and ZeRO stages.
:func:`run_hybrid`: the same with the library alone (``build_model`` +
``DistributedOptimizer`` + ``checkpoint.save/load``), for layouts the command
line does not offer."""
from __future__ import annotations

import numpy as np

from simpar.comm.mesh import ParallelConfig

P = ParallelConfig
KW = dict(steps=8, batch_size=8, lr=1e-2, dtype=np.float64, warmup=2, weight_decay=0.1,
          model=dict(n_layer=2, d_model=16, n_head=2, seq_len=16))
SAVE = (P(dp=2, tp=2, pp=2), 1)                     # where the checkpoint is written
RESUME = {"single process": (P(), 0), "pp2xtp2": (P(tp=2, pp=2), 1),
          "dp4 zero3": (P(dp=4), 3), "cp2xdp2 ring": (P(cp=2, dp=2), 0),
          "dp2xtp2xpp2 zero1 (same)": SAVE}


def run(comm, layout, zero, **kw):
    """Losses of the steps run, and the final full parameters."""
    from simpar.train import train
    out = train(comm, layout, zero=zero, **{**KW, **kw})
    return np.array(out["loss"]), out["model"].full_state("params")


def run_hybrid(comm, layout, stage, root, *, save_at=None, load=False, steps=4,
               options=None, optimizer="adamw", hyper=None):
    """``steps`` steps of the 20-step scenario of :mod:`tests.parallel.hybrid_checks`
    on ``layout`` with ZeRO ``stage``; checkpoint into ``root`` before step
    ``save_at``, or start from the checkpoint in ``root`` (``load``).  Losses of
    the steps run and the final full parameters."""
    from simpar import checkpoint as ck
    from simpar.comm.mesh import Mesh
    from simpar.parallel.hybrid import build_model
    from simpar.parallel.zero import DistributedOptimizer
    from tests.parallel.hybrid_checks import CLIP, Layout, batches, make_reference
    lay = Layout("ckpt", layout)
    X, Y = batches(lay)
    model = build_model(make_reference(lay, layout.dp * lay.m), Mesh(comm, layout),
                        **(options or {}))
    opt = DistributedOptimizer(model, stage, optimizer,
                               **(hyper or dict(lr=1e-2, weight_decay=0.1)))
    start = ck.load(root, model, opt)["step"] if load else 0
    losses = []
    for t in range(start, steps):
        if t == save_at:
            ck.save(root, model, opt, {"step": t}, step=t)
        model.zero_grad()
        losses.append(model.step(X[t], Y[t], lay.m)["loss"])
        opt.clip_grad_norm(CLIP)
        opt.step()
    return np.array(losses), model.full_state("params")
