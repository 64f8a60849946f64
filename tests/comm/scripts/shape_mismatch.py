"""SIMPAR_CHECK=1: ranks passing different shapes all raise the same ValueError."""
import numpy as np

from simpar.comm import mpi

comm = mpi.world(check=True)
try:
    comm.all_reduce(np.zeros(3 + comm.rank))
except ValueError as e:
    print(f"rank {comm.rank} ValueError: {e}", flush=True)
else:
    print(f"rank {comm.rank} no error", flush=True)
