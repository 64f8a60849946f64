"""Recompute modes and precisions side by side: step time and peak activation bytes.

    python benchmarks/memory.py            # GPT (2 layers, h = 512, s = 256, b = 4), 1 device
    python benchmarks/memory.py --quick    # tiny shapes, seconds, no targets

For each recompute mode (none / selective / full; float32) and each precision
(fp32 / bf16 / fp16 with a loss scale of 2^15; recompute none), one device runs
a full training step (forward, backward, optimizer: float32 AdamW, or float32
master weights + AdamW for 16-bit) and reports:

* **step** — best wall-clock ms over ``--reps`` steps, in rounds that visit every
  configuration in turn (a busy machine slows them alike), and the ratio to fp32
  with no recomputation;
* **peak act** — the memory ledger's activation peak during the step;
* **state** — parameters + gradients + optimizer bytes per parameter (16 for fp32
  AdamW: 4 + 4 + 8; 16 for mixed precision: 2 + 2 + 12);
* **HFU/MFU** — hardware over model FLOPs (recomputation adds to the first only).

Targets (issue 14): 16-bit step ≤ 1.5 × the float32 step.
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

FULL = dict(d_model=512, n_layer=2, seq=256, batch=4, reps=3, rounds=3)
QUICK = dict(d_model=32, n_layer=1, seq=16, batch=2, reps=1, rounds=1)
CONFIGS = [("fp32", "none"), ("fp32", "selective"), ("fp32", "full"),
           ("bf16", "none"), ("fp16", "none")]


class Run:
    """One configuration: a model, its optimizer, a tracer for the ledger."""

    def __init__(self, args, precision: str, recompute: str) -> None:
        from simpar import trace
        from simpar.mixed_precision import LossScaler, MixedPrecisionOptimizer
        from simpar.nn import GPT, GPTConfig
        from simpar.nn.precision import is_half, precision_dtype
        from simpar.optim import AdamW
        self.tracer = trace.Tracer(0)
        trace.activate(self.tracer)
        dt = precision_dtype(precision)
        cfg = GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.n_layer,
                        n_head=max(1, args.d_model // 64), d_model=args.d_model)
        self.model = GPT(cfg, seed=0, dtype=dt, recompute=recompute)
        params = self.model.parameters()
        self.n = sum(p.size for p in params.values())
        trace.alloc("params", sum(p.nbytes for p in params.values()))
        trace.alloc("grads", sum(p.nbytes for p in params.values()))
        self.half = is_half(dt)
        self.opt = (MixedPrecisionOptimizer(params, lr=1e-4, scaler=LossScaler(
            2.0 ** 15, dynamic=False)) if self.half else AdamW(params, lr=1e-4))
        trace.activate(None)
        rng = np.random.default_rng(0)
        self.x, self.y = rng.integers(0, 256, (2, args.batch, args.seq))
        self.best = float("inf")

    def step(self) -> None:
        from simpar import trace
        from simpar.nn import functional as F
        trace.activate(self.tracer)
        try:
            self.tracer.reset()
            self.tracer.memory.reset_peak()
            t0 = time.perf_counter()
            m = self.model
            m.zero_grad()
            _, cache = F.cross_entropy(m.forward(self.x), self.y)
            m.backward(F.cross_entropy_backward(cache, self.opt.loss_scale if self.half else 1))
            if self.half:
                self.opt.step(m.gradients())
            else:
                self.opt.step(m.gradients())
            self.best = min(self.best, time.perf_counter() - t0)
        finally:
            trace.activate(None)

    def report(self) -> dict:
        mem = self.tracer.memory
        state = sum(mem.current.get(k, 0) for k in ("params", "grads", "optimizer"))
        hw = sum(e.flops for e in self.tracer.events if e.category == "compute")
        model = 3 * self.model.flops(self.x.shape[0], self.x.shape[1])
        return {"step": self.best, "peak": mem.peak.get("activations", 0),
                "state_per_param": state / self.n, "hfu_over_mfu": hw / model}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds, no targets")
    args = ap.parse_args(argv)
    args = argparse.Namespace(**(QUICK if args.quick else FULL), quick=args.quick)
    runs = {c: Run(args, *c) for c in CONFIGS}
    for _ in range(args.rounds):
        for _ in range(args.reps):
            for r in runs.values():
                r.step()
    rep = {c: r.report() for c, r in runs.items()}
    base = rep[("fp32", "none")]["step"]
    print(f"GPT h={args.d_model} layers={args.n_layer} s={args.seq} b={args.batch}, 1 device")
    print(f"{'precision':>9} {'recompute':>9} | {'step ms':>8} {'/ fp32':>6} | "
          f"{'peak act':>11} | {'state B/param':>13} | {'HFU/MFU':>7}")
    for (p, mode), r in rep.items():
        print(f"{p:>9} {mode:>9} | {r['step'] * 1e3:8.1f} {r['step'] / base:6.2f} | "
              f"{r['peak']:>11,} | {r['state_per_param']:13.1f} | {r['hfu_over_mfu']:7.3f}")
    if not args.quick:
        for p in ("bf16", "fp16"):
            ratio = rep[(p, "none")]["step"] / base
            print(f"target {p} step <= 1.5 x fp32: {ratio:.2f} "
                  f"{'ok' if ratio <= 1.5 else 'MISSED'}")
    return rep


if __name__ == "__main__":
    main()
