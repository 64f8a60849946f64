"""Tensor parallelism demo: a GPT split over the devices, checked against the reference.

    python -m simpar tensor                 # 4 devices in one process
    mpiexec -n 4 python -m simpar tensor    # 4 MPI processes

1. cuts a 2-layer GPT (the shipped corpus' character vocabulary, 66 characters,
   not divisible by 4: the vocabulary is padded) over ``tp`` = all devices, runs one training
   step with tensor parallelism and with tensor + sequence parallelism, and prints
   the max relative error of logits, loss and every gradient against the
   single-device reference;
2. draws that step as a timeline on the wall clock and the simulated clock
   (``out/tp_timeline.png``);
3. for every tp size that divides the world, counts the bytes of one layer's
   messages from the tracer and its saved activations from the memory ledger,
   and plots them against the formulas (``out/tp_comm_volume.png``,
   ``out/tp_memory.png``).
"""
from __future__ import annotations

import os

from .. import sim, testing, viz
from ..comm import Comm, run
from ..experiments import GRAD_GROUPS as GROUPS
from ..experiments import layer_bytes_and_memory, tensor_parallel_errors, vocab_size
from ..parallel.tensor import layer_comm_elements
from .common import demo_parser, process_rank, start

# the demo model: divisible by 1, 2, 3, 4 and 6 devices (hidden, heads, sequence)
SEQ, BATCH, D_MODEL, N_HEAD, N_LAYER = 24, 4, 96, 12, 2
MEMORY = (150e6, 8e6, 0.2e6)         # bytes: base, per device, per device² (measured)

# ------------------------------------------------------------------ driver
def main_rank(comm: Comm) -> dict:
    errors, step_events = tensor_parallel_errors(comm, SEQ, BATCH, D_MODEL, N_HEAD, N_LAYER)
    rows = layer_bytes_and_memory(comm, BATCH, SEQ, D_MODEL, N_HEAD)
    # the worst over all ranks, NaN-aware (an MPI MAX reduction may drop a NaN)
    worst = {c: {g: testing.worst_over_ranks(comm, v) for g, v in col.items()}
             for c, col in errors.items()}
    return {"errors": worst, "events": comm.gather_objects(step_events), "rows": rows,
            "backend": comm.backend}


def print_table(errors: dict) -> None:
    cols = list(errors)
    print(f"   {'':18}" + "".join(f"{c:>12}" for c in cols))
    for group, _ in GROUPS:
        print(f"   {group:18}" + "".join(f"{errors[c][group]:>12.1e}" for c in cols))


def parser():
    return demo_parser("tensor", __doc__)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    start("tensor parallelism", args, MEMORY)
    results = run(main_rank, args.world_size, args.backend, sim.preset(args.cluster))
    if process_rank() != 0:
        return
    n, me = len(results), results[0]
    errors = me["errors"]
    vocab = vocab_size()
    print(f"tensor parallelism: tp={n}, backend {me['backend']}\n")
    print(f"1. one GPT training step (2 layers, vocabulary {vocab} padded to a multiple of tp), "
          "max relative error vs the single-device reference (float64):")
    print_table(errors)
    print(f"   {testing.verdict(errors[c][g] for c in errors for g in errors[c])} "
          f"(tolerance {testing.TOL:g})")
    events = viz.flatten(me["events"])
    png = viz.save(viz.timeline(events, f"tensor-parallel GPT step, tp={n}"),
                   os.path.join(args.out, "tp_timeline.png"))
    mine = [e for e in events if e.rank == 0]
    ar = [e for e in mine if e.name == "all_reduce"]
    busy = {c: sum(e.sim_end - e.sim_start for e in mine if e.category == c)
            for c in ("compute", "comm")}
    print(f"\n2. the step on rank 0: {len(ar)} all-reduces (4 per layer x {N_LAYER} layers, "
          f"1 embedding, 1 head, 3 in the loss)\n   simulated ({sim.preset(args.cluster).name}): "
          f"compute {busy['compute'] * 1e6:.2f} µs, communication {busy['comm'] * 1e6:.1f} µs "
          f"— a model this small is latency-bound\n   wrote {png}")
    print("\n3. per layer per device, b=%d s=%d h=%d (float64):" % (BATCH, SEQ, D_MODEL))
    print(f"   {'t':>3} {'sent tp':>10} {'sent tp+sp':>11} {'8bsh(t-1)/t':>12} "
          f"{'MLP naive':>10} {'MLP':>8} {'saved tp':>10} {'saved tp+sp':>12}")
    for r in me["rows"]:
        formula = 8 * layer_comm_elements(BATCH, SEQ, D_MODEL, r["t"])
        print(f"   {r['t']:>3} {r['tp bytes'] / 1024:>8.0f}Ki {r['tp+sp bytes'] / 1024:>9.0f}Ki "
              f"{formula / 1024:>10.0f}Ki {r['naive mlp bytes'] / 1024:>8.0f}Ki "
              f"{r['mlp bytes'] / 1024:>6.0f}Ki {r['tp saved'] / 1024:>8.0f}Ki "
              f"{r['tp+sp saved'] / 1024:>10.0f}Ki")
    p1 = viz.save(viz.tp_comm_volume(me["rows"], BATCH, SEQ, D_MODEL),
                  os.path.join(args.out, "tp_comm_volume.png"))
    p2 = viz.save(viz.tp_memory(me["rows"], BATCH, SEQ, D_MODEL, N_HEAD),
                  os.path.join(args.out, "tp_memory.png"))
    print(f"   wrote {p1} and {p2}")


if __name__ == "__main__":
    main()
