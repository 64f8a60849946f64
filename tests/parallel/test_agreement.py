"""Parallel entry points check that their group agrees (always on): ranks that
disagree get, on every rank, an error naming each rank's value — no hang, no
silent wrong answer.  Threads here; the same cases under mpiexec below."""
import pytest

import simpar
from tests.mpi_util import run_mpi
from tests.parallel.agreement_cases import CASES, run_case


@pytest.mark.parametrize("case,n,words", CASES, ids=[c[0].__name__ for c in CASES])
def test_disagreement_is_an_error_on_every_rank(case, n, words):
    msgs = simpar.launch(lambda comm: run_case(comm, case), n, timeout=30)
    for m in msgs:
        assert all(w in m for w in words), msgs


def test_disagreement_is_an_error_on_every_rank_mpi():
    out = run_mpi(3, "tests/parallel/scripts/agreement_mpi.py", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    got = [ln for ln in out.stdout.splitlines() if ln.startswith("case ")]
    for case, n, words in CASES:
        mine = [ln for ln in got if ln.startswith(f"case {case.__name__} ")]
        assert len(mine) == n, out.stdout
        assert all(all(w in ln for w in words) for ln in mine), mine
