"""ZeRO stages 0-3 side by side: step time, memory per rank, bytes per step.

    python benchmarks/zero.py            # float32 GPT (4 layers, h = 128), dp 2 and dp 4
    python benchmarks/zero.py --quick    # tiny shapes, seconds, no targets

For every stage (0 = plain data parallelism) and dp ∈ {2, 4}, one threads world
(one rank per thread, one BLAS thread each) trains the same model on the same
global batch with :class:`~simpar.parallel.zero.DistributedOptimizer` (AdamW,
global-norm clipping) and reports, per rank:

* **step** — wall-clock milliseconds of one whole step (best of ``--reps`` steps
  after a warm-up, the slowest rank ending a step, and best over ``--rounds``
  rounds that run the four stages in turn, so that a busy machine slows all of
  them alike) and the simulated A100 step;
* **state** — parameters + gradients + optimizer state held between steps, from the
  memory ledger, beside ZeRO §5's formula for this dtype (``p = g = 4`` bytes,
  ``K = 8`` for AdamW's two float32 moments): ``(8 + 8)Ψ``, ``8Ψ + 8Ψ/N``,
  ``4Ψ + 12Ψ/N``, ``16Ψ/N``;
* **peak** — the ledger's peak during the step (state + working gradients +
  gathered ZeRO-3 layers + activations);
* **sent** — bytes one rank sends over ``dp`` per step (ring model, from the tracer),
  over plain data parallelism's ``2Ψ(N−1)/N``: 1.0 for stages 0-2, 1.5 for stage 3
  (Rajbhandari et al. 2020 §7).

Then ZeRO's Table 1 (Ψ = 7.5e9, N = 64, mixed-precision Adam) from the same
formula, for comparison: 120 GB → 31.4 → 16.6 → 1.88 GB.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB = 64
FULL = dict(d_model=128, n_layer=4, seq=64, batch=16, reps=3, rounds=3, dps=(2, 4))
QUICK = dict(d_model=32, n_layer=2, seq=16, batch=8, reps=1, rounds=1, dps=(2, 4))


def one_world(comm, args, stage: int) -> dict:
    from simpar import formulas
    from simpar.comm.mesh import Mesh, ParallelConfig
    from simpar.nn import GPT, GPTConfig
    from simpar.parallel.hybrid import build_model
    from simpar.parallel.tensor.accounting import ring_bytes
    from simpar.parallel.zero import DistributedOptimizer
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=args.seq, n_layer=args.n_layer,
                    n_head=max(1, args.d_model // 32), d_model=args.d_model)
    model = build_model(GPT(cfg, seed=0, dtype=np.float32),
                        Mesh(comm, ParallelConfig(dp=comm.size)))
    opt = DistributedOptimizer(model, stage, lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (args.batch, args.seq))
    y = np.roll(x, -1, axis=1)
    ledger, tracer = comm.tracer.memory, comm.tracer
    best, sim, sent = float("inf"), 0.0, 0.0
    for rep in range(args.reps + 1):                 # the first is a warm-up
        comm.barrier()
        tracer.reset()
        ledger.reset_peak()
        t0 = time.perf_counter()
        model.zero_grad()
        model.step(x, y, 1)
        opt.clip_grad_norm(1.0)
        opt.step()
        comm.barrier()
        dt = float(comm.all_reduce(np.array([time.perf_counter() - t0]), op="max")[0])
        if rep:
            best = min(best, dt)
        sim = tracer.sim_now
        sent = sum(ring_bytes(e) for e in tracer.events if e.category == "comm"
                   and e.group == "dp")
    psi = sum(p.size for p in model.parameters().values())
    state = sum(ledger.current.get(k, 0) for k in ("params", "grads", "optimizer"))
    return {"step_ms": best * 1e3, "sim_ms": sim * 1e3, "psi": psi, "state": state,
            "formula": formulas.zero_memory_bytes(psi, comm.size, stage, k=8, param_bytes=4,
                                                  grad_bytes=4),
            "peak": ledger.peak_total, "sent": sent,
            "dp_bytes": 4 * formulas.dp_comm_elements(psi, comm.size)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds, no targets")
    ap.add_argument("--reps", type=int, default=None, help="measured steps per run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over the four stages")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    import simpar
    from simpar import formulas
    MB = 1 << 20
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average {load:.1f} on {os.cpu_count()} cores (wall times are only "
          f"comparable when it is low; memory and bytes do not depend on it)")
    print(f"ZeRO stages side by side (threads backend, float32 GPT h={args.d_model}, "
          f"{args.n_layer} layers, global batch {args.batch} x {args.seq}; "
          f"memory and bytes per rank)")
    head = (f"{'dp':>3} {'stage':>5} | {'step ms':>8} {'x st0':>6} {'sim A100 ms':>11} | "
            f"{'state MB':>8} {'formula':>8} {'x st0':>6} | {'peak MB':>8} | "
            f"{'sent MB':>8} {'/ DP':>5}")
    print(head)
    print("-" * len(head))
    for dp in args.dps:
        best = {}
        for _ in range(args.rounds):
            for stage in (0, 1, 2, 3):
                r = simpar.launch(lambda c: one_world(c, args, stage), dp, timeout=600)[0]
                if stage not in best or r["step_ms"] < best[stage]["step_ms"]:
                    best[stage] = r
        base = best[0]
        for stage in (0, 1, 2, 3):
            r = best[stage]
            assert r["state"] == r["formula"], (stage, dp, r)
            print(f"{dp:>3} {stage:>5} | {r['step_ms']:8.1f} {r['step_ms'] / base['step_ms']:6.2f} "
                  f"{r['sim_ms']:11.3f} | {r['state'] / MB:8.3f} {r['formula'] / MB:8.3f} "
                  f"{r['state'] / base['state']:6.3f} | {r['peak'] / MB:8.3f} | "
                  f"{r['sent'] / MB:8.3f} {r['sent'] / r['dp_bytes']:5.2f}", flush=True)
    psi, n = 7.5e9, 64
    print("\nZeRO Table 1 (Rajbhandari et al. 2020), Ψ = 7.5e9, N = 64, mixed-precision "
          "Adam (K = 12), from simpar.formulas:")
    print("  " + "  ".join(f"stage {s}: {formulas.zero_memory_bytes(psi, n, s) / 1e9:6.2f} GB"
                           for s in (0, 1, 2, 3)))
    print("  paper: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB")


if __name__ == "__main__":
    main()
