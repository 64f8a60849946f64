"""Mixed-precision checks shared by the threads tests and the MPI script.

:func:`forced_overflow` trains a float16 GPT on dp2 x tp2 (4 ranks) with float32
master weights, forces an inf into one rank's gradient at step 1 and reports,
per rank, whether each step was taken, the loss scale after it and a
fingerprint of the parameters: every rank must skip the same step and lower
the scale the same way.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.mixed_precision import LossScaler, MixedPrecisionOptimizer
from simpar.nn import GPT, GPTConfig
from simpar.nn.precision import FP16
from simpar.parallel.hybrid import build_model

CFG = GPTConfig(vocab_size=13, seq_len=8, n_layer=2, n_head=2, d_model=16)


def forced_overflow(comm, agree: bool = True, bad_rank: int = 3) -> list:
    model = build_model(GPT(CFG, seed=1, dtype=FP16), Mesh(comm, ParallelConfig(dp=2, tp=2)))
    opt = MixedPrecisionOptimizer(model.parameters(), "adamw", lr=1e-2,
                                  comm=comm if agree else None,
                                  scaler=LossScaler(init_scale=2.0 ** 10, growth_interval=2))
    rng = np.random.default_rng(0)
    out = []
    for step in range(4):
        x, y = rng.integers(0, 13, (4, 8)), rng.integers(0, 13, (4, 8))
        model.zero_grad()
        model.step(x, y, 1, loss_scale=opt.loss_scale)
        if step == 1 and comm.rank == bad_rank:
            next(iter(model.gradients().values())).flat[0] = np.inf    # one element, one rank
        took = opt.step(model.gradients(), max_norm=1.0, norm=model.grad_norm) if agree else \
            opt.step(model.gradients())
        digest = hashlib.sha1(b"".join(p.tobytes() for p in model.parameters().values()))
        out.append((took, opt.loss_scale, opt.scaler.skipped, digest.hexdigest()[:12]))
    return out


if __name__ == "__main__":
    from simpar.comm import mpi
    world = mpi.world()
    mpi.abort_on_exception()
    every = world.gather_objects(forced_overflow(world))
    if world.rank == 0:
        for rank, steps in enumerate(every):
            print(f"rank {rank} " + " ".join(f"{int(t)}:{s:g}:{k}" for t, s, k, _ in steps),
                  flush=True)
    sys.exit(0)
