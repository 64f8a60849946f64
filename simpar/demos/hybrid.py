"""Hybrid parallelism: every layout trains the same model (``figures/hybrid_loss.png``).

    python -m simpar hybrid [--steps 40] [--out DIR]

Trains the default GPT of :mod:`simpar.train` (with 4 layers, so that interleaved
pp2 × vpp2 has a layer per stage) on the shipped corpus for ``--steps`` steps, in
float64, on each layout of the issue's equivalence list — dp2, dp4, tp2×dp2, pp2×dp2,
tp2×pp2, dp2×tp2×pp2, tp2 + sequence parallelism × pp2, interleaved vpp2 pp2×dp2,
and tied embeddings with pp2 — and on one device.  Every layout takes the same
global batch at every step, so its losses equal the one-device run's to rounding (the
tied run is another model: it is compared with a tied one-device run) — and on four
MoE layouts (4 experts, top-2: ep2 over dp2, ep2 inside dp4, tp2 × ep2, pp2 × ep2),
each compared with one device routing its tokens in the same groups.  Prints the
largest relative difference per layout and draws every loss curve on one plot
(:func:`simpar.viz.loss_curves`).

Each layout runs in a threads world of its own size (2, 4 or 8 devices), so there
is no ``--world-size`` (under ``mpiexec`` with several processes it refuses to run).
The figure comes from seeded runs on the threads backend, so it is the same bytes
every run.
"""
from __future__ import annotations

import os

import numpy as np

from .. import viz
from ..comm import launch
from ..comm.mesh import ParallelConfig as P
from ..testing import rel_error, worst
from ..train import train, train_reference
from .common import at_least, demo_parser, threads_only

FIGURE = "hybrid_loss.png"
MODEL = dict(n_layer=4)                 # DEFAULT_MODEL with a layer for each of 4 stages
BATCH = 16                              # the global batch of every layout

MOE = {"moe_experts": 4, "moe_k": 2}     # the MoE layouts: 4 experts, top-2 routing

#: (label, layout, train options); "tied" runs use tie_weights=True
LAYOUTS = [
    ("dp2", P(dp=2), {}),
    ("dp4", P(dp=4), {}),
    ("tp2 × dp2", P(dp=2, tp=2), {}),
    ("pp2 × dp2 (1F1B, m=4)", P(dp=2, pp=2), {"micro_batches": 4}),
    ("tp2 × pp2 (m=4)", P(tp=2, pp=2), {"micro_batches": 4}),
    ("dp2 × tp2 × pp2 (m=4)", P(dp=2, tp=2, pp=2), {"micro_batches": 4}),
    ("tp2+SP × pp2 (m=4)", P(tp=2, pp=2), {"micro_batches": 4, "sequence_parallel": True}),
    ("interleaved vpp2 pp2 × dp2 (m=4)", P(dp=2, pp=2, vpp=2),
     {"micro_batches": 4, "schedule": "interleaved"}),
    ("tied pp2 (m=4)", P(pp=2), {"micro_batches": 4, "tied": True}),
    ("MoE ep2 (dp2)", P(dp=2, ep=2), MOE),
    ("MoE ep2 in dp4", P(dp=4, ep=2), MOE),
    ("MoE tp2 × ep2 (dp2)", P(dp=2, tp=2, ep=2), MOE),
    ("MoE pp2 × ep2 (dp2, m=4)", P(dp=2, pp=2, ep=2), {**MOE, "micro_batches": 4}),
]


def reference_losses(steps: int, dtype, tied: bool = False, moe: dict | None = None,
                     groups: int = 1) -> list[float]:
    """The one-device run of a layout's model: the dense GPT (:func:`train_reference`)
    or the MoE GPT routed in ``groups`` groups (as a layout with ``dp·m = groups``
    routes: one device with ``groups`` micro-batches)."""
    if not moe:
        return train_reference({**MODEL, "tie_weights": tied}, steps=steps, batch_size=BATCH,
                               dtype=dtype, log_every=0, eval_batches=0)["loss"]
    return launch(lambda comm: train(comm, P(), model=MODEL, steps=steps, batch_size=BATCH,
                                     dtype=dtype, micro_batches=groups, **moe)["loss"], 1)[0]


def run_layouts(steps: int = 40, dtype=np.float64, layouts=LAYOUTS) -> dict:
    """``{"curves": {label: losses}, "errors": {label: max relative difference vs the
    one-device run of the same model}}``; curves include the one-device runs."""
    refs, curves, errors = {}, {}, {}
    for label, layout, options in layouts:
        options = dict(options)
        tied = options.pop("tied", False)
        moe = {k: options[k] for k in MOE if k in options}
        groups = layout.dp * options.get("micro_batches", 1) if moe else 1
        key = ("1 device, tied embeddings" if tied else
               f"1 device, MoE in {groups} routing groups" if moe else "1 device")
        if key not in refs:
            refs[key] = curves[key] = reference_losses(steps, dtype, tied, moe, groups)
        model = {**MODEL, "tie_weights": tied}
        losses = launch(lambda comm: train(comm, layout, model=model, steps=steps,
                                           batch_size=BATCH, dtype=dtype, **options)["loss"],
                        layout.world_size)[0]
        curves[label] = losses
        errors[label] = rel_error(losses, refs[key])
    return {"curves": curves, "errors": errors}


def figure(curves: dict, errors: dict, steps: int):
    return viz.loss_curves(curves, f"{len(errors)} layouts (dense and MoE), same global "
                                   f"batch, {steps} steps: every loss within "
                                   f"{worst(errors):.0e} of its one-device run")


def parser():
    ap = demo_parser("hybrid", __doc__, cluster=None, world=False)
    ap.add_argument("--steps", type=at_least(1), default=40, help="training steps per layout")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    threads_only("hybrid")
    out = run_layouts(args.steps)
    print(f"hybrid layouts: the default GPT with {MODEL['n_layer']} layers, float64, global "
          f"batch {BATCH}, {args.steps} AdamW steps with clipping; threads worlds\n")
    print(f"{'layout':<34} {'devices':>7} {'final loss':>10} {'max rel. diff vs 1 device':>26}")
    sizes = {label: layout.world_size for label, layout, _ in LAYOUTS}
    for label, losses in out["curves"].items():
        err = out["errors"].get(label)
        print(f"{label:<34} {sizes.get(label, 1):>7} {losses[-1]:>10.6f} "
              f"{'(reference)' if err is None else f'{err:.1e}':>26}")
    os.makedirs(args.out, exist_ok=True)
    png = viz.save(figure(out["curves"], out["errors"], args.steps),
                   os.path.join(args.out, FIGURE))
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
