"""Failure semantics and bad input: clear errors, never a hang."""
import re
import time
from pathlib import Path

import numpy as np
import pytest

from simpar import launch
from simpar.comm import DeadlockError, WorldAborted, init, run
from simpar.comm.mesh import Mesh, ParallelConfig
from tests.mpi_util import run_mpi


# ------------------------------------------------------------ threads world
@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["recv", "collective", "before-anything"])
def test_threads_failing_rank_releases_the_others(where):
    def fn(comm):
        if comm.rank == 2:
            if where == "before-anything":
                raise KeyError("boom")
            time.sleep(0.05)          # let the others block first
            raise KeyError("boom")
        if where == "recv":
            comm.recv((2,), np.float64, src=2)
        else:
            comm.all_reduce(np.zeros(2))
    with pytest.raises(KeyError, match="boom") as info:
        launch(fn, 4, timeout=20)
    assert info.value.simpar_rank == 2
    assert any("rank 2" in n for n in info.value.__notes__)


@pytest.mark.timeout(30)
def test_threads_others_see_world_aborted():
    seen = []

    def fn(comm):
        if comm.rank == 0:
            raise ValueError("bad")
        try:
            comm.barrier()
        except WorldAborted:
            seen.append(comm.rank)
            raise
    with pytest.raises(ValueError):
        launch(fn, 3, timeout=20)
    assert sorted(seen) == [1, 2]


@pytest.mark.timeout(30)
def test_threads_deadlock_is_named():
    def fn(comm):
        if comm.rank == 0:
            comm.recv((1,), np.float64, src=1)      # never sent
    with pytest.raises(DeadlockError, match=r"rank 0: recv from rank 1.*rank 1: finished"):
        launch(fn, 2, timeout=1.0)


# ------------------------------------------------------------ MPI job abort
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["run", "script"])
def test_mpi_failing_rank_aborts_job(mode):
    t0 = time.perf_counter()
    res = run_mpi(3, "tests/comm/scripts/one_rank_fails.py", mode, timeout=60)
    assert res.returncode != 0
    assert "rank 1 fails on purpose" in res.stderr
    assert time.perf_counter() - t0 < 60


@pytest.mark.mpi
@pytest.mark.parametrize("mode,needles", [
    ("all", ["ValueError: world size 3 != dp*tp*pp", "rank 0 of 3 failed (and ranks 1, 2 "
                                                    "with the same error)"]),
    ("one", ["RuntimeError: rank 1 fails on purpose", "rank 1 of 3 failed; aborting"]),
    ("two", ["KeyError: 'rank 1 fails'", "rank 2 also failed: IndexError: rank 2 fails"]),
    ("script", ["RuntimeError: rank 2 fails on purpose", "rank 2 of 3 failed; aborting"]),
])
def test_mpi_one_message_per_job(mode, needles):
    """The failing rank prints its traceback; the others stay quiet (or print
    one line when their error differs)."""
    t0 = time.perf_counter()
    res = run_mpi(3, "tests/comm/scripts/failures.py", mode, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert out.count("Traceback") == 1, out
    assert out.count("aborting the job") == 1, out
    for n in needles:
        assert n in out, (n, out)
    assert time.perf_counter() - t0 < 10


@pytest.mark.mpi
def test_mpi_shape_mismatch_caught_on_every_rank():
    res = run_mpi(3, "tests/comm/scripts/shape_mismatch.py", timeout=60)
    assert res.returncode == 0, res.stderr
    # ranks print concurrently, so lines may interleave: find each rank's report
    reports = re.findall(r"rank (\d) (ValueError|no error)", res.stdout)
    assert sorted(reports) == [(str(r), "ValueError") for r in range(3)], res.stdout
    assert "(3,)" in res.stdout and "(5,)" in res.stdout


# ------------------------------------------------------------ bad input
def _every_rank_raises(fn, size=3):
    """Run fn on every rank; return each rank's exception (all must raise)."""
    def wrapped(comm):
        try:
            fn(comm)
        except (ValueError, TypeError) as e:
            return e
        return None
    errs = launch(wrapped, size, timeout=20)
    assert all(e is not None for e in errs), errs
    return errs


@pytest.mark.timeout(30)
def test_shape_mismatch_caught_in_check_mode():
    errs = _every_rank_raises(lambda c: c.all_gather(np.zeros((2, 1 + c.rank))))
    assert all(isinstance(e, ValueError) and "disagree" in str(e) for e in errs)
    assert "(2, 1)" in str(errs[0]) and "(2, 3)" in str(errs[0])


@pytest.mark.timeout(30)
def test_collective_kind_mismatch_caught():
    def fn(c):
        if c.rank == 0:
            c.all_reduce(np.zeros(2))
        else:
            c.all_gather(np.zeros(2))
    errs = _every_rank_raises(fn, 2)
    assert "all_reduce" in str(errs[1]) and "all_gather" in str(errs[1])


@pytest.mark.timeout(30)
def test_recv_shape_mismatch_is_clear():
    def fn(c):
        if c.rank == 0:
            c.send(np.zeros((2, 3)), 1)
        else:
            with pytest.raises(ValueError, match=r"expected \(3, 2\).*sent \(2, 3\)"):
                c.recv((3, 2), np.float64, 0)
    launch(fn, 2, timeout=20)


@pytest.mark.parametrize("dtype", [np.int8, np.complex128, np.bool_, object])
def test_unsupported_dtype(dtype):
    errs = _every_rank_raises(lambda c: c.all_reduce(np.zeros(3, dtype=dtype)), 2)
    assert all(isinstance(e, TypeError) and str(np.dtype(dtype)) in str(e) for e in errs)


def test_unknown_reduce_op():
    errs = _every_rank_raises(lambda c: c.all_reduce(np.zeros(3), op="prod"), 2)
    assert all("'prod'" in str(e) for e in errs)


def test_bad_arguments():
    assert "dst=5" in str(_every_rank_raises(lambda c: c.send(np.zeros(1), 5), 2)[0])
    assert "root=-1" in str(_every_rank_raises(lambda c: c.broadcast(np.zeros(1), -1), 2)[0])
    e = _every_rank_raises(lambda c: c.reduce_scatter(np.zeros((5, 2))), 2)[0]
    assert "(5, 2)" in str(e) and "2" in str(e)
    e = _every_rank_raises(lambda c: c.all_to_all(np.zeros((3, 1)), [1, 1]), 2)[0]
    assert "sum to 2" in str(e)
    e = _every_rank_raises(lambda c: c.all_reduce(np.zeros(2), out=np.zeros(3)), 2)[0]
    assert "shape (2,)" in str(e)
    e = _every_rank_raises(lambda c: c.all_gather(np.zeros(2), axis=3), 2)[0]
    assert "axis 3" in str(e)


def test_unknown_backend():
    with pytest.raises(ValueError, match="'gloo'"):
        init("gloo")
    with pytest.raises(ValueError, match="'gloo'"):
        run(lambda c: None, 2, backend="gloo")


def test_world_size_must_match_config():
    errs = _every_rank_raises(lambda c: Mesh(c, ParallelConfig(dp=2, tp=2)), 3)
    assert all("world size 3" in str(e) and "dp*tp*pp" in str(e) for e in errs)


@pytest.mark.parametrize("kw,word", [({"tp": 0}, "tp=0"), ({"dp": 2, "ep": 3}, "ep=3"),
                                     ({"pp": 1.5}, "pp=1.5")])
def test_bad_parallel_config(kw, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        ParallelConfig(**kw)


def test_launch_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        launch(lambda c: None, 0)


# ------------------------------------------------------------ the grep rule
def test_no_pickle_based_mpi_call_on_a_hot_path():
    """Every mpi4py communicator call in the MPI backend is an upper-case buffer
    method, except lines marked '# pickle-ok: cold path'."""
    from simpar.comm import mpi as mpi_backend
    src = Path(mpi_backend.__file__).read_text().splitlines()
    calls = [(i, l) for i, l in enumerate(src, 1)
             if re.search(r"self\._(c|meta)\.[a-z]\w*\(", l) and "# pickle-ok: cold path" not in l]
    assert calls == []
    assert any("# pickle-ok" in l for l in src)      # the one cold path is marked
