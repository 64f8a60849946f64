"""Where activation memory goes, and what recomputation and 16 bits do to it:
``python -m simpar memory``.

1. **Recomputation** (Korthikanti et al. 2022, Table 2, §5): one transformer layer
   cut over ``t`` ∈ {1, 2, 4, 8} threads ranks, with and without sequence
   parallelism, recompute none / selective / full; the memory ledger's saved
   bytes after the forward beside simpar's formula
   (:func:`simpar.parallel.tensor.activation_elements`), and the paper's rows for
   a GPT-3 175B layer → ``activation_memory.png``.
2. **Mixed precision** (Micikevicius et al. 2018): ``--steps`` steps (default 200)
   of a small GPT on the shipped corpus in float32, bfloat16, float16 with
   dynamic loss scaling and float16 without it; final losses, bytes per
   parameter (2 + 2 + 12 = 16 with float32 masters and Adam state), and the
   fraction of gradients below float16's normal range → ``mixed_precision_loss.png``.

Every number comes from the ledger or from seeded threads runs, so the figures
are the same every run.  Each part runs in threads worlds of its own sizes (so
there is no ``--world-size``; under ``mpiexec`` with several processes it refuses
to run).
"""
from __future__ import annotations

import os

import numpy as np

from ..experiments import recompute_rows
from .common import demo_parser, threads_only

B, S, H, A = 2, 16, 32, 8            # the demo layer: h and a divisible by t = 8
MODEL = dict(seq_len=32, n_layer=2, n_head=2, d_model=32)


def print_recompute(rows: list[dict]) -> None:
    print(f"activation bytes per layer per device (b={B} s={S} h={H} a={A}, float64): "
          "ledger / formula")
    print(f"{'t':>3} {'SP':>3} | {'none':>15} {'selective':>15} {'full':>13}")
    for i in range(0, len(rows), 3):
        r = rows[i]
        print(f"{r['t']:>3} {'yes' if r['sp'] else 'no':>3} | " +
              " ".join(f"{c['ledger']:>6} / {c['formula']:<6}" for c in rows[i:i + 3]))


def precision_runs(steps: int) -> dict:
    import simpar
    from ..comm.mesh import ParallelConfig
    from ..train import train
    runs = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
            "fp16, loss scaling": {"precision": "fp16"},
            "fp16, no loss scaling": {"precision": "fp16", "loss_scaling": False}}
    out = {}
    for label, kw in runs.items():
        def job(comm, kw=kw):
            r = train(comm, ParallelConfig(), steps=steps, model=MODEL, log_every=0, **kw)
            n = sum(p.size for p in r["model"].parameters().values())
            m = comm.tracer.memory.current
            state = sum(m.get(k, 0) for k in ("params", "grads", "optimizer")) / n
            return {k: r[k] for k in ("loss", "zero_grads", "skipped", "loss_scale")} | \
                {"bytes_per_param": state}
        out[label] = simpar.launch(job, 1)[0]
        r = out[label]
        below = np.mean([z + s for z, s in r["zero_grads"]])
        print(f"{label:22s} loss (mean of the last 10 steps) {np.mean(r['loss'][-10:]):.4f} | "
              f"{r['bytes_per_param']:.0f} bytes/param | gradients below the normal range "
              f"{below:6.2%} | skipped {r['skipped']} | loss scale {r['loss_scale']:g}",
              flush=True)
    return out


def parser():
    ap = demo_parser("memory", __doc__, cluster=None, world=False)
    ap.add_argument("--steps", type=int, default=200, help="training steps per precision")
    return ap


def main(argv=None) -> dict:
    from .. import testing, viz
    args = parser().parse_args(argv)
    threads_only("memory")
    rows = recompute_rows(B, S, H, A)
    print_recompute(rows)
    if any(r["ledger"] != r["formula"] for r in rows):
        raise SystemExit("error: the ledger differs from the formula")
    path = viz.save(viz.activation_memory(rows, B, S, H, A),
                    os.path.join(args.out, "activation_memory.png"))
    print(f"wrote {path}")
    runs = precision_runs(args.steps)
    ref = np.mean(runs["fp32"]["loss"][-10:])
    worst = testing.worst([testing.rel_error(np.mean(r["loss"][-10:]), ref)
                           for k, r in runs.items() if k != "fp16, no loss scaling"])
    path = viz.save(viz.mixed_precision_loss(
        {k: r["loss"] for k, r in runs.items()},
        {k: [z + s for z, s in r["zero_grads"]] for k, r in runs.items()},
        f"{args.steps} steps, small GPT: bf16 and fp16 (loss scaling) within "
        f"{worst:.2%} of fp32"), os.path.join(args.out, "mixed_precision_loss.png"))
    print(f"wrote {path}")
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
