"""ZeRO memory and communication per stage: ``python -m simpar zero``.

Builds a small float64 GPT on ``dp`` ∈ {1, 2, 4, 8} threads worlds, runs one
training step under each ZeRO stage (:class:`~simpar.parallel.zero.DistributedOptimizer`,
AdamW) and prints, per rank, the parameter + gradient + optimizer bytes of the
memory ledger beside ZeRO §5's formula (8-byte elements: ``p = g = 8``,
``K = 16``) and the bytes sent over ``dp`` beside §7's ``2Ψ(N−1)/N`` (stage 3:
1.5×).  Writes ``zero_memory.png`` (the shape of ZeRO's Table 1, with the
paper's 7.5B example beside it) into ``--out``.  The numbers come from the
ledger and the tracer's byte counts only, so the figure is the same every run.
Each ``dp`` runs in a threads world of its own size (so there is no
``--world-size``; under ``mpiexec`` with several processes it refuses to run).
"""
from __future__ import annotations

import os

from ..experiments import zero_step_bytes
from .common import demo_parser, threads_only

DPS = (1, 2, 4, 8)


def parser():
    return demo_parser("zero", __doc__, cluster=None, world=False)


def main(argv=None) -> list[dict]:
    import simpar
    from .. import formulas, viz
    args = parser().parse_args(argv)
    threads_only("zero")
    rows = []
    print(f"{'stage':>5} {'dp':>3} | {'ledger B/rank':>13} {'formula':>9} | "
          f"{'sent B/rank':>11} {'/ DP':>5}")
    for stage in (0, 1, 2, 3):
        for dp in DPS:
            r = simpar.launch(lambda c: zero_step_bytes(c, stage), dp)[0]
            rows.append(r)
            ratio = r["sent"] / r["dp_sent"] if r["dp_sent"] else float("nan")
            print(f"{stage:>5} {dp:>3} | {r['ledger']:>13,} {r['formula']:>9,.0f} | "
                  f"{r['sent']:>11,.0f} {ratio:>5.2f}")
    psi, n = 7.5e9, 64
    example = {"psi": psi, "n": n, "paper": {0: 120, 1: 31.4, 2: 16.6, 3: 1.88},
               "gb": {s: formulas.zero_memory_bytes(psi, n, s) / 1e9 for s in (0, 1, 2, 3)}}
    print(f"Ψ = {rows[0]['psi']:,} parameters; ZeRO Table 1 (7.5B, N = 64): " +
          ", ".join(f"{example['gb'][s]:.3g} GB" for s in (0, 1, 2, 3)) +
          " (paper: 120, 31.4, 16.6, 1.88 GB)")
    path = viz.save(viz.zero_memory(rows, example), os.path.join(args.out, "zero_memory.png"))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
