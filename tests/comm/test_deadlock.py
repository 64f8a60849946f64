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
def test_threads_watchdog_quiet_while_others_communicate():
    """Rank 0 waits ~1.5 s for rank 1 while ranks 1 and 2 keep talking: no report."""
    def fn(c):
        if c.rank == 0:
            return c.recv((1,), np.float64, 1, tag=9)[0]
        peer = 3 - c.rank
        for _ in range(100):
            if c.rank == 1:
                c.send(np.ones(1), peer)
                c.recv((1,), np.float64, peer)
                time.sleep(0.015)
            else:
                c.send(c.recv((1,), np.float64, peer), peer)
        if c.rank == 1:
            c.send(np.full(1, 7.0), 0, tag=9)
    t0 = time.perf_counter()
    out = launch(fn, 3, watchdog=0.5)
    assert out[0] == 7.0 and time.perf_counter() - t0 > 1.0


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


def _run_case(name, size, *args, env=None):
    t0 = time.perf_counter()
    res = run_mpi(size, "tests/comm/deadlock_cases.py", name, *args, timeout=60,
                  env={"SIMPAR_WATCHDOG_S": "2", **(env or {})})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "no deadlock" not in out
    return out, time.perf_counter() - t0


MPI_NEEDLES = {
    "micro_batch_counts": ["rank 0: recv from rank 1 tag 2 (waiting",
                           "rank 1: all_reduce op=sum float64 (1,) on world (waiting"],
    "recv_vs_collective": ["rank 0: recv from rank 1 tag 0 (waiting",
                           "rank 1: barrier on world (waiting", "rank 2: barrier on world"],
    "crossed_groups": ["rank 0: all_reduce op=sum float64 (2,) on tp (waiting",
                       "rank 1: all_reduce op=sum float64 (2,) on dp (waiting"],
}


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(MPI_NEEDLES))
def test_mpi_watchdog_reports_and_ends_the_job(name):
    out, took = _run_case(name, CASES[name][0])
    assert out.count("simpar watchdog") == 1, out              # one report per job
    assert "waited more than 2 s (SIMPAR_WATCHDOG_S=2)" in out
    for n in MPI_NEEDLES[name]:
        assert n in out, (n, out)
    assert took < 20, took
    assert "Traceback" not in out


@pytest.mark.mpi
def test_mpi_run_timeout_is_honoured():
    out, took = _run_case("slow_peer", 3, "2.5", env={"SIMPAR_WATCHDOG_S": "0"})
    assert "passed its timeout of 2.5 s" in out, out
    assert out.count("simpar watchdog") == 1, out
    assert "rank 1: not waiting in simpar (computing" in out, out   # its watchdog thread answers
    assert "rank 0: barrier on world (waiting" in out, out
    assert took < 20, took


@pytest.mark.mpi
def test_mpi_early_return_is_a_clear_error():
    out, took = _run_case("early_return", 3)
    assert "rank 2: finished (fn returned; run gathers the results)" in out, out
    assert "ranks 0, 1: all_reduce op=sum float64 (2,)" in out, out
    assert out.count("Traceback") == 1, out
    assert took < 20, took
