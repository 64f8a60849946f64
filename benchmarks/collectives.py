"""simpar's collectives against the raw mpi4py buffer calls, measured in one run.

    python benchmarks/collectives.py            # runs mpiexec -n 2 and -n 4 itself
    python benchmarks/collectives.py --quick    # 2 ranks, 2 small sizes, seconds (a smoke test)
    mpiexec -n 4 python benchmarks/collectives.py --worker

For all-reduce, all-gather, reduce-scatter, broadcast and the uneven all-to-all, at
1 KiB - 8 MiB (float32; the size is the full buffer: all-reduce's array,
all-gather's output, reduce-scatter's input, the broadcast array, the rows one rank
sends), raw mpi4py and simpar take turns, 8 back-to-back calls a turn, and the
median time per call is compared; both write into preallocated outputs (simpar's
``out=``; the all-to-all, whose size only the counts tell, returns a fresh array).
simpar's call includes everything a user gets:
argument checks, the arrival exchange (simulated clock, agreement check, the NaN
flag — and the whole message when it is at most ``INLINE_BYTES``), tracing, and
polite waiting when ranks outnumber cores.  The raw all-to-all exchanges its counts
first (``Alltoall``), as any uneven all-to-all must.  With more ranks than cores
the table is printed with polite waiting on and off (``SIMPAR_POLITE``).

Targets (issue "collectives at the speed of raw MPI"), 2 ranks: ratio <= 1.10 at
16 KiB and <= 1.05 from 256 KiB for the four collectives, at most 5 µs added at
1 KiB, all-to-all <= 1.10 at 1 MiB; 4 ranks on 2 cores: <= 1.5 at every size, with
the working ranks >= 1.6x faster while others wait in simpar than in raw ``Recv``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20]
QUICK_SIZES = [1 << 10, 64 << 10]


def _interleaved_medians(cases: dict, comm, reps: int, burst: int = 1) -> dict:
    """Median time per call of every case, the cases taking turns (so drift and
    other load hit all of them alike).  Each turn starts after a barrier and
    makes ``burst`` calls back to back; the slowest rank's median counts."""
    from mpi4py import MPI
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            times[k].append((time.perf_counter() - t0) / burst)
    local = np.array([np.median(times[k]) for k in cases])
    out = np.empty_like(local)
    comm.Allreduce(local, out, op=MPI.MAX)
    return dict(zip(cases, out))


KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def cases_for(kind: str, nbytes: int, raw, comm) -> dict:
    """The raw mpi4py call and simpar's for one collective on a buffer of ``nbytes``
    (the full buffer: all-reduce's array, all-gather's output, reduce-scatter's
    input, the broadcast array, the rows one rank sends in an all-to-all)."""
    from mpi4py import MPI
    p = raw.Get_size()
    n = max(nbytes // 4 // p * p, p)                 # float32 elements, divisible by p
    x = np.ones(n, np.float32)
    if kind == "all_reduce":
        out = np.empty_like(x)
        return {"raw": lambda: raw.Allreduce(x, out), "simpar": lambda: comm.all_reduce(x, out=out)}
    if kind == "all_gather":
        part, out = x[:n // p].copy(), np.empty_like(x)
        return {"raw": lambda: raw.Allgather(part, out),
                "simpar": lambda: comm.all_gather(part, out=out)}
    if kind == "reduce_scatter":
        out = np.empty(n // p, np.float32)
        return {"raw": lambda: raw.Reduce_scatter_block(x, out, op=MPI.SUM),
                "simpar": lambda: comm.reduce_scatter(x, out=out)}
    if kind == "broadcast":                          # in place on every rank, as MPI_Bcast
        return {"raw": lambda: raw.Bcast(x, root=0), "simpar": lambda: comm.broadcast(x, 0, out=x)}
    counts = np.full(p, n // p, np.int64)            # an even split, sent as uneven rows
    rcounts, out = np.empty_like(counts), np.empty_like(x)
    displ = (np.arange(p) * (n // p)).astype(np.int32)
    spec = [(counts.astype(np.int32), displ)]

    def raw_a2a():                                   # counts first, as any uneven exchange
        raw.Alltoall(counts, rcounts)
        raw.Alltoallv([x, *spec], [out, (rcounts.astype(np.int32), displ)])
    return {"raw": raw_a2a, "simpar": lambda: comm.all_to_all(x, counts)}


def worker(reps: int, sizes=SIZES, kinds=KINDS) -> None:
    """Every collective at every size: the median time per call of raw mpi4py and
    simpar, taking turns in bursts of 8 back-to-back calls."""
    from mpi4py import MPI

    from simpar.comm import mpi
    raw = MPI.COMM_WORLD
    comm = mpi.world()
    for kind in kinds:
        for nbytes in sizes:
            cases = cases_for(kind, nbytes, raw, comm)
            for fn in cases.values():                # warm up every path
                fn()
            med = _interleaved_medians(cases, raw, reps, burst=8)
            comm.tracer.reset()
            if raw.Get_rank() == 0:
                print(f"ROW {raw.Get_size()} {kind} {nbytes} {med['raw']:.6e} "
                      f"{med['simpar']:.6e}", flush=True)
    if raw.Get_rank() == 0:
        print(f"ranks={raw.Get_size()} polite_wait={comm.polite}")


def polite_worker(size: int = 384, iters: int = 40) -> None:
    """Half the ranks multiply matrices while the other half wait for a message
    that comes only when the work is done: raw blocking ``Recv`` (busy-polls)
    against simpar's ``recv`` (polite wait).  Reports the workers' matmul time."""
    from mpi4py import MPI

    from simpar.comm import mpi
    raw = MPI.COMM_WORLD
    comm = mpi.world()
    p, r = raw.Get_size(), raw.Get_rank()
    half = p // 2
    a = np.random.default_rng(r).standard_normal((size, size))
    token = np.zeros(1)

    def work() -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ a
        return time.perf_counter() - t0

    out = {}
    for mode in ("raw Recv", "simpar recv") * 5:                # alternating; best of 5 each
        raw.Barrier()
        if r < half:                                 # worker: compute, then release a waiter
            t = work()
            if mode == "raw Recv":
                raw.Send(token, dest=r + half, tag=1)
            else:
                comm.send(token, r + half, tag=1)
        else:                                        # waiter
            t = 0.0
            if mode == "raw Recv":
                raw.Recv(token, source=r - half, tag=1)
            else:
                comm.recv((1,), np.float64, r - half, tag=1)
        worst = np.empty(1)
        raw.Allreduce(np.array([t]), worst, op=MPI.MAX)
        out[mode] = min(out.get(mode, np.inf), float(worst[0]))
    comm.barrier()
    if r == 0:
        print(f"POLITE {p} {comm.polite} {out['raw Recv']:.6e} {out['simpar recv']:.6e}", flush=True)


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="run inside mpiexec")
    ap.add_argument("--polite-worker", action="store_true", help="run inside mpiexec")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--quick", action="store_true",
                    help="2 ranks, two small sizes, 3 calls each: seconds, no targets")
    args = ap.parse_args()
    if args.quick:
        args.ranks, args.reps = [2], 3
    if args.worker:
        worker(args.reps, QUICK_SIZES if args.quick else SIZES)
        return
    if args.polite_worker:
        polite_worker(*((64, 4) if args.quick else ()))
        return
    quick = ["--quick"] if args.quick else []
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")

    def job(n: int, *flags: str, env: dict | None = None) -> str:
        res = subprocess.run([mpiexec, "-n", str(n), sys.executable, __file__, *flags, *quick],
                             capture_output=True, text=True, timeout=1800,
                             env={**os.environ, **(env or {})})
        if res.returncode:
            sys.exit(res.stdout + res.stderr)
        return res.stdout

    rows = {}                                        # (ranks, polite) -> [(kind, bytes, raw, simpar)]
    for n in args.ranks:
        for polite in ((None,) if n <= (os.cpu_count() or 1) else ("1", "0")):
            out = job(n, "--worker", "--reps", str(args.reps),
                      env=None if polite is None else {"SIMPAR_POLITE": polite})
            rows[n, polite] = [(k, int(b), float(r), float(q)) for _, _, k, b, r, q in
                               (line.split() for line in out.splitlines()
                                if line.startswith("ROW"))]
    polite = job(2 if args.quick else 4, "--polite-worker")
    report(rows, polite, args.reps, args.quick)


def _target(p: int, kind: str, nbytes: int) -> float | None:
    """The ratio simpar / raw that issue-level targets ask for (None: no target)."""
    if p > (os.cpu_count() or 1):
        return 1.5
    if kind == "all_to_all":
        return 1.10 if nbytes == 1 << 20 else None
    return 1.10 if nbytes == 16 << 10 else 1.05 if nbytes >= 256 << 10 else None


def report(rows: dict, polite_out: str, reps: int, quick: bool) -> None:
    print(f"\nsimpar collectives / raw mpi4py buffer calls (float32), median of {reps} turns of "
          "8 back-to-back calls, the cases taking turns")
    print("added = simpar - raw per call; the 1 KiB target is added <= 5 µs (2 ranks)")
    for (p, polite), table in rows.items():
        mode = "" if polite is None else f", polite waiting {'on' if polite == '1' else 'off'}"
        print(f"\n{p} ranks on {os.cpu_count()} cores{mode}")
        print(f"{'collective':>15} {'size':>7} {'mpi4py':>10} {'simpar':>10} {'ratio':>6} "
              f"{'added':>9}")
        for kind, nb, raw, ours in table:
            tgt = None if quick else _target(p, kind, nb)
            flag = "" if tgt is None else f"  (target {tgt:.2f}{'' if ours / raw <= tgt else ': missed'})"
            print(f"{kind:>15} {_fmt_size(nb):>7} {raw * 1e6:>7.1f} µs {ours * 1e6:>7.1f} µs "
                  f"{ours / raw:>6.2f} {(ours - raw) * 1e6:>6.1f} µs{flag}")
    for line in polite_out.splitlines():
        if line.startswith("POLITE"):
            _, p, on, t_raw, t_simpar = line.split()
            print(f"\nwaiting politely ({p} ranks on {os.cpu_count()} cores; polite mode {on}): "
                  f"{int(p) // 2} ranks multiply matrices while {int(p) - int(p) // 2} "
                  f"wait for a message")
            print(f"  workers' time while the others wait in raw MPI Recv:   {float(t_raw):.3f} s")
            print(f"  workers' time while the others wait in simpar recv:    {float(t_simpar):.3f} s"
                  f"  ({float(t_raw) / float(t_simpar):.2f}x faster; target >= 1.6)")


if __name__ == "__main__":
    main()
