"""Nothing rots: every script in benchmarks/ runs to completion in its ``--quick``
mode (tiny shapes, seconds, no timing targets checked).  New benchmarks are
picked up by the glob; each must accept ``--quick`` and start whatever world it
needs itself (threads, or ``mpiexec`` from the venv)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_util import ROOT, mpiexec, run_mpi

BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}


def test_benchmarks_are_found():
    assert {"collectives.py", "reference_step.py", "tensor_parallel.py"} <= {p.name for p in
                                                                            BENCHMARKS}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_quick_mode_runs_to_completion(script: Path):
    source = script.read_text()
    assert "--quick" in source, f"{script.name} has no --quick mode"
    if "mpiexec" in source:
        mpiexec()                                   # skips the test when MPI is missing
    res = subprocess.run([sys.executable, str(script), "--quick"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{script.name} --quick failed:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stdout.strip().splitlines()) >= 3, res.stdout      # it printed its table


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_tensor_parallel_quick_under_mpiexec():
    res = run_mpi(2, "benchmarks/tensor_parallel.py", "--quick", timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "backend mpi" in res.stdout and res.stdout.count("speed-up") == 1
