"""Checkpoint scenario shared by the threads tests and the MPI script: train 8
steps of a tiny float64 GPT with ``simpar.train.train``, checkpoint every 4, and
resume from step 4 on other layouts and ZeRO stages."""
from __future__ import annotations

import numpy as np

from simpar.comm.mesh import ParallelConfig

P = ParallelConfig
KW = dict(steps=8, batch_size=8, lr=1e-2, dtype=np.float64, warmup=2, weight_decay=0.1,
          model=dict(n_layer=2, d_model=16, n_head=2, seq_len=16))
SAVE = (P(dp=2, tp=2, pp=2), 1)                     # where the checkpoint is written
RESUME = {"single process": (P(), 0), "pp2xtp2": (P(tp=2, pp=2), 1),
          "dp4 zero3": (P(dp=4), 3), "dp2xtp2xpp2 zero1 (same)": SAVE}


def run(comm, layout, zero, **kw):
    """Losses of the steps run, and the final full parameters."""
    from simpar.train import train
    out = train(comm, layout, zero=zero, **{**KW, **kw})
    return np.array(out["loss"]), out["model"].full_state("params")
