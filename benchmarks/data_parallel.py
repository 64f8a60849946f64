"""Data parallelism on this machine, and overlap on the simulated clock.

    python benchmarks/data_parallel.py            # runs mpiexec -n 1 and -n 2 itself
    python benchmarks/data_parallel.py --quick    # tiny shapes, seconds, no targets
    mpiexec -n 2 python benchmarks/data_parallel.py --worker   # one measurement (JSON)

1. **Throughput, dp = 2 against dp = 1.**  A compute-bound float32 GPT (4 layers,
   h = 256, d_ff = 1024, 16 x 64 tokens per rank: the GEMMs dwarf the 2Ψ(p−1)/p
   bytes of the gradient all-reduce) trains with
   :func:`~simpar.parallel.hybrid.build_model` on ``ParallelConfig(dp=n)``: forward,
   backward, bucketed gradient sum over ``mesh.dp``, global-norm clipping and AdamW.
   Every rank keeps the same micro-batch, so dp = 2 processes twice the tokens of
   dp = 1 per step (weak scaling, the way data-parallel throughput is quoted).
   One MPI process per rank and one BLAS thread per process; ``mpiexec -n 1`` and
   ``mpiexec -n 2`` alternate for ``--rounds`` rounds, so a change in machine load
   hits both alike.  Each measurement is the best of ``--reps`` steps after a
   warm-up (the machine may be shared: the fastest step is the least disturbed),
   a step lasting until the slowest rank ends it.  Target on 2 cores: ≥ 1.8.
   Beside dp = 1 alone (``mpiexec -n 1``, the other core idle) the ``-n 2`` job also
   runs dp = 1 on both ranks at once, each alone (the faster copy counts), its steps
   interleaved with the dp = 2 steps: that baseline sees the same contention for memory bandwidth and for the cores (other
   tenants) as dp = 2, so the ratio against it isolates what data parallelism
   itself costs.  The 1-minute load average at the start is printed: on a shared
   machine, rerun when it is low.
2. **Overlap on the simulated A100 clock.**  The same dp = 2 model, one step per
   bucket size with overlap off and on: the all-reduce time, the step times and
   the fraction of the all-reduce hidden behind the backward pass,
   ``(step_off − step_on) / all-reduce time``.  With overlap on, a bucket's
   non-blocking all-reduce starts as soon as its last gradient is ready; only the
   buckets that outlast the rest of the backward stay exposed (the last one —
   ``wpe``, ``wte`` and the first block's LayerNorm — always does).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB = 64
FULL = dict(d_model=256, n_layer=4, seq=64, batch=16, reps=4, rounds=3,
            buckets=[64 << 10, 256 << 10, 1 << 20, 4 << 20])
QUICK = dict(d_model=32, n_layer=2, seq=16, batch=4, reps=2, rounds=1,
             buckets=[4 << 10, 1 << 20])


def model_config(args):
    from simpar.nn import GPTConfig
    return GPTConfig(vocab_size=VOCAB, seq_len=args.seq, n_layer=args.n_layer,
                     n_head=max(1, args.d_model // 64), d_model=args.d_model)


def make_model(comm, cfg, **options):
    from simpar.comm.mesh import Mesh, ParallelConfig
    from simpar.nn import GPT
    from simpar.parallel.hybrid import build_model
    ref = GPT(cfg, seed=0, dtype=np.float32)           # the same weights on every rank
    return build_model(ref, Mesh(comm, ParallelConfig(dp=comm.size)), **options)


def global_batch(cfg, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (rows, cfg.seq_len))
    return x, np.roll(x, -1, axis=1)


class Trainer:
    """dp = ``comm.size`` training steps of the benchmark model on ``comm``."""

    def __init__(self, comm, args) -> None:
        from simpar.optim import AdamW
        cfg = model_config(args)
        self.comm, self.model = comm, make_model(comm, cfg)
        self.opt = AdamW(self.model.parameters(), lr=1e-3)
        self.x, self.y = global_batch(cfg, args.batch * comm.size)
        self.times, self.comm_share = [], []

    def step(self, timed: bool = True) -> None:
        """One step; its time is the slowest rank's (a step ends when all ranks are done)."""
        comm, model = self.comm, self.model
        comm.barrier()
        comm.tracer.reset()
        t0 = time.perf_counter()
        model.zero_grad()
        model.step(self.x, self.y, 1)
        model.clip_grad_norm(1.0)
        self.opt.step(model.gradients())
        wall = float(comm.all_reduce(np.array([time.perf_counter() - t0]), op="max")[0])
        if timed:
            dp = [e for e in comm.tracer.events if e.group == "dp"]
            self.times.append(wall)
            self.comm_share.append(sum(e.wall_end - e.wall_start for e in dp) / wall)

    def result(self) -> dict:
        best = int(np.argmin(self.times))
        params = sum(g.size for g in self.model.gradients().values())
        return {"ranks": self.comm.size, "seconds": self.times[best], "all": self.times,
                "tokens": self.x.size, "tokens_per_s": self.x.size / self.times[best],
                "comm_share": self.comm_share[best], "params": params,
                "buckets": [b.n_buckets for b in self.model.buckets]}


def throughputs(comm, args) -> dict:
    """Best-of-reps dp = comm.size steps; with 2 ranks or more, interleaved step by step
    with dp = 1 on every rank at once (each alone: the same machine load for both)."""
    runs = {"dp": Trainer(comm, args)}
    if comm.size > 1:
        runs["busy"] = Trainer(comm.split(comm.rank, 0, name="solo"), args)
    for rep in range(args.reps + 1):                   # rep 0 warms up
        for run in (runs.values() if rep % 2 else reversed(runs.values())):
            run.step(timed=rep > 0)
            comm.barrier()
    out = {k: r.result() for k, r in runs.items()}
    if "busy" in out:
        out["busy"] = max(comm.gather_objects(out["busy"]), key=lambda d: d["tokens_per_s"])
    return out                                         # busy: the faster single-rank copy


def overlap_table(comm, args) -> list[dict]:
    """One step per (bucket size, overlap) on the simulated A100 clock."""
    cfg = model_config(args)
    x, y = global_batch(cfg, args.batch * comm.size)
    rows = []
    for bucket in args.buckets:
        row = {"bucket_bytes": bucket}
        for overlap in (False, True):
            model = make_model(comm, cfg, bucket_bytes=bucket, overlap=overlap)
            model.step(x, y, 1)                        # warm-up: allocations, caches
            model.zero_grad()
            comm.barrier()
            comm.tracer.reset()
            model.step(x, y, 1)
            t = comm.tracer
            ar = [e for e in t.events if e.name == "all_reduce" and e.group == "dp"]
            key = "on" if overlap else "off"
            row[f"step_{key}"] = t.sim_now
            row["all_reduce"] = sum(e.sim_end - e.sim_start for e in ar)
            row["calls"] = len(ar)
            row["bytes"] = sum(e.nbytes for e in ar)
            row["compute"] = sum(e.sim_end - e.sim_start for e in t.events
                                 if e.category == "compute")
            del model
        row["hidden"] = (row["step_off"] - row["step_on"]) / row["all_reduce"]
        rows.append(row)
    return rows


def worker(args) -> None:
    from simpar import sim
    from simpar.comm import mpi
    mpi.abort_on_exception()                           # one failing rank ends the job
    comm = mpi.world(cluster=sim.preset("a100"))
    runs = throughputs(comm, args)
    out = {"throughput": runs["dp"], "solo_busy": runs.get("busy")}
    if args.overlap and comm.size > 1:
        out["overlap"] = overlap_table(comm, args)
    if comm.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def mpiexec() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else "mpiexec"


def run_worker(n: int, args, overlap: bool) -> dict:
    cmd = [mpiexec(), "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker",
           "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--seq",
           str(args.seq), "--batch", str(args.batch), "--reps", str(args.reps),
           "--buckets", *map(str, args.buckets)] + (["--overlap"] if overlap else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"mpiexec -n {n} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def _us(t: float) -> str:
    return f"{t * 1e6:9.1f}"


def report(args) -> dict:
    from simpar import formulas
    cfg = model_config(args)
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"alone": [], "busy": [], "dp2": []}
    overlap = None
    for r in range(args.rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):     # alternate the order too
            out = run_worker(n, args, overlap=(n == 2 and overlap is None))
            if n == 1:
                runs["alone"].append(out["throughput"])
            else:
                runs["dp2"].append(out["throughput"])
                runs["busy"].append(out["solo_busy"])
            overlap = out.get("overlap", overlap)
    best = {k: max(rs, key=lambda d: d["tokens_per_s"]) for k, rs in runs.items()}
    one, two = best["alone"], best["dp2"]
    psi = one["params"]
    print(f"data-parallel GPT, float32: d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
          f"{cfg.n_layer} layers, vocab {VOCAB}, Ψ = {psi:,} parameters; {args.batch} x "
          f"{cfg.seq_len} tokens per rank; one MPI process and one BLAS thread per rank; "
          f"best of {args.reps} steps, {args.rounds} alternating round(s); load average "
          f"{load:.1f} at the start (1-minute)\n")
    names = {"alone": "dp1: mpiexec -n 1 (the other core idle)",
             "busy": "dp1: each of 2 ranks alone, at once",
             "dp2": "dp2: mpiexec -n 2"}
    print(f"{'run':<42} {'tokens/step':>11} {'step (s)':>9} {'tokens/s':>9} "
          f"{'all-reduce share (wall)':>24}")
    for k, b in best.items():
        print(f"{names[k]:<42} {b['tokens']:>11} {b['seconds']:>9.3f} {b['tokens_per_s']:>9.0f} "
              f"{b['comm_share']:>24.1%}")
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    busy = two["tokens_per_s"] / best["busy"]["tokens_per_s"]
    print(f"\ntokens/s dp2 / dp1 = {ratio:.2f} against dp1 alone (ideal 2; target >= 1.8); "
          f"{busy:.2f} against dp1 with both cores busy")
    short = {"alone": "dp1 alone", "busy": "dp1 both cores busy", "dp2": "dp2"}
    for k, rs in runs.items():
        print(f"  every round, {short[k]:<19} tokens/s: {[round(d['tokens_per_s']) for d in rs]}")
    rows = overlap or []
    if rows:
        print(f"\noverlap on the simulated A100 clock (dp = 2, NVLink; ring all-reduce "
              f"2Ψ(p−1)/p = {formulas.dp_comm_elements(psi, 2) * 4 / 2**20:.2f} MiB sent per rank)")
        print(f"{'bucket':>9} {'calls':>6} {'compute µs':>10} {'all-reduce µs':>13} "
              f"{'step off µs':>11} {'step on µs':>10} {'hidden':>7}")
        for row in rows:
            print(f"{row['bucket_bytes'] // 1024:>6} KiB {row['calls']:>6} "
                  f"{_us(row['compute']):>10} {_us(row['all_reduce']):>13} "
                  f"{_us(row['step_off']):>11} {_us(row['step_on']):>10} {row['hidden']:>7.1%}")
        print("hidden = (step off − step on) / all-reduce time")
    return {"ratio": ratio, "ratio_busy": busy, "best": best, "overlap": rows}


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (seconds)")
    ap.add_argument("--worker", action="store_true", help="run as an MPI rank")
    ap.add_argument("--overlap", action="store_true", help="worker: also the overlap table")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, help="sequences per rank")
    ap.add_argument("--reps", type=int, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, help="alternating dp1/dp2 rounds")
    ap.add_argument("--buckets", type=int, nargs="+", help="bucket sizes (bytes)")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        worker(args)
        return None
    return report(args)


if __name__ == "__main__":
    main()
