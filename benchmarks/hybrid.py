"""Every 4-rank layout of one GPT: tokens/s on this machine beside the simulated A100 step.

    python benchmarks/hybrid.py             # runs mpiexec -n 4 itself
    python benchmarks/hybrid.py --quick     # tiny shapes, seconds, no targets
    mpiexec -n 4 python benchmarks/hybrid.py --worker

One float32 GPT (4 layers, h = 256, 4 heads, d_ff = 1024, vocab 64, seq 64) and one
global batch (16 sequences) are trained with :func:`~simpar.parallel.hybrid.build_model`
on every way of laying 4 ranks out as dp × tp × pp — dp4, tp4, pp4, dp2×tp2,
dp2×pp2, tp2×pp2 — and a few variants (sequence parallelism, the interleaved
schedule).  Pipelined layouts use 1F1B with m = 4 micro-batches; the others take
their slice of the batch in one micro-batch.  A step is forward, backward, every
gradient sum, global-norm clipping and AdamW.

For each layout, one table row:

* **this machine**: the best of ``--reps`` steps after a warm-up (the step lasting
  until its slowest rank ends it), as tokens/s.  One MPI process per rank and one
  BLAS thread each; with 4 ranks on a 2-core machine two ranks share a core, so the
  ideal against one device is the number of cores, not 4.  The first row is one
  device alone (rank 0, the others waiting), one step after each layout's, the best
  counting: a baseline measured over the whole run, whatever the machine's load did;
* **simulated A100** (DGX A100: NVLink inside a node): the step time and tokens/s of
  the same step on the simulated clock, deterministic;
* the busiest rank's compute time on the simulated clock (the rest of the step is
  communication and waiting) and the bytes the rank that sent most sent in the step
  (ring model for collectives).  At this size an A100 computes a block in well under
  a microsecond while every collective costs at least 2(p−1)α (α = 2 µs on NVLink),
  so on the simulated clock the layouts rank by how many collectives they issue,
  not by their FLOPs: that is why real runs keep tensor parallelism for wide layers.
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

VOCAB, WORLD = 64, 4
FULL = dict(d_model=256, n_layer=4, seq=64, batch=16, m=4, reps=3)
QUICK = dict(d_model=32, n_layer=4, seq=16, batch=16, m=4, reps=1)


def layouts():
    """``(label, ParallelConfig, build options)`` for every 4-rank layout."""
    from simpar.comm.mesh import ParallelConfig as P
    return [
        ("dp4", P(dp=4), {}),
        ("tp4", P(tp=4), {}),
        ("tp4 + SP", P(tp=4), {"sequence_parallel": True}),
        ("pp4", P(pp=4), {}),
        ("dp2 x tp2", P(dp=2, tp=2), {}),
        ("dp2 x tp2 + SP", P(dp=2, tp=2), {"sequence_parallel": True}),
        ("dp2 x pp2", P(dp=2, pp=2), {}),
        ("dp2 x pp2 interleaved vpp2", P(dp=2, pp=2, vpp=2), {"schedule": "interleaved"}),
        ("tp2 x pp2", P(tp=2, pp=2), {}),
    ]


def model_config(args):
    from simpar.nn import GPTConfig
    return GPTConfig(vocab_size=VOCAB, seq_len=args.seq, n_layer=args.n_layer, n_head=4,
                     d_model=args.d_model)


def sent_bytes(events) -> float:
    """Bytes this rank sent: ring model for collectives, the message for a send."""
    from simpar.parallel.tensor.accounting import ring_bytes
    total = 0.0
    for e in events:
        if e.category != "comm" or e.name in ("recv", "barrier", "broadcast"):
            continue
        total += e.nbytes if e.name == "send" else ring_bytes(e) if e.args.get("size") else 0
    return total


class Runner:
    """Training steps of ``layout`` on ``comm``: the best wall step (the slowest rank
    ending it) and the last step on the simulated clock."""

    def __init__(self, comm, cfg, layout, options, x, y, m) -> None:
        from simpar.comm.mesh import Mesh
        from simpar.nn import GPT
        from simpar.optim import AdamW
        from simpar.parallel.hybrid import build_model
        self.comm, self.x, self.y, self.m = comm, x, y, m
        self.model = build_model(GPT(cfg, seed=0, dtype=np.float32), Mesh(comm, layout),
                                 **options)
        self.opt = AdamW(self.model.parameters(), lr=1e-3)
        self.walls: list[float] = []

    def step(self, timed: bool = True) -> None:
        comm, model = self.comm, self.model
        comm.barrier()
        comm.tracer.reset()
        t0 = time.perf_counter()
        model.zero_grad()
        model.step(self.x, self.y, self.m)
        model.clip_grad_norm(1.0)
        self.opt.step(model.gradients())
        wall = comm.all_reduce(np.array([time.perf_counter() - t0]), op="max")[0]
        t = comm.tracer                                # this step's events only
        busy = sum(e.sim_end - e.sim_start for e in t.events if e.category == "compute")
        self.last = np.array([t.sim_now, sent_bytes(t.events), busy])
        if timed:
            self.walls.append(float(wall))

    def result(self) -> dict:
        stats = self.comm.all_reduce(self.last, op="max")   # the last step, busiest rank
        return {"seconds": min(self.walls), "sim": float(stats[0]), "bytes": float(stats[1]),
                "sim_compute": float(stats[2])}


def worker(args) -> None:
    from simpar import sim
    from simpar.comm import mpi
    from simpar.comm.mesh import ParallelConfig
    mpi.abort_on_exception()                           # one failing rank ends the job
    world = mpi.world(cluster=sim.preset("a100"))
    if world.size != WORLD:
        raise SystemExit(f"run with {WORLD} ranks (mpiexec -n {WORLD}), got {world.size}")
    load = os.getloadavg()[0]
    cfg = model_config(args)
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (args.batch, cfg.seq_len))
    y = np.roll(x, -1, axis=1)
    tokens = x.size
    solo = world.split(world.rank, 0, name="solo")
    one = Runner(solo, cfg, ParallelConfig(), {}, x, y, 1) if world.rank == 0 else None

    def one_device(timed=True):
        """A step of one device alone (rank 0; the others wait): after every layout,
        so that the baseline sees the machine's load over the whole run."""
        if one is not None:
            one.step(timed)
        world.barrier()

    one_device(timed=False)                            # warm-up
    rows = []
    for label, layout, options in layouts():
        m = args.m if layout.pp > 1 else 1
        run = Runner(world, cfg, layout, options, x, y, m)
        for rep in range(args.reps + 1):               # rep 0 warms up
            run.step(timed=rep > 0)
        rows.append((label, layout, m, run.result()))
        del run
        one_device()
    rows.insert(0, ("1 device", ParallelConfig(), 1, one.result() if one else None))
    if world.rank != 0:
        return
    psi = 12 * cfg.n_layer * cfg.d_model ** 2
    print(f"GPT float32: d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.n_layer} layers, "
          f"{cfg.n_head} heads, vocab {VOCAB}, seq {cfg.seq_len} (~{psi / 1e6:.1f}M block "
          f"parameters); global batch {args.batch} x {cfg.seq_len} = {tokens} tokens; "
          f"{WORLD} MPI processes on {os.cpu_count()} cores, 1 BLAS thread each; best of "
          f"{args.reps} steps (1 device: best of one step after each layout); load average "
          f"{load:.1f} at the start (1-minute)\n")
    head = (f"{'layout':<27} {'m':>2} | {'step ms':>8} {'tokens/s':>9} {'vs 1 dev':>8} | "
            f"{'A100 step µs':>12} {'compute µs':>10} {'A100 tokens/s':>13} | "
            f"{'KiB sent':>9}")
    print(f"{'':<30} {'this machine':^28}   {'simulated A100 cluster':^40}")
    print(head)
    print("-" * len(head))
    base = tokens / rows[0][3]["seconds"]
    for label, layout, m, r in rows:
        tps = tokens / r["seconds"]
        print(f"{label:<27} {m:>2} | {r['seconds'] * 1e3:>8.1f} {tps:>9.0f} {tps / base:>8.2f} | "
              f"{r['sim'] * 1e6:>12.1f} {r['sim_compute'] * 1e6:>10.1f} {tokens / r['sim']:>13.3g} | "
              f"{r['bytes'] / 1024:>9.0f}")
    print("\ncompute µs: the busiest rank's compute in the simulated step (the rest is "
          "communication and idle time); KiB sent: the rank that sent most (ring model)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one step (seconds)")
    ap.add_argument("--worker", action="store_true", help="run as an MPI rank")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, help="global batch (sequences)")
    ap.add_argument("--m", type=int, help="micro-batches of the pipelined layouts")
    ap.add_argument("--reps", type=int, help="timed steps per layout")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        worker(args)
        return
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [exe if os.path.exists(exe) else "mpiexec", "-n", str(WORLD), sys.executable,
           os.path.abspath(__file__), "--worker"] + [a for a in (argv if argv is not None
                                                                 else sys.argv[1:])]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
