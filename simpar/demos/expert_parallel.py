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

import numpy as np

from .. import sim, testing, trace, viz
from .common import demo_parser, process_rank, start
from ..comm import Comm, run
from ..data import CharTokenizer, get_batch, load_corpus, train_val_split
from ..nn.moe import MoE
from ..nn.moe_gpt import MoEGPT, MoEGPTConfig
from ..optim import AdamW
from ..comm.mesh import Mesh, ParallelConfig
from ..parallel.expert import ExpertParallelMoE
from ..parallel.hybrid import build_model

SEQ_LEN, BATCH_PER_RANK, D_MODEL = 32, 8, 32
# memory model (bytes): base, per device, per device² — each device builds the
# reference dispatch layer of all 2·ep experts (measured: 4.4 GB at 16 devices)
MEMORY = (150e6, 20e6, 17.5e6)

def _untraced(fn):
    with trace.untraced():
        return fn()


# ------------------------------------------------------------ 1. equivalence
def equivalence(comm: Comm, k: int, capacity_factor, per_rank_tokens=(4, 8), h=16) -> dict:
    """Expert-parallel layer vs the reference (``groups = ep``) on the union batch."""
    ep, b = comm.size, per_rank_tokens[0]
    n_experts = 2 * ep
    rng = np.random.default_rng([k, ep])
    ref = MoE(h, n_experts, 2 * h, k=k, capacity_factor=capacity_factor, groups=ep, rng=rng)
    ref.init_random_(rng, std=0.3)
    x = rng.standard_normal((ep * b, per_rank_tokens[1], h))
    w = rng.standard_normal(x.shape)

    def reference():
        y = ref.forward(x)
        loss = float(np.sum(w * y)) + ref.stats[0].aux_loss
        return y, loss, ref.backward(w)
    y_ref, loss_ref, dx_ref = _untraced(reference)
    layer = ExpertParallelMoE.from_reference(ref, comm)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    n0 = len(comm.tracer.events)
    y = layer.forward(x[mine])
    dx = layer.backward(w[mine])
    comm_events = [(e.name, e.nbytes) for e in comm.tracer.events[n0:] if e.category == "comm"]
    local = float(np.sum(w[mine] * y)) + layer.stats[0].aux_loss / ep
    loss = float(comm.all_reduce(np.array([local]))[0])
    errs = {"output": testing.rel_error(y, y_ref[mine]),
            "input grad": testing.rel_error(dx, dx_ref[mine]),
            "loss": testing.rel_error(loss, loss_ref),
            "param grads": testing.worst(testing.compare(layer.gradients(), ref.gradients()))}
    # the worst over all devices, NaN-aware (an MPI MAX reduction may drop a NaN)
    worst = {key: testing.worst_over_ranks(comm, v) for key, v in errs.items()}
    return {"k": k, "cf": capacity_factor, "errs": worst, "comm": comm_events,
            "dropped": ref.stats[0].dropped_fraction, "experts": n_experts}


# -------------------------------------------------------------- 2. timeline
def dispatch_run(comm: Comm, tokens=512, h=256, d_ff=1024) -> list:
    """One forward and backward of a float32 layer with 2 experts per device;
    returns this rank's events."""
    rng = np.random.default_rng(0)
    ref = MoE(h, 2 * comm.size, d_ff, k=2, capacity_factor=1.25, groups=comm.size,
              rng=rng, dtype=np.float32, trace_name="moe")
    layer = ExpertParallelMoE.from_reference(ref, comm)
    x = np.random.default_rng(1 + comm.rank).standard_normal((tokens, h)).astype(np.float32)
    layer.backward(layer.forward(x, key="warm-up"), key="warm-up")     # first-touch costs
    comm.barrier()
    comm.tracer.reset()
    layer.backward(layer.forward(x), key=0)
    return list(comm.tracer.events)


# -------------------------------------------------------------- 3. training
def train(comm: Comm, balance_coef: float, steps: int, seed: int = 0) -> dict:
    """Train an MoE GPT (every block MoE, top-1, capacity factor 1.25) with its
    experts split over ``comm``; the tracer's load statistics per step."""
    text = load_corpus()
    tok = CharTokenizer(text)
    ids, _ = train_val_split(tok.encode(text))
    n_experts = 8 if 8 % comm.size == 0 else 2 * comm.size
    cfg = MoEGPTConfig(vocab_size=tok.vocab_size, seq_len=SEQ_LEN, n_layer=2, n_head=4,
                       d_model=D_MODEL, n_experts=n_experts, top_k=1, capacity_factor=1.25,
                       balance_coef=balance_coef, groups=comm.size)
    # experts over all devices: data parallelism of degree ep, one expert group
    model = build_model(MoEGPT(cfg, seed=seed), Mesh(comm, ParallelConfig(dp=comm.size,
                                                                          ep=comm.size)))
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)                  # the global batch, the same everywhere
    loads, dropped, aux, losses = [], [], [], []
    for _ in range(steps):
        x, y = get_batch(ids, BATCH_PER_RANK * comm.size, SEQ_LEN, rng)
        model.zero_grad()
        losses.append(model.step(x, y)["loss"])       # each device routes its own rows
        opt.step(model.gradients())
        # the load statistics, as the tracer recorded them (this device's tokens)
        recs = [e.args["moe"] for e in comm.tracer.select("compute")
                if e.name.endswith(".moe.router.forward")]
        comm.tracer.reset()
        loads.append([r["routed_per_expert"] for r in recs])
        dropped.append([r["dropped_fraction"] for r in recs])
        aux.append([r["aux_loss"] for r in recs])
    # tokens per expert over the whole group: sum the devices' counts
    total = comm.all_reduce(np.array(loads, dtype=np.int64))
    return {"loads": total, "dropped": comm.all_reduce(np.array(dropped)) / comm.size,
            "aux": comm.all_reduce(np.array(aux)) / comm.size, "loss": losses,
            "experts": n_experts}


load_ratio = viz.load_ratio


def main_rank(comm: Comm, steps: int = 150) -> dict:
    checks = [equivalence(comm, k, cf) for k, cf in ((1, 1.0), (2, 1.0), (2, None))]
    events = dispatch_run(comm)
    runs = {alpha: train(comm, alpha, steps) for alpha in (0.0, 0.01)}
    return {"checks": checks, "events": comm.gather_objects(events), "runs": runs,
            "backend": comm.backend}


COMM_LABELS = {"all_to_all": "all-to-all", "all_gather": "counts", "all_reduce": "router grad Σ"}


# ------------------------------------------------------------------ main
def parser():
    ap = demo_parser("expert", __doc__)
    ap.add_argument("--steps", type=int, default=150, help="training steps per run (>= 2)")
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps must be at least 2, got {args.steps}")
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
