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


# ------------------------------------------------ shapes chosen by hypothesis
from hypothesis import given, settings, strategies as st  # noqa: E402
import numpy as np  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(size=st.integers(1, 4), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       axis_seed=st.integers(0, 10), dtype=st.sampled_from([np.float64, np.float32, np.int64]))
def test_gather_scatter_shapes(size, shape, axis_seed, dtype):
    """all_gather then reduce_scatter along the same axis: reduce_scatter of the
    gathered array is size x (my part) only if every rank contributed the same;
    here each rank's part differs, so compare with the sum computed directly."""
    axis = axis_seed % len(shape)

    def fn(comm):
        rng = np.random.default_rng(100 + comm.rank)
        mine = rng.integers(-5, 5, size=shape).astype(dtype)
        parts = [np.random.default_rng(100 + r).integers(-5, 5, size=shape).astype(dtype)
                 for r in range(comm.size)]
        full = comm.all_gather(mine, axis=axis)
        np.testing.assert_array_equal(full, np.concatenate(parts, axis=axis))
        back = comm.reduce_scatter(full, axis=axis)
        total = sum(np.concatenate(parts, axis=axis) for _ in range(comm.size))
        np.testing.assert_array_equal(back, np.split(total, comm.size, axis=axis)[comm.rank])
    launch(fn, size, timeout=30)


def test_small_messages_ride_in_the_arrival_exchange(monkeypatch):
    """At most INLINE_BYTES: one exchange in all (no data call); larger: the data
    call follows.  The all-to-all's counts always ride along."""
    from simpar.comm import threads
    from simpar.comm.base import INLINE_BYTES
    calls = []
    for name in ("_raw_all_reduce", "_raw_all_gather", "_raw_reduce_scatter", "_raw_broadcast",
                 "_raw_all_to_all_counts"):
        orig = getattr(threads.ThreadComm, name)
        monkeypatch.setattr(threads.ThreadComm, name,
                            lambda self, *a, _o=orig, _n=name: calls.append(_n) or _o(self, *a))

    def run(comm, n):
        x = np.ones(n)
        comm.all_reduce(x)
        comm.all_gather(x)                          # each rank sends n elements
        comm.reduce_scatter(x)
        comm.broadcast(x)
        comm.all_to_all(x, [n // 2, n - n // 2])
    launch(lambda c: run(c, INLINE_BYTES // 8), 2)
    assert calls == []
    launch(lambda c: run(c, INLINE_BYTES // 8 + 2), 2)
    assert sorted(set(calls)) == ["_raw_all_gather", "_raw_all_reduce", "_raw_broadcast",
                                  "_raw_reduce_scatter"], calls
