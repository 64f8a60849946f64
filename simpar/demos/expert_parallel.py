"""Expert parallelism demo: an MoE layer's experts split over the devices.

    python -m simpar expert                  # 4 devices (threads)
    mpiexec -n 4 python -m simpar expert     # 4 MPI processes

1. checks the expert-parallel MoE layer (k = 1 and 2, with token dropping)
   against the reference layer run on the union of all devices' tokens:
   output, loss (with auxiliary losses) and every gradient (float64);
2. counts its communication from the tracer: two all-to-alls forward, two
   backward, and the bytes routing sent;
3. draws one forward/backward of a larger layer as a timeline on both clocks
   (``out/ep_dispatch_timeline.png``);
4. trains a small MoE GPT, experts split over the devices, on the shipped
   corpus twice — without and with the Switch load-balancing loss — and plots
   the tokens each expert receives per step (``out/ep_load.png``), with the
   max/mean load ratio of both runs.
"""
from __future__ import annotations

import os

from .. import sim, testing, viz
from ..comm import Comm, run
from ..experiments import moe_dispatch_events as dispatch_run
from ..experiments import moe_equivalence as equivalence
from ..experiments import train_moe
from .common import at_least, demo_parser, process_rank, start

# memory model (bytes): base, per device, per device² — each device builds the
# reference dispatch layer of all 2·ep experts (measured: 4.4 GB at 16 devices)
MEMORY = (150e6, 20e6, 17.5e6)

load_ratio = viz.load_ratio


def main_rank(comm: Comm, steps: int = 150) -> dict:
    checks = [equivalence(comm, k, cf) for k, cf in ((1, 1.0), (2, 1.0), (2, None))]
    events = dispatch_run(comm)
    runs = {alpha: train_moe(comm, alpha, steps) for alpha in (0.0, 0.01)}
    return {"checks": checks, "events": comm.gather_objects(events), "runs": runs,
            "backend": comm.backend}


COMM_LABELS = {"all_to_all": "all-to-all", "all_gather": "counts", "all_reduce": "router grad Σ"}


# ------------------------------------------------------------------ main
def parser():
    ap = demo_parser("expert", __doc__)
    ap.add_argument("--steps", type=at_least(2), default=150, help="training steps per run (>= 2)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cluster = sim.preset(args.cluster)
    start("expert parallelism", args, MEMORY)
    results = run(lambda comm: main_rank(comm, args.steps), args.world_size, args.backend,
                  cluster)
    if process_rank() != 0:
        return
    me, n = results[0], len(results)
    print(f"expert-parallel demo: {n} devices, backend {me['backend']}, "
          f"simulated cluster: {cluster.name}\n")
    print("1. expert-parallel MoE vs the reference MoE on the union of all devices' tokens "
          "(float64, max relative error)")
    for c in me["checks"]:
        cap = "no capacity limit" if c["cf"] is None else f"capacity factor {c['cf']}"
        print(f"   k={c['k']}, {c['experts']} experts, {cap}: dropped {c['dropped']:.1%} of "
              f"assignments; " + ", ".join(f"{k} {v:.1e}" for k, v in c["errs"].items()) +
              f"  ({testing.verdict(c['errs'])})")
    print("\n2. communication of one MoE layer, counted by the tracer (device 0):")
    ev = me["checks"][1]["comm"]
    print("   forward : " + ", ".join(f"{name} {nb} B" for name, nb in ev[:3]))
    print("   backward: " + ", ".join(f"{name} {nb} B" for name, nb in ev[3:]))
    a2a = sum(1 for name, _ in ev if name == "all_to_all")
    print(f"   {a2a} all-to-alls per layer (2 forward + 2 backward), plus the per-expert "
          f"counts (all_gather) and the router gradient sum (all_reduce)")
    os.makedirs(args.out, exist_ok=True)
    events = viz.flatten(me["events"])
    png = viz.save(viz.collective_timeline(events, f"MoE layer forward + backward, ep={n}, k=2",
                                           COMM_LABELS),
                   os.path.join(args.out, "ep_dispatch_timeline.png"))
    print(f"\n3. wrote {png} (dispatch and combine all-to-alls on both clocks)")
    runs = me["runs"]
    print(f"\n4. MoE GPT on the shipped corpus, {runs[0.0]['experts']} experts over {n} devices, "
          f"top-1, capacity factor 1.25, {args.steps} steps per run")
    for alpha, r in sorted(runs.items()):
        label = ("without load-balancing loss" if alpha == 0
                 else f"with load-balancing loss α={alpha}")
        half = len(r["loss"]) // 2
        print(f"   {label:<37}: max/mean tokens per expert {load_ratio(r['loads']):.2f}, "
              f"dropped {r['dropped'][half:].mean():.1%} (both: mean over the last half), "
              f"final loss {r['loss'][-1]:.3f}")
    png = viz.save(viz.expert_load(runs), os.path.join(args.out, "ep_load.png"))
    print(f"   wrote {png}")


if __name__ == "__main__":
    main()
