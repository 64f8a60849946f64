"""Context parallelism on the simulated clock: ``python -m simpar context``.

1. **Ring attention, overlap and load balance** (Liu et al. 2023, §3; Megatron-core's
   load-balanced chunks).  ``cp`` = 4 ranks (threads) run one ring-attention layer
   forward and backward on a float32 sequence of 16 384 tokens (one 128-wide
   head: the compute-to-transfer ratio of a block does not depend on the width)
   on the ``--cluster`` preset (default A100): each K/V transfer of ``2·(s/cp)·h`` floats travels while a
   block of ``(s/2cp)²`` scores is computed, and stays hidden.  The same layer
   with the naive contiguous split shows the causal imbalance: rank 0 has almost
   nothing to do and idles, rank 3 computes ``1 + 2(cp−1)n/(n+1)`` times as many
   tiles.  Writes ``cp_ring_overlap.png``.
2. **Ring against Ulysses** (Jacobs et al. 2023).  The closed forms of
   :mod:`simpar.formulas` (tested equal to the simulated clock of both layers) give
   one attention layer's forward + backward for ``h`` = 4096 (32 heads), 16-bit,
   against sequence length and ``cp`` on the chosen preset (A100: NVLink inside a
   node of 8, InfiniBand HDR across).  Writes ``cp_ring_vs_ulysses.png``.

Both figures come from the simulated clock, the tracer's FLOPs and the formulas
only: the same bytes every run.  The demo runs its own 4-rank threads world (so
there is no ``--world-size``; under ``mpiexec`` with several processes it refuses
to run).
"""
from __future__ import annotations

import os

from ..experiments import ring_attention_step, ring_vs_ulysses_rows
from .common import demo_parser, threads_only

CP, SEQ, WIDTH, TILE = 4, 16384, 128, 256


def parser():
    return demo_parser("context", __doc__, world=False)


def main(argv=None) -> dict:
    import simpar
    from .. import formulas, sim, viz
    from ..parallel.context import ring_overlap
    args = parser().parse_args(argv)
    threads_only("context")
    cluster = sim.preset(args.cluster)
    runs = {b: simpar.launch(lambda c: ring_attention_step(c, b, SEQ, WIDTH, TILE), CP,
                            cluster=cluster)
            for b in (True, False)}
    tiles = {"balanced": {r: t for r, (_, t) in enumerate(runs[True])},
             "naive": {r: t for r, (_, t) in enumerate(runs[False])}}
    tiles["balanced_formula"] = {r: formulas.ring_attention_tiles(SEQ, CP, r, TILE, True)
                                 for r in range(CP)}
    tiles["naive_formula"] = {r: formulas.ring_attention_tiles(SEQ, CP, r, TILE, False)
                              for r in range(CP)}
    print(f"ring attention, cp = {CP}, s = {SEQ}, one {WIDTH}-wide head, float32, tiles "
          f"{TILE}x{TILE}, {cluster.name} ({cluster.intra.name}) — simulated clock")
    print(f"{'rank':>4} | {'tiles naive':>11} {'balanced':>9} | {'step naive µs':>13} "
          f"{'balanced':>9} | {'K/V msgs':>8} {'hidden':>7}")
    summary = {}
    for r in range(CP):
        ev_b, ev_n = runs[True][r][0], runs[False][r][0]
        ov = ring_overlap(ev_b, cluster.intra)
        end_b, end_n = (max(e.sim_end for e in ev) for ev in (ev_b, ev_n))
        print(f"{r:>4} | {tiles['naive'][r]:>11.0f} {tiles['balanced'][r]:>9.0f} | "
              f"{end_n * 1e6:>13.1f} {end_b * 1e6:>9.1f} | {ov['messages']:>8} "
              f"{ov['hidden']:>7.1%}")
        summary[r] = ov
    m = formulas.ring_attention_messages(CP)
    print(f"messages per rank: forward {m['forward']} K/V, backward {m['backward_kv']} K/V + "
          f"{m['backward_dkv']} dK/dV (formulas.ring_attention_messages); only the last dK/dV "
          "hop home is exposed")
    info = (f"cp={CP}, s={SEQ}, float32, tile {TILE}, {cluster.name}; hidden (balanced): "
            + ", ".join(f"rank {r} {summary[r]['hidden']:.0%}" for r in range(CP)))
    out = args.out
    p1 = viz.save(viz.cp_ring_overlap(viz.flatten([e for e, _ in runs[True]]),
                                      viz.flatten([e for e, _ in runs[False]]), tiles, info),
                  os.path.join(out, "cp_ring_overlap.png"))
    rows = ring_vs_ulysses_rows(cluster)
    print("\nring vs Ulysses, one layer's attention forward + backward, h = 4096, 16-bit, "
          f"{cluster.name}: Ulysses time / ring time (> 1: ring faster)")
    for cp in sorted({r["cp"] for r in rows}):
        rs = [r for r in rows if r["cp"] == cp]
        print(f"  cp={cp:<2} ({rs[0]['link']:<24}) " +
              " ".join(f"{r['s'] // 1024}k:{r['ulysses'] / r['ring']:.2f}" for r in rs))
    p2 = viz.save(viz.cp_ring_vs_ulysses(rows, f"ring attention vs Ulysses on the simulated "
                                               f"{cluster.name} (closed forms = simulated clock)"),
                  os.path.join(out, "cp_ring_vs_ulysses.png"))
    print(f"wrote {p1}\nwrote {p2}")
    return {"tiles": tiles, "overlap": summary, "rows": rows}


if __name__ == "__main__":
    main()
