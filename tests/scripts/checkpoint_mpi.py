"""Checkpoints under MPI: ``mpiexec -n 8 python checkpoint_mpi.py save ROOT`` trains
the scenario of :mod:`tests.checkpoint_checks` uninterrupted, checkpointing into
ROOT; ``mpiexec -n N python checkpoint_mpi.py resume ROOT NAME ...`` resumes each
named layout of world size N.  Rank 0 prints ``losses <name> <json list>`` (exact
float reprs) and writes the final parameters to ``ROOT/params/<name>.npz``."""
import json
import os
import sys

import numpy as np

from simpar.comm import mpi
from tests.checkpoint_checks import RESUME, SAVE, run


def main(mode, root, *names) -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    jobs = [("uninterrupted", SAVE, dict(save=root, save_every=4))] if mode == "save" else \
        [(n, RESUME[n], dict(resume=f"{root}/step-00000004")) for n in names]
    for name, (layout, zero), kw in jobs:
        losses, params = run(world, layout, zero, **kw)
        if world.rank == 0:
            print(f"losses {name} {json.dumps(losses.tolist())}", flush=True)
            os.makedirs(f"{root}/params", exist_ok=True)
            np.savez(f"{root}/params/{name}.npz", **params)
        world.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
