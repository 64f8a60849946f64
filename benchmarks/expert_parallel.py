"""Expert parallelism: simpar's all-to-all against raw mpi4py, and the MoE layer's
step time at ep = 2 against ep = 1, measured side by side in one MPI run.

    python benchmarks/expert_parallel.py             # runs mpiexec -n 2 itself
    python benchmarks/expert_parallel.py --quick     # tiny sizes, seconds (a smoke test)
    mpiexec -n 2 python benchmarks/expert_parallel.py --worker

1. **all-to-all** (float32, uneven counts like a router's): simpar's
   ``comm.all_to_all(x, send_counts)`` — argument checks, the count exchange,
   the simulated-clock arrival point and tracing included — against raw mpi4py
   ``Alltoall`` (counts) + ``Alltoallv`` (rows), and ``Alltoallv`` alone (counts
   known in advance).  Timed alternately, median of ``--reps`` calls, best of
   ``--rounds`` rounds, the slowest rank deciding.
2. **MoE layer step** (forward + backward, float32, h=512, d_ff=2048, 8
   experts, top-2, capacity factor 1.25, 1024 tokens per rank): ep = 1 (each
   rank holds all 8 experts and routes its own tokens to them) against ep = 2
   (4 experts per rank, tokens travel by all-to-all).  Both process the same
   tokens per rank, so the expert FLOPs per rank are the same when routing is
   balanced: expert parallelism saves parameter memory, and costs the
   all-to-alls (and any load imbalance between ranks).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SIZES = [16 << 10, 256 << 10, 1 << 20, 4 << 20]     # bytes each rank sends (float32 rows)
QUICK_SIZES = [16 << 10, 64 << 10]
ROW = 512                                            # floats per row (hidden size)
MOE = dict(h=512, d_ff=2048, n_experts=8, tokens=1024)
QUICK_MOE = dict(h=32, d_ff=64, n_experts=4, tokens=64)


def _slowest_median(fn, raw, reps: int) -> float:
    from mpi4py import MPI
    times = []
    for _ in range(reps):
        raw.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    out = np.empty(1)
    raw.Allreduce(np.array([np.median(times)]), out, op=MPI.MAX)
    return float(out[0])


def _uneven_counts(rows: int, p: int, rng) -> np.ndarray:
    """Rows to each rank, uneven as a router makes them (Dirichlet shares)."""
    share = rng.dirichlet(np.ones(p))
    counts = np.floor(share * rows).astype(np.int64)
    counts[0] += rows - counts.sum()
    return counts


def bench_all_to_all(comm, raw, reps: int, rounds: int, sizes=SIZES) -> list:
    p = raw.Get_size()
    rows_out = []
    for nbytes in sizes:
        rows = nbytes // (4 * ROW)
        rng = np.random.default_rng([nbytes, raw.Get_rank()])
        counts = _uneven_counts(rows, p, rng)
        x = rng.standard_normal((rows, ROW)).astype(np.float32)
        recv_counts = np.empty_like(counts)
        raw.Alltoall(counts, recv_counts)
        out = np.empty((int(recv_counts.sum()), ROW), np.float32)
        sd = np.concatenate([[0], np.cumsum(counts)[:-1]]) * ROW
        rd = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]) * ROW
        send_spec = [x, ((counts * ROW).astype(np.int32), sd.astype(np.int32))]
        recv_spec = [out, ((recv_counts * ROW).astype(np.int32), rd.astype(np.int32))]

        def raw_full():
            rc = np.empty_like(counts)
            raw.Alltoall(counts, rc)
            o = np.empty((int(rc.sum()), ROW), np.float32)
            r_d = np.concatenate([[0], np.cumsum(rc)[:-1]]) * ROW
            raw.Alltoallv(send_spec, [o, ((rc * ROW).astype(np.int32), r_d.astype(np.int32))])

        cases = {"raw_v": lambda: raw.Alltoallv(send_spec, recv_spec),
                 "raw_counts_v": raw_full,
                 "simpar": lambda: comm.all_to_all(x, counts)}
        for fn in cases.values():                       # warm up every path
            fn()
        best = {k: float("inf") for k in cases}
        for _ in range(rounds):
            for k, fn in cases.items():
                best[k] = min(best[k], _slowest_median(fn, raw, reps))
            comm.tracer.reset()
        got, _ = comm.all_to_all(x, counts)              # same rows as raw mpi4py?
        raw.Alltoallv(send_spec, recv_spec)
        assert np.array_equal(got, out)
        rows_out.append((nbytes, best["raw_v"], best["raw_counts_v"], best["simpar"]))
    return rows_out


def bench_moe_step(world, raw, reps: int, rounds: int, shape=MOE) -> dict:
    from simpar.nn.moe import MoE
    from simpar.parallel.expert import ExpertParallelMoE
    h, d_ff, n_experts, tokens = shape["h"], shape["d_ff"], shape["n_experts"], shape["tokens"]
    ref = MoE(h, n_experts, d_ff, k=2, capacity_factor=1.25, rng=0, dtype=np.float32)
    x = np.random.default_rng(1 + world.rank).standard_normal((tokens, h)).astype(np.float32)
    dy = np.random.default_rng(9 + world.rank).standard_normal((tokens, h)).astype(np.float32)
    layers = {1: ExpertParallelMoE.from_reference(ref, world.split(world.rank, 0, name="ep1")),
              2: ExpertParallelMoE.from_reference(ref, world.split(0, world.rank, name="ep2"))}

    def step(layer):
        layer.forward(x)
        layer.backward(dy)

    for layer in layers.values():
        step(layer)
    best = {ep: float("inf") for ep in layers}
    for _ in range(rounds):
        for ep, layer in layers.items():
            best[ep] = min(best[ep], _slowest_median(lambda: step(layer), raw, reps))
        world.tracer.reset()
    expert_bytes = {ep: sum(p.nbytes for n, p in layer.parameters().items()
                            if n.startswith("experts.")) for ep, layer in layers.items()}
    stats = layers[2].stats[0]
    return {"time": best, "expert_bytes": expert_bytes,
            "kept": stats.kept_per_expert.tolist(), "dropped": stats.dropped_fraction}


def worker(reps: int, rounds: int, quick: bool = False) -> None:
    from mpi4py import MPI

    from simpar.comm import mpi
    raw = MPI.COMM_WORLD
    comm = mpi.world()
    a2a = bench_all_to_all(comm, raw, reps, rounds, QUICK_SIZES if quick else SIZES)
    moe = bench_moe_step(comm, raw, max(1 if quick else 3, reps // 4), rounds,
                         QUICK_MOE if quick else MOE)
    if raw.Get_rank() == 0:
        print(f"ranks={raw.Get_size()} polite_wait={comm.polite}")
        for nbytes, a, b, c in a2a:
            print(f"A2A {nbytes} {a:.6e} {b:.6e} {c:.6e}")
        print(f"MOE {moe['time'][1]:.6e} {moe['time'][2]:.6e} {moe['expert_bytes'][1]} "
              f"{moe['expert_bytes'][2]} {moe['dropped']:.4f}")


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="run inside mpiexec")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="two small sizes, a tiny MoE layer, 2 calls: seconds, no targets")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.rounds = 2, 1
    if args.worker:
        worker(args.reps, args.rounds, args.quick)
        return
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    res = subprocess.run([mpiexec, "-n", str(args.ranks), sys.executable, __file__, "--worker",
                          "--reps", str(args.reps), "--rounds", str(args.rounds),
                          *(["--quick"] if args.quick else [])],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode:
        sys.exit(res.stdout + res.stderr)
    a2a, moe = [], None
    for line in res.stdout.splitlines():
        if line.startswith("ranks="):
            print(line)
        elif line.startswith("A2A"):
            _, nb, *ts = line.split()
            a2a.append((int(nb), *map(float, ts)))
        elif line.startswith("MOE"):
            moe = line.split()[1:]
    print(f"\n1. all-to-all, float32 rows of {ROW}, uneven counts; median of {args.reps} calls, "
          f"best of {args.rounds} rounds, slowest rank")
    print(f"{'sent/rank':>10} {'Alltoallv':>12} {'counts+v':>12} {'simpar':>12} "
          f"{'simpar/(counts+v)':>18} {'simpar/v':>9}")
    for nb, v, cv, s in a2a:
        print(f"{_fmt_size(nb):>10} {v * 1e6:>9.1f} µs {cv * 1e6:>9.1f} µs {s * 1e6:>9.1f} µs "
              f"{s / cv:>18.3f} {s / v:>9.3f}")
    t1, t2, b1, b2, dropped = float(moe[0]), float(moe[1]), int(moe[2]), int(moe[3]), float(moe[4])
    shape = QUICK_MOE if args.quick else MOE
    print(f"\n2. MoE layer forward + backward (float32, h={shape['h']}, d_ff={shape['d_ff']}, "
          f"{shape['n_experts']} experts, top-2, {shape['tokens']} tokens per rank, "
          f"{dropped:.1%} dropped at ep=2)")
    print(f"   ep=1: {t1 * 1e3:8.1f} ms per step, expert parameters {b1 / 2**20:6.1f} MiB per rank")
    print(f"   ep=2: {t2 * 1e3:8.1f} ms per step, expert parameters {b2 / 2**20:6.1f} MiB per rank")
    print(f"   step time ratio ep=2 / ep=1: {t2 / t1:.3f};  expert memory ratio: {b2 / b1:.3f}")


if __name__ == "__main__":
    main()
