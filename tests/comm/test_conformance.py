"""The conformance suite on both backends, world sizes 1-4."""
import pytest

from simpar import launch, sim
from tests.comm.conformance import CHECKS
from tests.mpi_util import run_mpi

SIZES = [1, 2, 3, 4]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_threads(check, size):
    launch(check, size, cluster=sim.a100_cluster(devices_per_node=2), timeout=30)


def _threads_simtimes(size):
    from tests.comm.conformance import check_barrier_and_clock
    return [repr(t) for t in launch(check_barrier_and_clock, size,
                                    cluster=sim.a100_cluster(devices_per_node=2))]


@pytest.mark.mpi
@pytest.mark.parametrize("size", SIZES)
def test_mpi(size):
    res = run_mpi(size, "tests/comm/conformance.py", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for check in CHECKS:
        assert f"ok {check.__name__}" in res.stdout, res.stdout + res.stderr
    # the simulated clock is bit-identical across backends
    line = next(l for l in res.stdout.splitlines() if l.startswith("simtimes "))
    assert line.split()[1:] == _threads_simtimes(size)


@pytest.mark.mpi
def test_mpi_polite_waiting():
    """The spin-then-sleep waiting path (used when ranks outnumber cores)."""
    res = run_mpi(3, "tests/comm/conformance.py", timeout=120, env={"SIMPAR_POLITE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(f"ok {c.__name__}" in res.stdout for c in CHECKS)
