"""Every pipeline check under mpiexec, in one launch per world size:

    mpiexec -n 3 python tests/parallel/pipeline/scripts/run_checks.py

Prints ``ok <check>`` lines and, last, the simulated step times of a few uniform
runs (compared bit for bit with the threads backend by the pytest caller)."""
from simpar.comm import mpi
from simpar.parallel.pipeline import gather_records, summarize
from tests.parallel.pipeline import checks

comm = mpi.world(cluster=checks.exact_cluster())
mpi.abort_on_exception()
p = comm.size
for name, m, n_layer, split in checks.equivalence_cases(p):
    err = checks.check_equivalence(comm, name, m, n_layer, split)
    if comm.rank == 0:
        print(f"ok equivalence {name} p={p} m={m} n_layer={n_layer} {split} {err:.1e}",
              flush=True)
msgs = checks.check_errors(comm)
print(f"ok errors rank {comm.rank} {len(msgs)}", flush=True)
times = []
for name, m, v in (("gpipe", 4, 1), ("1f1b", 6, 1), ("interleaved", 2 * p, 2), ("zb-h1", 5, 1)):
    recs = gather_records(comm, checks.run_uniform(comm, name, m, v))
    s = summarize(recs)
    times.append(f"{name}:{s.makespan!r}:" + ",".join(repr(s.busy[r]) for r in range(p)))
if comm.rank == 0:
    print("simtimes " + " ".join(times), flush=True)
