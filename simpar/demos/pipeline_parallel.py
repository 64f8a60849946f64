"""Pipeline parallelism demo: five schedules, checked against one device, timed on
two clocks.

    python -m simpar pipeline                # 4 devices (threads)
    mpiexec -n 4 python -m simpar pipeline   # 4 MPI processes

1. prints the 1F1B schedule as a step × rank grid ("0F1" = stage 0, forward,
   micro-batch 1);
2. runs one training step of every schedule (naive, GPipe, 1F1B, interleaved 1F1B,
   ZB-H1) on a GPT cut into stages, and prints the max relative error of the loss
   and every gradient against one device, the bubble fraction on the simulated
   clock next to the paper's formula, the one measured on this machine's wall
   clock, and the micro-batches held by rank 0;
3. writes ``pp_schedules.png`` (the five schedules, like the papers' figures),
   ``pp_bubble.png`` (bubble over m and v, with the formulas) and
   ``pp_timeline.png`` (a 1F1B step on the wall and simulated clocks).

The stages are uniform on the simulated clock: the last stage has one block less
and the LM head, and the vocabulary is padded to ``4h + 2·d_ff + 2s`` tokens, which
makes the head cost exactly one block.  So the simulated bubbles equal the
formulas exactly (free links, the default cluster here).
"""
from __future__ import annotations

import os

import numpy as np

from .. import sim, testing, viz
from ..comm import Comm, run
from ..experiments import (corpus_batches, measured_bubble, pipeline_step, reference_grads,
                           stage_errors, uniform_config, vocab_size)
from ..formulas import bubble_fraction as bubble_formula
from ..parallel.pipeline import format_schedule, make_schedule, summarize
from .common import demo_parser, process_rank, progress, start

SCHEDULE_V = {"naive": 1, "gpipe": 1, "1f1b": 1, "interleaved": 2, "zb-h1": 1}
MEMORY = (150e6, 3e6, 2.7e6)        # bytes: base, per device, per device² (measured)


# ---------------------------------------------------------------------- the demo
def main_rank(comm: Comm, m: int = 8, sweep: bool = True) -> dict:
    p = comm.size
    vocab = vocab_size()
    out = {"backend": comm.backend, "rows": [], "records": {}, "sweep": []}
    progress(comm, f"running one step of each of the {len(SCHEDULE_V)} schedules ...")
    for name, v in SCHEDULE_V.items():
        mm = m if name != "interleaved" else max(p, m - m % p)
        # the same 4p − 1 blocks for every schedule: k = 4 per stage, 2 per chunk (v = 2)
        cfg, sizes = uniform_config(p * v, k=4 // v, min_vocab=vocab)
        xs, ys = corpus_batches(cfg, mm, batch=2)
        ref_loss, ref_grads = reference_grads(cfg, xs, ys)
        res, stages, recs = pipeline_step(comm, name, mm, v, cfg, sizes, xs, ys)
        err = testing.worst_over_ranks(comm, stage_errors(res, stages, ref_loss, ref_grads))
        sim_f, formula = measured_bubble(name, recs, p, mm, v)
        wall_f = summarize(recs, "wall").bubble_fraction
        peaks = comm.gather_objects(res.peak_in_flight)
        out["rows"].append((name, mm, v, err, sim_f, formula, wall_f, peaks))
        out["records"][name] = recs
    if sweep:                                           # bubble over m and v
        progress(comm, "sweeping the bubble over m and v (--no-sweep skips it) ...")
        cfg1, sizes1 = uniform_config(p, min_vocab=vocab)
        for name, v in (("1f1b", 1), ("gpipe", 1), ("interleaved", 2), ("interleaved", 4),
                        ("zb-h1", 1)):
            cfg, sizes = (cfg1, sizes1) if v == 1 else uniform_config(p * v, min_vocab=vocab)
            for mm in (1, 2, 4, 8, 16, 32):
                if name == "interleaved" and mm % p:
                    continue
                xs, ys = corpus_batches(cfg, mm, batch=1)
                res, _, recs = pipeline_step(comm, name, mm, v, cfg, sizes, xs, ys)
                sim_f, formula = measured_bubble(name, recs, p, mm, v)
                peak = max(comm.gather_objects(res.peak_in_flight))
                out["sweep"].append((name, v, mm, sim_f, formula, peak))
    progress(comm, "timing a float32 1F1B step on the wall clock ...\n")
    # a bigger float32 model for the wall clock
    cfg, sizes = uniform_config(p, k=2, h=64, d_ff=256, seq=64, n_head=4, min_vocab=vocab)
    xs, ys = corpus_batches(cfg, m, batch=4)
    for _ in range(2):                                  # the first step warms up
        res, _, recs = pipeline_step(comm, "1f1b", m, 1, cfg, sizes, xs, ys, dtype=np.float32)
    out["timeline"] = recs
    out["timeline_wall"] = summarize(recs, "wall").bubble_fraction
    return out


def parser():
    ap = demo_parser("pipeline", __doc__, cluster="ideal",
                     cluster_help="simulated cluster (ideal: free links, so bubbles equal "
                                  "the formulas)")
    ap.add_argument("--micro-batches", type=int, default=8, metavar="M",
                    help="micro-batches per step")
    ap.add_argument("--no-sweep", action="store_true", help="skip the bubble sweep over m, v")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cluster = sim.preset(args.cluster)
    start("pipeline parallelism", args, MEMORY)
    results = run(lambda c: main_rank(c, args.micro_batches, not args.no_sweep),
                  args.world_size, args.backend, cluster)
    if process_rank() != 0:
        return
    me, p = results[0], len(results)
    print(f"pipeline parallelism: {p} ranks, backend {me['backend']}, simulated cluster: "
          f"{cluster.name}\n")
    print(format_schedule(make_schedule("1f1b", p, args.micro_batches)))
    print("\n(F = 1 step, B = 2 steps; \".\" = idle.  format_schedule(sch) prints any schedule.)\n")
    print(f"{'schedule':<12} {'m':>3} {'v':>2} {'max rel err':>12} {'sim bubble':>11} "
          f"{'formula':>8} {'wall bubble':>12}  micro-batches held per rank")
    for name, mm, v, err, sim_f, formula, wall_f, peaks in me["rows"]:
        ok = "" if testing.passed(err) else "  TOO LARGE"
        held = " ".join(f"{x:.3g}" for x in peaks)
        print(f"{name:<12} {mm:>3} {v:>2} {err:>12.2e} {sim_f:>11.4f} {formula:>8.4f} "
              f"{wall_f:>12.4f}  {held}{ok}")
    print("\nsim bubble: idle share of all ranks' time on the simulated clock; formula: the "
          "papers';\nwall bubble: the same on this machine's clock (tiny float64 model: "
          "Python overhead and\nranks sharing cores blur it).  Max errors: loss and every "
          "gradient vs one device (float64).\nHeld: peak activations in units of one "
          "forward of the rank's first stage (interleaved: of one chunk).\nZB-H1's formula assumes identical stages; "
          "here the last stage's LM head splits evenly into I and W\n(a block's I also "
          "carries the attention core twice), hence the small gap.")
    print(f"\n1F1B step of a float32 GPT (d_model 64, seq 64): wall-clock bubble "
          f"{me['timeline_wall']:.3f}, formula {bubble_formula('1f1b', p, args.micro_batches):.3f}")
    os.makedirs(args.out, exist_ok=True)
    written = []
    if p == 4:
        bubbles = {name: sim_f for name, _, _, _, sim_f, *_ in me["rows"]}
        written.append(viz.save(viz.pipeline_schedules(me["records"], bubbles, SCHEDULE_V),
                                os.path.join(args.out, "pp_schedules.png")))
    if me["sweep"]:
        written.append(viz.save(viz.pipeline_bubble(me["sweep"], p),
                                os.path.join(args.out, "pp_bubble.png")))
    written.append(viz.save(viz.pipeline_timeline(me["timeline"], "1F1B step, float32 GPT"),
                            os.path.join(args.out, "pp_timeline.png")))
    print("\nwrote " + ", ".join(written) +
          ("" if p == 4 else "\n(pp_schedules.png is drawn for p = 4 only)"))


if __name__ == "__main__":
    main()
