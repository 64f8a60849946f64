"""Run a script under ``mpiexec`` from pytest, with a timeout so a hang fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'simpar[mpi]')")
    return exe


def run_mpi(n: int, *args: str, timeout: float = 120, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """``mpiexec -n n python args...`` with one BLAS thread per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "SIMPAR_CHECK": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def reported_errors(stdout: str, sep: str = " ") -> dict[str, float]:
    """``{name: error}`` from the ``worst <name><sep><error>`` lines an
    equivalence script prints on rank 0."""
    seen = {}
    for line in stdout.splitlines():
        if line.startswith("worst "):
            name, err = line[6:].rsplit(sep, 1)
            seen[name] = float(err)
    return seen
