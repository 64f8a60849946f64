"""Pipeline parallelism on this machine: measured bubble and 1F1B throughput.

    python benchmarks/pipeline_parallel.py          # runs mpiexec -n 2 itself
    python benchmarks/pipeline_parallel.py --quick  # a tiny GPT, one step each: seconds
    mpiexec -n 2 python benchmarks/pipeline_parallel.py --worker

A float32 GPT with uniform stages (the last stage trades one block for the LM
head, whose vocabulary is sized so that head and loss take one block's time,
measured at the start) is cut into p = 2 stages, one MPI process and one BLAS
thread per stage.  For GPipe and 1F1B and several m it prints:

* the wall-clock bubble fraction, ``Σ idle / (p · step)`` with a rank's idle time
  the step time minus its compute actions, next to the formula (p−1)/(m+p−1)
  (Narayanan et al. 2021, §2.2.1);
* the tokens/s of 1F1B on 2 ranks divided by the tokens/s of the whole model on
  1 rank (both ranks run that single-device step at the same time, each on its own
  core, so both measurements see the same machine), next to the ideal
  ``p · m / (m + p − 1)``.

Each time is the best of ``--reps`` steps after a warm-up step (the machine may be
shared: the fastest step is the one least disturbed), its bubble that step's.
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


def time_balanced(comm, cfg, batch: int):
    """``cfg`` with the vocabulary scaled so that the LM head and its loss take a
    block's *time* (``uniform_config`` matches their FLOPs, but the softmax over
    the vocabulary is not a GEMM: measured here, the head took about 2 blocks'
    time, and the last stage set the pace).  Measured on rank 0, the same on all."""
    import dataclasses

    from simpar import trace
    from simpar.nn import GPT
    from simpar.nn import functional as F
    model = GPT(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.seq_len, cfg.d_model)).astype(np.float32)
    y = rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len))

    def block():
        model.blocks[0].backward(model.blocks[0].forward(x))

    def head():
        loss, cache = F.cross_entropy(model.head_forward(x), y)
        model.head_backward(F.cross_entropy_backward(cache))

    def best(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    with trace.untraced():
        scale = best(block) / best(head) if comm.rank == 0 else 0.0
    scale = float(comm.broadcast(np.array([scale]), 0)[0])
    return dataclasses.replace(cfg, vocab_size=max(2, round(cfg.vocab_size * scale)))


def worker(args) -> None:
    from simpar.comm import mpi
    from simpar.demos.pipeline_parallel import uniform_config
    from simpar.nn import GPT
    from simpar.parallel.pipeline import (PipelineStage, gather_records, make_schedule,
                                          partition, run_schedule, summarize)
    comm = mpi.world()
    p = comm.size
    cfg, sizes = uniform_config(p, k=args.layers_per_stage, h=args.d_model, d_ff=4 * args.d_model,
                                seq=args.seq, n_head=args.d_model // 32)
    cfg = time_balanced(comm, cfg, args.batch)
    solo = comm.split(comm.rank, 0, name="solo")
    rng = np.random.default_rng(0)

    def batches(m):
        xs = [rng.integers(0, cfg.vocab_size, (args.batch, cfg.seq_len)) for _ in range(m)]
        return xs, [x.copy() for x in xs]

    def step(c, name, m, xs, ys, whole=False):
        """One step on communicator c; returns (wall seconds, bubble fraction)."""
        sch = make_schedule(name, c.size, m)
        model = GPT(cfg, seed=0, dtype=np.float32)
        bounds = partition(model, sch.n_stages, [cfg.n_layer] if whole else sizes)
        stages = {s: PipelineStage(model, s, sch.n_stages, r) for s, r in enumerate(bounds)
                  if sch.rank_of(s) == c.rank}
        times = []
        for rep in range(args.reps + 1):
            c.barrier()
            c.tracer.reset()
            t0 = time.perf_counter()
            res = run_schedule(c, sch, stages, xs, ys)
            wall = time.perf_counter() - t0
            times.append(wall)
            recs = gather_records(c, res)
            frac = summarize(recs, "wall").bubble_fraction
            if rep:
                yield wall, frac

    if comm.rank == 0:
        print(f"GPT float32: d_model {cfg.d_model}, d_ff {cfg.d_ff}, seq {cfg.seq_len}, "
              f"{cfg.n_layer} layers + head (vocab {cfg.vocab_size}: head + loss take a block's time), micro-batch "
              f"{args.batch} x {cfg.seq_len} tokens; p = {p} ranks, 1 BLAS thread each\n")
        print(f"{'schedule':<8} {'m':>3} {'step (s)':>9} {'bubble (wall)':>14} "
              f"{'formula':>8}")
    for name in ("gpipe", "1f1b"):
        for m in args.m:
            xs, ys = batches(m)
            runs = list(step(comm, name, m, xs, ys))
            wall, frac = min(runs)
            if comm.rank == 0:
                print(f"{name:<8} {m:>3} {wall:>9.3f} {frac:>14.3f} {(p - 1) / (m + p - 1):>8.3f}",
                      flush=True)
    if comm.rank == 0:
        print(f"\n1F1B throughput, {p} ranks vs the whole model on 1 rank")
        print(f"{'m':>3} {'tokens/s p=' + str(p):>14} {'tokens/s p=1':>13} {'ratio':>7} "
              f"{'ideal p·m/(m+p−1)':>18}")
    for m in args.m:
        xs, ys = batches(m)
        tokens = m * args.batch * cfg.seq_len
        pipe, one = [], []
        for _ in range(args.reps):          # alternate, so both see the same machine load
            pipe += [w for w, _ in step(comm, "1f1b", m, xs, ys)][:1]
            one += [w for w, _ in step(solo, "1f1b", m, xs, ys, whole=True)][:1]
        tp, t1 = tokens / min(pipe), tokens / min(one)
        t1 = max(comm.gather_objects(t1))   # the faster single-rank copy: a conservative ratio
        if comm.rank == 0:
            print(f"{m:>3} {tp:>14.0f} {t1:>13.0f} {tp / t1:>7.2f} {p * m / (m + p - 1):>18.2f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="run as an MPI rank")
    ap.add_argument("-n", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers-per-stage", type=int, default=4)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny GPT (d_model 32, seq 8), m = 1, 2, one step: seconds, no targets")
    args = ap.parse_args()
    if args.quick:
        args.m, args.reps, args.d_model, args.seq, args.batch = [1, 2], 1, 32, 8, 1
        args.layers_per_stage = 2
    if args.worker:
        worker(args)
        return
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [exe if os.path.exists(exe) else "mpiexec", "-n", str(args.n), sys.executable,
           os.path.abspath(__file__), "--worker"] + sys.argv[1:]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
