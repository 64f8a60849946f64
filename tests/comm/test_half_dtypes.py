"""16-bit messages on both backends (see :mod:`tests.comm.half_checks`)."""
import pytest

import simpar
from tests.comm.half_checks import check
from tests.mpi_util import run_mpi


@pytest.mark.parametrize("n", [1, 2, 4])
def test_half_messages_threads(n):
    got = simpar.launch(check, n, timeout=30)
    assert all(g == got[0] for g in got)


@pytest.mark.mpi
def test_half_messages_mpi_same_bits_as_threads():
    out = run_mpi(2, "tests/comm/half_checks.py", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("half "))
    assert line.split()[1:] == simpar.launch(check, 2, timeout=30)[0]
