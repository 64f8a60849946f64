"""The same checks under mpiexec: equivalence for every schedule, bad input without
a hang, and simulated times bit-identical to the threads backend."""
import pytest

from simpar import launch
from simpar.parallel.pipeline import gather_records, summarize
from tests.mpi_util import run_mpi
from tests.parallel.pipeline import checks


def _threads_simtimes(p):
    times = []
    for name, m, v in (("gpipe", 4, 1), ("1f1b", 6, 1), ("interleaved", 2 * p, 2),
                       ("zb-h1", 5, 1)):
        recs = launch(lambda c: gather_records(c, checks.run_uniform(c, name, m, v)), p,
                      cluster=checks.exact_cluster(), timeout=30)[0]
        s = summarize(recs)
        times.append(f"{name}:{s.makespan!r}:" + ",".join(repr(s.busy[r]) for r in range(p)))
    return times


@pytest.mark.mpi
@pytest.mark.timeout(150)
@pytest.mark.parametrize("p", [2, 3, 4])
def test_mpi(p):
    res = run_mpi(p, "tests/parallel/pipeline/scripts/run_checks.py", timeout=140)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for name, m, n_layer, split in checks.equivalence_cases(p):
        assert f"ok equivalence {name} p={p} m={m} n_layer={n_layer} {split}" in res.stdout, out
    for r in range(p):
        assert f"ok errors rank {r}" in res.stdout, out
    line = next(l for l in res.stdout.splitlines() if l.startswith("simtimes "))
    assert line.split()[1:] == _threads_simtimes(p)
