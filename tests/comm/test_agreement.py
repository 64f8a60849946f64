"""Ranks that disagree get the same clear error on every rank, on both backends,
with SIMPAR_CHECK off (the checks are always on)."""
import numpy as np
import pytest

from simpar import launch
from tests.comm.agreement_cases import CASES, expect_disagreement
from tests.mpi_util import run_mpi


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_threads(name, size):
    msgs = launch(lambda c: expect_disagreement(c, name), size, timeout=20, check=False)
    assert all(m == msgs[0] for m in msgs), msgs


@pytest.mark.mpi
def test_mpi():
    res = run_mpi(3, "tests/comm/agreement_cases.py", timeout=60, env={"SIMPAR_CHECK": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    for name in CASES:
        assert f"ok {name}" in res.stdout, res.stdout + res.stderr


def test_agree_returns_the_value_and_accepts_equal_values():
    def fn(c):
        assert c.agree("config", ("1f1b", 4, (2, 2))) == ("1f1b", 4, (2, 2))
        c.agree("array", np.arange(4.0))
        return c.all_reduce(np.ones(2)).tolist()      # the group still works
    assert launch(fn, 3, timeout=20) == [[3.0, 3.0]] * 3


def test_agree_groups_ranks_with_the_same_value():
    msg = launch(lambda c: expect_disagreement(c, "agree_value"), 4, timeout=20)[0]
    assert "ranks 1, 2, 3: (1, 3, 2)" in msg and "rank 0: (2, 2, 2)" in msg


def test_agree_does_not_move_the_clock():
    def fn(c):
        c.tracer.reset()
        c.agree("x", 1)
        return c.tracer.sim_now, len(c.tracer.events)
    assert launch(fn, 2, timeout=20) == [(0.0, 0), (0.0, 0)]
