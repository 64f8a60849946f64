"""A program that can never finish is named, never waited out."""
import math
import random
import threading
import time

import numpy as np
import pytest

from simpar import launch
from simpar.comm import DeadlockError
from tests.comm.deadlock_cases import CASES, slow_peer
from tests.mpi_util import run_mpi


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(CASES))
def test_threads_deadlock_named_at_once(name):
    size, fn, needles = CASES[name]
    t0 = time.perf_counter()
    with pytest.raises(DeadlockError) as info:
        launch(fn, size, timeout=math.inf, watchdog=0)     # no timeout, no watchdog
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.timeout(30)
def test_threads_every_waiting_rank_gets_the_report():
    seen = []

    def fn(c):
        try:
            CASES["early_return"][1](c)
        except DeadlockError as e:
            seen.append((c.rank, str(e)))
            raise
    with pytest.raises(DeadlockError):
        launch(fn, 3, timeout=math.inf)
    assert sorted(r for r, _ in seen) == [0, 1] and seen[0][1] == seen[1][1]


@pytest.mark.timeout(30)
def test_threads_watchdog_names_a_rank_that_never_communicates():
    t0 = time.perf_counter()
    with pytest.raises(DeadlockError, match=r"waited more than 0.5 s.*rank 1: running") as info:
        launch(slow_peer, 3, watchdog=0.5)
    assert time.perf_counter() - t0 < 3.0
    assert "rank 0: barrier on world (waiting for rank 1)" in str(info.value)


@pytest.mark.timeout(30)
def test_threads_timeout_names_what_each_rank_does():
    def fn(c):
        if c.rank == 0:
            time.sleep(2)
        c.barrier()
    with pytest.raises(TimeoutError, match=r"within 0.3 s.*rank 0: running.*rank 1: barrier"):
        launch(fn, 2, timeout=0.3, watchdog=0)


def test_launch_has_a_default_timeout(monkeypatch):
    from simpar.comm.threads import default_timeout
    assert default_timeout() == 1800
    monkeypatch.setenv("SIMPAR_TIMEOUT_S", "0")
    assert default_timeout() == math.inf
    monkeypatch.setenv("SIMPAR_TIMEOUT_S", "0.3")

    def fn(c):
        if c.rank == 0:
            time.sleep(1.5)
    with pytest.raises(TimeoutError):
        launch(fn, 2, watchdog=0)


@pytest.mark.timeout(60)
def test_threads_no_false_deadlock_under_load():
    """Many tiny exchanges with random delays: the detector never fires."""
    def fn(c):
        rng = random.Random(c.rank)
        p = c.size
        sub = c.split(c.rank % 2)
        for i in range(300):
            if rng.random() < 0.1:
                time.sleep(rng.random() * 1e-3)
            r = c.irecv((2,), np.float64, (c.rank - 1) % p, tag=i % 3)
            c.send(np.full(2, float(i)), (c.rank + 1) % p, tag=i % 3)
            assert r.wait()[0] == i
            if i % 7 == 0:
                sub.all_reduce(np.ones(1))
            if i % 11 == 0:
                c.barrier()
        return True
    assert launch(fn, 5, timeout=50, watchdog=0) == [True] * 5
    assert threading.active_count() < 50


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["early_return", "micro_batch_counts", "recv_vs_collective"])
def test_mpi_watchdog_reports_and_ends_the_job(name):
    size, _, needles = CASES[name]
    t0 = time.perf_counter()
    res = run_mpi(size, "tests/comm/deadlock_cases.py", name, timeout=60,
                  env={"SIMPAR_WATCHDOG_S": "2"})
    took = time.perf_counter() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "no deadlock" not in out
    assert out.count("simpar watchdog") == 1, out              # printed once per job
    assert took < 15, took
    for n in ("rank 0:", "rank 1:"):
        assert n in out, out
