"""One BLAS thread per simulated device, chosen by simpar (simpar.runtime): on the
threads backend while a world runs, under mpiexec in every rank; an explicit
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS always wins.  Each case runs in a fresh
process whose environment has no BLAS variable (the test suite sets them)."""
import os
import subprocess
import sys

import pytest

from simpar.runtime import BLAS_VARIABLES
from tests.mpi_util import ROOT, mpiexec

pytest.importorskip("threadpoolctl")

# prints: BLAS threads before the world, on each device of a 2- and a 1-device
# world (simpar.launch under a plain python, simpar.run under mpiexec), after it
SCRIPT = """
import simpar
from simpar.runtime import blas_threads
before = blas_threads()
if simpar.comm.launcher_size() > 1:
    me = {}
    def per_rank(comm):
        me["rank"] = comm.rank
        return blas_threads()
    counts = simpar.run(per_rank)
    if me["rank"] == 0:                                  # one line per job
        print("mpi", counts)
else:
    print("threads", (before, simpar.launch(lambda c: blas_threads(), 2),
                      simpar.launch(lambda c: blas_threads(), 1), blas_threads()))
"""


def _env(**user):
    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES}
    return {**env, "PYTHONPATH": str(ROOT), **user}


def _run(cmd, env) -> list:
    res = subprocess.run(cmd + [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [ln.split(" ", 1) for ln in res.stdout.splitlines() if ln.strip()]
    return [(kind, eval(rest)) for kind, rest in lines]          # noqa: S307 - our own output


def _cores_blas() -> int:
    """OpenBLAS's own default in a process without any variable (one per core)."""
    res = subprocess.run([sys.executable, "-c", "import numpy, threadpoolctl; print(max("
                          "i['num_threads'] for i in threadpoolctl.threadpool_info() "
                          "if i['user_api'] == 'blas'))"], env=_env(), capture_output=True,
                         text=True, timeout=60)
    return int(res.stdout)


def test_threads_world_uses_one_blas_thread_per_device_and_restores_it():
    [(kind, got)] = _run([], _env())
    assert kind == "threads"
    (before, *_rest) = got
    assert got == (before, [1, 1], [1], before)
    assert before == _cores_blas()              # outside a world simpar changes nothing


def test_explicit_user_setting_wins_on_threads():
    # negative control for the check above: the count read inside a world is
    # the real one (2 here), not a constant
    [(_, got)] = _run([], _env(OPENBLAS_NUM_THREADS="2"))
    assert got == (2, [2, 2], [2], 2)
    [(_, got)] = _run([], _env(OMP_NUM_THREADS="1"))
    assert got == (1, [1, 1], [1], 1)


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_every_mpi_rank_uses_one_blas_thread_unless_the_user_says():
    assert _run([mpiexec(), "-n", "2"], _env()) == [("mpi", [1, 1])]
    assert _run([mpiexec(), "-n", "2"], _env(OPENBLAS_NUM_THREADS="2")) == [("mpi", [2, 2])]
