"""Builds ``notebooks/03_expert_parallel.ipynb`` (run from anywhere):

    python notebooks/build/build_03_expert_parallel.py

The notebook is generated so that its text and code stay reviewable as Python;
execute it with Jupyter, or ``pytest tests/test_notebooks.py``.
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# 3. Expert parallelism: Mixture-of-Experts on many devices

A Mixture-of-Experts (MoE) layer replaces the one MLP of a transformer block by
`N` expert MLPs and a **router** that sends every token to `k` of them
(Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020). The
parameter count grows with `N`, the FLOPs per token do not.

**Expert parallelism** puts `N/ep` experts on each of `ep` devices. Each device
routes its own tokens, sends each token to the device holding its expert with an
**all-to-all**, and gets the expert's output back with a second all-to-all.

This notebook walks through routing, capacity and token dropping, the auxiliary
losses, the all-to-all dispatch (checked against the single-process reference),
and what the load-balancing loss does to a real training run.
Code: `simpar/nn/moe.py` (reference), `simpar/parallel/expert.py` (parallel)."""),
    ("code", """%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

import simpar
from simpar import trace, viz
from simpar.nn import functional as F
from simpar.nn.moe import MoE, route, top_k, expert_capacity, load_balance_loss
from simpar.parallel.expert import ExpertParallelMoE
np.set_printoptions(precision=3, suppress=True)"""),
    ("md", """## Routing: softmax, then top-k

The router is one linear layer `z = x W_r` followed by a softmax over the experts.
With `k = 1` (Switch) a token goes to its most probable expert and the **gate**
(the weight of the expert's output) is that probability. With `k = 2` (GShard)
the two gates are renormalised to sum to 1. Equal probabilities are broken by the
**lowest expert index**."""),
    ("code", """p = np.array([[0.10, 0.60, 0.20, 0.10],
              [0.25, 0.25, 0.25, 0.25],     # a tie: expert 0 wins, then 1
              [0.05, 0.15, 0.40, 0.40]])    # a tie between 2 and 3
for k in (1, 2):
    experts, gates = top_k(p, k)
    print(f"k={k}: experts\\n{experts}\\n gates\\n{gates}\\n")"""),
    ("md", """## Capacity and token dropping

An expert takes at most `C = ⌈k · tokens / N · capacity_factor⌉` assignments of a
group of tokens. Assignments queue up in a priority order — `"position"`: all
first choices in token order, then all second choices — and those past `C` are
**dropped**: they add nothing, and a token whose every choice is dropped gets a
zero MoE output (the residual connection carries it on)."""),
    ("code", """logits = np.array([[3., 2, 0], [3, 0, 1], [3, 1, 0], [4, 1, 0], [0, 3, 1], [0, 1, 3]])
p = F.softmax(logits)
C = expert_capacity(tokens=6, n_experts=3, k=1, capacity_factor=1.0)
r = route(p, k=1, capacity=C, drop_policy="position")
print("capacity C =", C)
print("first choice of each token:", r.experts[:, 0])
print("kept:                      ", r.kept[:, 0])
print("asked per expert:", r.routed_per_expert(), " kept per expert:", r.kept_per_expert())
r = route(p, k=1, capacity=C, drop_policy="probability")
print("\\nby probability instead: kept", r.kept[:, 0], "(token 0, the least confident, is dropped instead of token 3)")"""),
    ("code", """moe = MoE(h=4, n_experts=3, d_ff=8, k=1, capacity_factor=1.0, rng=0)
moe.router.params["W"][...] = 0.0
moe.router.params["W"][:, 0] = 1.0               # every token prefers expert 0
x = np.abs(np.random.default_rng(0).standard_normal((6, 4))) + 0.5
y = moe.forward(x)
print(moe.stats[0])
print("MoE output rows (only the first C tokens got through):\\n", y)
moe.clear_saved()"""),
    ("md", """## The auxiliary losses

Without help, a router tends to send most tokens to a few experts: those train
faster, get chosen more, and the others starve (and with a capacity, their
tokens are dropped). The Switch **load-balancing loss** `α · N · Σᵢ fᵢ Pᵢ`
(α = 0.01) multiplies the fraction `fᵢ` of tokens routed to expert `i` by the
mean router probability `Pᵢ`; it is 1 for perfectly uniform routing and `N` when
everything goes to one expert. Its gradient flows through `Pᵢ` into the router.
The **router z-loss** `0.001 · mean((logsumexp z)²)` keeps the logits small."""),
    ("code", """n, T = 4, 12
uniform = F.softmax(2.0 * np.eye(n)[np.arange(T) % n])    # token t prefers expert t mod n
collapsed = F.softmax(np.tile([8.0, 0, 0, 0], (T, 1)))
for name, q in (("uniform", uniform), ("collapsed", collapsed)):
    print(f"{name:>9}: N·Σ f·P = {load_balance_loss(q, top_k(q, 1)[0])[0]:.3f}")"""),
    ("md", """## Dispatch and combine: two all-to-alls

Four simulated devices, 8 experts, 2 per device. Every device routes its own 16
tokens; the counts per expert are exchanged first (a small all-gather), then the
token rows travel to their experts (**dispatch** all-to-all), the experts run,
and the outputs travel back (**combine** all-to-all). The backward pass runs the
two all-to-alls in the other direction.

Capacity is counted per device's batch (a GShard *group*), so the reference
layer with `groups=4`, run on the union of the four batches, must give the same
output, loss and gradients."""),
    ("code", """def step(comm):
    ep, b = comm.size, 2
    rng = np.random.default_rng(0)
    ref = MoE(h=8, n_experts=2 * ep, d_ff=16, k=2, capacity_factor=1.0, groups=ep, rng=rng)
    ref.init_random_(rng, std=0.5)
    x = rng.standard_normal((ep * b, 8, 8))               # the union of all batches
    dy = rng.standard_normal(x.shape)
    with trace.untraced():                                # the reference is not traced
        y_ref = ref.forward(x); dx_ref = ref.backward(dy)

    layer = ExpertParallelMoE.from_reference(ref, comm)    # router + my 2 experts
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    y = layer.forward(x[mine])
    dx = layer.backward(dy[mine])
    err = max(np.abs(y - y_ref[mine]).max(), np.abs(dx - dx_ref[mine]).max(),
              max(np.abs(g - ref.gradients()[k]).max() for k, g in layer.gradients().items()))
    comm_events = [(e.name, e.nbytes) for e in comm.tracer.events if e.category == "comm"]
    return {"experts": sorted(layer.experts), "sent": layer.stats[0].kept_per_expert,
            "err": err, "comm": comm_events, "events": list(comm.tracer.events)}

res = simpar.launch(step, world_size=4)
for r, out in enumerate(res):
    print(f"device {r}: holds experts {out['experts']}, sends rows per expert {out['sent']}, "
          f"max abs error vs reference {out['err']:.1e}")
print("\\ncommunication of device 0 (name, bytes):")
for name, nbytes in res[0]["comm"]:
    print(f"  {name:<11} {nbytes:>6}")"""),
    ("code", """fig = viz.timeline(viz.flatten([r["events"] for r in res]),
                   "one MoE layer, forward + backward, 4 devices")
plt.show()"""),
    ("md", """## Does the load-balancing loss balance the load?

A small MoE GPT (2 blocks, both MoE, 8 experts, top-1, capacity factor 1.25)
trained on the shipped corpus for a few dozen steps, with α = 0 and α = 0.01,
on the reference model (`groups=4`: what 4 devices would compute). We record the
tokens each expert is asked to take at every step. (The demo
`python -m simpar.demos.expert_parallel` runs the same experiment expert-parallel
and longer.)"""),
    ("code", """from simpar.data import CharTokenizer, get_batch, load_corpus, train_val_split
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig
from simpar.optim import AdamW

text = load_corpus(); tok = CharTokenizer(text)
ids, _ = train_val_split(tok.encode(text))

def train(alpha, steps=60):
    cfg = MoEGPTConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=2, n_head=4, d_model=32,
                       n_experts=8, top_k=1, capacity_factor=1.25, balance_coef=alpha, groups=4)
    model = MoEGPT(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    loads = []
    for _ in range(steps):
        x, y = get_batch(ids, 32, 32, rng)
        model.zero_grad()
        loss = model.loss(x, y)
        opt.step(model.gradients())
        loads.append([m.stats[0].routed_per_expert for m in model.moe_layers()])
    return np.array(loads, dtype=float), loss

runs = {alpha: train(alpha) for alpha in (0.0, 0.01)}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
for ax, (alpha, (loads, loss)) in zip(axes, runs.items()):
    tail = loads[len(loads) // 2:]
    ratio = (tail.max(-1) / tail.mean(-1)).mean()
    share = loads[:, 0] / loads[:, 0].sum(-1, keepdims=True)
    ax.stackplot(np.arange(len(loads)), share.T)
    ax.set_title(f"α = {alpha}: max/mean load {ratio:.2f} (last half), loss {loss:.2f}")
    ax.set_xlabel("step")
axes[0].set_ylabel("share of tokens per expert (layer 0)")
plt.show()"""),
    ("md", """With α = 0 a few experts take most tokens (and with a capacity, the excess is
dropped); the balancing loss spreads them out. Things to try: `top_k=2`, a
smaller `capacity_factor` (watch `model.moe_layers()[0].stats[0].dropped_fraction`),
more steps, or `drop_policy="probability"`."""),
]


def build(path: Path) -> None:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(path))


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "03_expert_parallel.ipynb"
    build(out)
    print(f"wrote {out}")
