"""Pipeline parallelism demo: five schedules, checked against one device, timed on
two clocks.

    python -m simpar.demos.pipeline_parallel                # 4 devices (threads)
    mpiexec -n 4 python -m simpar.demos.pipeline_parallel   # 4 MPI processes

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

from .. import sim, viz
from ..formulas import bubble_fraction as bubble_formula
from .common import demo_parser, process_rank
from ..comm import Comm, run
from ..data import CharTokenizer, get_batch, load_corpus
from ..nn import GPT, GPTConfig
from ..parallel.pipeline import (PipelineStage, format_schedule, gather_records,
                                 make_schedule, partition, run_schedule, stage_times, summarize)
from ..parallel.pipeline.timeline import draw_pipeline, legend_handles

SCHEDULE_V = {"naive": 1, "gpipe": 1, "1f1b": 1, "interleaved": 2, "zb-h1": 1}


# ------------------------------------------------------------------ building blocks
def uniform_config(n_stages: int, k: int = 2, h: int = 8, d_ff: int = 32, seq: int = 8,
                   n_head: int = 2, min_vocab: int = 1) -> tuple[GPTConfig, list[int]]:
    """A GPT whose ``n_stages`` stages cost the same: ``k`` blocks per stage, one
    less on the last, which carries the LM head instead; ``vocab = 4h + 2·d_ff + 2s``
    (padded above the tokenizer's) makes the head's ``2bsh·vocab`` FLOPs equal a
    block's ``2bs(4h² + 2h·d_ff) + 4bs²h``.  Returns the config and layer counts."""
    vocab = 4 * h + 2 * d_ff + 2 * seq
    if vocab < min_vocab:
        raise ValueError(f"uniform stages need vocab = 4h + 2 d_ff + 2 s = {vocab} >= "
                         f"{min_vocab} tokens; make the model wider")
    cfg = GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=n_stages * k - 1, n_head=n_head,
                    d_model=h, d_ff=d_ff)
    return cfg, [k] * (n_stages - 1) + [k - 1]


def pipeline_step(comm: Comm, name: str, m: int, v: int, cfg: GPTConfig, sizes, xs, ys,
                  dtype=np.float64, seed: int = 0):
    """Build the model (same seed on every rank), cut it, run one step of schedule
    ``name``; returns ``(StepResult, stages, every rank's records)``."""
    sch = make_schedule(name, comm.size, m, v)
    model = GPT(cfg, seed=seed, dtype=dtype)
    stages = {s: PipelineStage(model, s, sch.n_stages, r)
              for s, r in enumerate(partition(model, sch.n_stages, sizes))
              if sch.rank_of(s) == comm.rank}
    comm.barrier()
    comm.tracer.reset()                      # each step starts at 0 on the simulated clock
    res = run_schedule(comm, sch, stages, xs, ys)
    return res, stages, gather_records(comm, res)


def reference_grads(cfg: GPTConfig, xs, ys, seed: int = 0):
    ref = GPT(cfg, seed=seed)
    loss = ref.loss(np.concatenate(xs), np.concatenate(ys), key="ref")
    return loss, ref.gradients()


def max_error(res, stages, ref_loss, ref_grads) -> float:
    errs = [np.abs(g - ref_grads[k]).max() / (np.abs(ref_grads[k]).max() + 1e-300)
            for st in stages.values() for k, g in st.gradients().items()]
    if res.loss is not None:
        errs.append(abs(res.loss - ref_loss) / abs(ref_loss))
    return float(max(errs))


def corpus_batches(cfg: GPTConfig, m: int, batch: int, seed: int = 0):
    text = load_corpus()
    ids = CharTokenizer(text).encode(text)
    x, y = get_batch(ids, m * batch, cfg.seq_len, np.random.default_rng(seed))
    return list(x.reshape(m, batch, -1)), list(y.reshape(m, batch, -1))


def measured_fraction(name: str, records, p: int, m: int, v: int) -> tuple[float, float]:
    """(simulated bubble fraction, formula) of one step."""
    s = summarize(records, "sim")
    t = stage_times(records)
    times = {k: t.get((0, k), 0.0) for k in ("F", "I", "W")}
    return s.bubble_fraction, bubble_formula(name, p, m, v, times)


# ---------------------------------------------------------------------- the demo
def main_rank(comm: Comm, m: int = 8, sweep: bool = True) -> dict:
    p = comm.size
    vocab = CharTokenizer(load_corpus()).vocab_size
    out = {"backend": comm.backend, "rows": [], "records": {}, "sweep": []}
    for name, v in SCHEDULE_V.items():
        mm = m if name != "interleaved" else max(p, m - m % p)
        # the same 4p − 1 blocks for every schedule: k = 4 per stage, 2 per chunk (v = 2)
        cfg, sizes = uniform_config(p * v, k=4 // v, min_vocab=vocab)
        xs, ys = corpus_batches(cfg, mm, batch=2)
        ref_loss, ref_grads = reference_grads(cfg, xs, ys)
        res, stages, recs = pipeline_step(comm, name, mm, v, cfg, sizes, xs, ys)
        err = max(comm.gather_objects(max_error(res, stages, ref_loss, ref_grads)))
        sim_f, formula = measured_fraction(name, recs, p, mm, v)
        wall_f = summarize(recs, "wall").bubble_fraction
        peaks = comm.gather_objects(res.peak_in_flight)
        out["rows"].append((name, mm, v, err, sim_f, formula, wall_f, peaks))
        out["records"][name] = recs
    if sweep:                                           # bubble over m and v
        cfg1, sizes1 = uniform_config(p, min_vocab=vocab)
        for name, v in (("1f1b", 1), ("gpipe", 1), ("interleaved", 2), ("interleaved", 4),
                        ("zb-h1", 1)):
            cfg, sizes = (cfg1, sizes1) if v == 1 else uniform_config(p * v, min_vocab=vocab)
            for mm in (1, 2, 4, 8, 16, 32):
                if name == "interleaved" and mm % p:
                    continue
                xs, ys = corpus_batches(cfg, mm, batch=1)
                res, _, recs = pipeline_step(comm, name, mm, v, cfg, sizes, xs, ys)
                sim_f, formula = measured_fraction(name, recs, p, mm, v)
                peak = max(comm.gather_objects(res.peak_in_flight))
                out["sweep"].append((name, v, mm, sim_f, formula, peak))
    # a bigger float32 model for the wall clock
    cfg, sizes = uniform_config(p, k=2, h=64, d_ff=256, seq=64, n_head=4, min_vocab=vocab)
    xs, ys = corpus_batches(cfg, m, batch=4)
    for _ in range(2):                                  # the first step warms up
        res, _, recs = pipeline_step(comm, "1f1b", m, 1, cfg, sizes, xs, ys, dtype=np.float32)
    out["timeline"] = recs
    out["timeline_wall"] = summarize(recs, "wall").bubble_fraction
    return out


def schedules_figure(records: dict, p: int, m: int):
    import matplotlib.pyplot as plt
    names = list(records)
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 1.1 + 1.15 * len(names) * p / 4 * 1.6))
    for ax, name in zip(np.atleast_1d(axes), names):
        recs = records[name]
        s = summarize(recs)
        v = SCHEDULE_V[name]
        label = {"naive": "naive (one micro-batch at a time)", "gpipe": "GPipe",
                 "1f1b": "1F1B (PipeDream-flush)", "interleaved": f"interleaved 1F1B, v={v}",
                 "zb-h1": "ZB-H1 (zero bubble)"}[name]
        draw_pipeline(ax, recs, "sim", f"{label}: p={p}, m={max(r.action.mb for r in recs) + 1}"
                      f", bubble {s.bubble_fraction:.0%} of the step")
    # one time axis for the pipelined schedules (naive, 4x longer, keeps its own)
    end = max(r.sim_end for n in names if n != "naive" for r in records[n])
    from ..viz import _axis_scale
    for ax, name in zip(np.atleast_1d(axes), names):
        if name != "naive":
            ax.set_xlim(0, end * _axis_scale(end)[0] * 1.01)
    fig.legend(handles=legend_handles(), loc="upper right", ncol=4, fontsize=8)
    fig.suptitle("Pipeline schedules on the simulated clock (colour = micro-batch)", x=0.3,
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def bubble_figure(sweep: list, p: int):
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {("1f1b", 1): ("1F1B / GPipe", "C0"), ("interleaved", 2): ("interleaved v=2", "C1"),
              ("interleaved", 4): ("interleaved v=4", "C2"), ("zb-h1", 1): ("ZB-H1", "C3")}
    for (name, v), (label, color) in styles.items():
        pts = [(mm, f, fo) for n, vv, mm, f, fo, _ in sweep if n == name and vv == v]
        if not pts:
            continue
        ms, fs, fos = zip(*pts)
        ax.plot(ms, fs, "o", color=color, label=f"{label} (simulated clock)")
        ax.plot(ms, fos, "-", color=color, alpha=0.6, label=f"{label} (formula)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble fraction of the step")
    ax.set_title(f"Bubble over m and v (p={p}; lines: (p−1)/(v·m+p−1), ZB-H1: Qi et al.)",
                 fontsize=10)
    ax.legend(fontsize=7)
    for name, color in (("gpipe", "C4"), ("1f1b", "C0"), ("zb-h1", "C3")):
        pts = [(mm, pk) for n, vv, mm, _, _, pk in sweep if n == name]
        if pts:
            ms, pk = zip(*pts)
            ax2.plot(ms, pk, "o-", color=color, label=name)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("micro-batches m")
    ax2.set_ylabel("peak micro-batches held (rank 0, memory ledger)")
    ax2.set_title("Memory: GPipe holds m, 1F1B at most p", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def timeline_figure(recs, p: int):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.5 + 1.4 * p))
    for ax, clock, label in zip(axes, ("wall", "sim"), ("wall clock (this machine)",
                                                         "simulated clock")):
        draw_pipeline(ax, recs, clock, f"1F1B step, float32 GPT — {label}", labels=False)
    fig.legend(handles=legend_handles()[:2], loc="upper right", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def main(argv=None) -> None:
    ap = demo_parser("python -m simpar.demos.pipeline_parallel", __doc__, cluster="ideal",
                     cluster_help="simulated cluster (ideal: free links, so bubbles equal "
                                  "the formulas)")
    ap.add_argument("--micro-batches", type=int, default=8, help="m (default 8)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the bubble sweep over m, v")
    args = ap.parse_args(argv)
    cluster = sim.preset(args.cluster)
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
        ok = "" if err <= 1e-10 else "  TOO LARGE"
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
        written.append(viz.save(schedules_figure(me["records"], p, args.micro_batches),
                                os.path.join(args.out, "pp_schedules.png")))
    if me["sweep"]:
        written.append(viz.save(bubble_figure(me["sweep"], p),
                                os.path.join(args.out, "pp_bubble.png")))
    written.append(viz.save(timeline_figure(me["timeline"], p),
                            os.path.join(args.out, "pp_timeline.png")))
    print("\nwrote " + ", ".join(written) +
          ("" if p == 4 else "\n(pp_schedules.png is drawn for p = 4 only)"))


if __name__ == "__main__":
    main()
