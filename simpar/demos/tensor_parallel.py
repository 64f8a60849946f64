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

import numpy as np

from .. import sim, testing, trace, viz
from .common import demo_parser, process_rank, start
from ..comm import Comm, run
from ..data import CharTokenizer, get_batch, load_corpus
from ..nn import GPT, MLP, GPTConfig, TransformerBlock
from ..parallel.tensor import (NaiveTensorParallelMLP, ParallelGPT, ParallelMLP,
                               ParallelTransformerBlock, layer_comm_elements, ring_bytes)
from ..parallel.tensor.mappings import split_along

# the demo model: divisible by 1, 2, 3, 4 and 6 devices (hidden, heads, sequence)
SEQ, BATCH, D_MODEL, N_HEAD, N_LAYER = 24, 4, 96, 12, 2
MEMORY = (150e6, 8e6, 0.2e6)         # bytes: base, per device, per device² (measured)

GROUPS = (("logits", None), ("loss", None), ("embedding grads", ("wte", "wpe")),
          ("attention grads", (".attn.",)), ("MLP grads", (".mlp.",)),
          ("LayerNorm grads", (".ln1.", ".ln2.", "ln_f.")), ("head grads", ("lm_head.",)))


# ------------------------------------------------------------ 1. equivalence
def equivalence(comm: Comm) -> tuple[dict, list]:
    """Errors per group for tp and tp+sp; the traced events of the tp step."""
    text = load_corpus()
    tok = CharTokenizer(text)
    cfg = GPTConfig(tok.vocab_size, SEQ, N_LAYER, N_HEAD, D_MODEL)
    idx, tgt = get_batch(tok.encode(text), BATCH, SEQ, np.random.default_rng(0))
    with trace.untraced():
        ref = GPT(cfg, seed=0)
        logits_ref = ref.forward(idx)
        ref.clear_saved()
        loss_ref = ref.loss(idx, tgt)
    ref_grads = ref.gradients()
    errors, step_events = {}, []
    for sp in (False, True):
        par = ParallelGPT.from_reference(ref, comm, sequence_parallel=sp)
        logits = comm.all_gather(par.forward(idx), axis=-1)[..., :cfg.vocab_size]
        par.clear_saved()
        comm.barrier()
        comm.tracer.reset()
        loss = par.loss(idx, tgt)
        par.finalize_grads()
        if not sp:
            step_events = list(comm.tracer.events)
        grads = par.full_gradients()
        col = {"logits": testing.rel_error(logits, logits_ref),
               "loss": testing.rel_error(loss, loss_ref)}
        grad_errors = testing.compare(grads, ref_grads)
        for group, keys in GROUPS[2:]:
            names = [n for n in ref_grads if any(n.startswith(k) or k in n for k in keys)]
            col[group] = testing.worst([grad_errors[n] for n in names])
        errors["tp+sp" if sp else "tp"] = col
    return errors, step_events


# ------------------------------------------- 2. bytes and activations per layer
def _group_of(comm: Comm, t: int) -> Comm | None:
    """Split the world into groups of ``t`` consecutive ranks (named "tp")."""
    groups = comm.size // t
    color = comm.rank // t if comm.rank < groups * t else groups
    tp = comm.split(color, comm.rank, name="tp")
    return tp if color < groups else None


def _one_layer(tp: Comm, module, x, dy) -> tuple[float, int]:
    """Ring bytes of one forward + backward of ``module``, and the activation
    bytes it saved, from the tracer and the memory ledger."""
    mark, ledger = len(tp.tracer.events), tp.tracer.memory
    before = ledger.current.get("activations", 0)
    module.forward(x)
    saved = ledger.current["activations"] - before
    module.backward(dy)
    sent = sum(ring_bytes(e) for e in tp.tracer.events[mark:]
               if e.category == "comm" and e.group == tp.name)
    return sent, saved


def measure(comm: Comm) -> list[dict]:
    """For every tp size dividing the world: per-layer bytes sent (ring model) and
    activation bytes saved, for a block (tp, tp+sp) and an MLP (Megatron, naive)."""
    rows = []
    rng = np.random.default_rng(7)
    with trace.untraced():
        block = TransformerBlock(D_MODEL, N_HEAD, rng=rng)
        mlp = MLP(D_MODEL, rng=rng)
    x = rng.standard_normal((BATCH, SEQ, D_MODEL))
    for t in [t for t in range(1, comm.size + 1) if comm.size % t == 0]:
        tp = _group_of(comm, t)
        row = {"t": t}
        for name, sp in (("tp", False), ("tp+sp", True)):
            par = ParallelTransformerBlock.from_reference(block, tp, sp)
            xl = split_along(x, 1, tp) if sp else x
            row[f"{name} bytes"], row[f"{name} saved"] = _one_layer(tp, par, xl, xl)
            par.finalize_grads()
        for name, cls in (("mlp", ParallelMLP), ("naive mlp", NaiveTensorParallelMLP)):
            row[f"{name} bytes"] = _one_layer(tp, cls.from_reference(mlp, tp), x, x)[0]
        rows.append(row)
    return rows


# figures: simpar.viz.tp_comm_volume and simpar.viz.tp_memory (names kept for the notebook)
def plot_comm_volume(rows: list[dict]):
    return viz.tp_comm_volume(rows, BATCH, SEQ, D_MODEL)


def plot_memory(rows: list[dict]):
    return viz.tp_memory(rows, BATCH, SEQ, D_MODEL, N_HEAD)


# ------------------------------------------------------------------ driver
def main_rank(comm: Comm) -> dict:
    errors, step_events = equivalence(comm)
    rows = measure(comm)
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
    vocab = CharTokenizer(load_corpus()).vocab_size
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
