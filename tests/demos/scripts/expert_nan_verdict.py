"""Negative control for the expert demo's verdict under mpiexec: ranks 0-2 get a
NaN in their expert-parallel output during the equivalence checks, rank 3 none
(an MPI MAX reduction of the errors once dropped those NaNs and printed OK)."""
import numpy as np

from simpar.demos import expert_parallel as demo
from simpar.parallel.expert import ExpertParallelMoE

real_forward = ExpertParallelMoE.forward
real_equivalence = demo.equivalence
poison = {"on": False}


def forward(self, x, *args, **kwargs):
    y = real_forward(self, x, *args, **kwargs)
    if poison["on"] and self.comm.rank < 3:
        y = y.copy()
        y.flat[-1] = np.nan
    return y


def equivalence(*args, **kwargs):
    poison["on"] = True
    try:
        return real_equivalence(*args, **kwargs)
    finally:
        poison["on"] = False


ExpertParallelMoE.forward = forward
demo.equivalence = equivalence
demo.main(["--steps", "2", "--out", __import__("sys").argv[1]])
