"""Builds notebooks/01_tensor_parallel.ipynb (run: python notebooks/build/build_01_tensor_parallel.py)."""
import os

import nbformat as nbf

nb = nbf.v4.new_notebook()
md = lambda s: nbf.v4.new_markdown_cell(s)      # noqa: E731
code = lambda s: nbf.v4.new_code_cell(s)        # noqa: E731
nb.cells = [
md("""# 01 — Tensor parallelism: splitting every layer over the devices

A layer too big (or too slow) for one device can be split: each device keeps a slice of
every weight matrix and computes a slice of the layer. The question is only **where the
devices have to talk**. We will

1. start from the article's two-layer MLP and split it the obvious way — all-gather after each layer;
2. see why that is wasteful, and derive Megatron-LM's pairing (Shoeybi et al. 2019, §3): column-split
   then row-split, glued by two conjugate operators **f** and **g**;
3. run the tensor-parallel MLP, attention and a whole GPT on a 4-device world and check every
   gradient against the single-device reference;
4. draw the timeline of a step and the communication volume;
5. add **sequence parallelism** (Korthikanti et al. 2022) and look at activation memory.

Everything runs in this process, one thread per device; `mpiexec -n 4 python -m simpar.demos.tensor_parallel`
runs the same code with one process per device."""),
code("""import inspect

import numpy as np
from IPython.display import display

import simpar
from simpar import viz
from simpar.nn import GPT, MLP, GPTConfig
from simpar.nn import functional as F
from simpar.parallel import tensor as tp_lib
from simpar.parallel.tensor import (NaiveTensorParallelMLP, ParallelGPT, ParallelMLP,
                                    mlp_comm_elements, ring_bytes)
from simpar.demos import tensor_parallel as demo

def show(fig):
    display(fig)
    viz.plt.close(fig)"""),
md("""## 1. The two-layer MLP

The article's example: $Y = \\mathrm{GeLU}(XA)$, $Z = YB$, with $X$ of shape `(b, s, h)`,
$A$ of shape `(h, 4h)` and $B$ of shape `(4h, h)`. On one device:"""),
code("""b, s, h = 2, 8, 16
rng = np.random.default_rng(0)
mlp = MLP(h, 4 * h, rng=rng)                       # the reference: fc1 = A, fc2 = B
X = rng.standard_normal((b, s, h))
A, B = mlp.fc1.params["W"], mlp.fc2.params["W"]
Z_ref = mlp.forward(X)
mlp.clear_saved()
print("A", A.shape, " B", B.shape, " Z", Z_ref.shape)"""),
md("""### The obvious split: columns, then all-gather

Split $A = [A_1, \\dots, A_t]$ by columns: device $i$ computes $Y_i = \\mathrm{GeLU}(XA_i)$, a quarter
of $Y$'s columns. To compute the second layer the same way it needs *all* of $Y$, so the devices
**all-gather** $Y$; then they split $B$ by columns, compute $Z_i = YB_i$ and all-gather $Z$."""),
code("""def naive_forward(comm):
    t, i = comm.size, comm.rank
    A_i = np.split(A, t, axis=1)[i] ; b1_i = np.split(mlp.fc1.params["b"], t)[i]
    B_i = np.split(B, t, axis=1)[i] ; b2_i = np.split(mlp.fc2.params["b"], t)[i]
    Y_i = F.gelu(X @ A_i + b1_i)                   # (b, s, 4h/t)
    Y = comm.all_gather(Y_i, axis=-1)              # (b, s, 4h) on every device
    Z_i = Y @ B_i + b2_i                           # (b, s, h/t)
    return comm.all_gather(Z_i, axis=-1)           # (b, s, h) on every device

Z = simpar.launch(naive_forward, 4)[0]
print("max |Z - Z_ref| =", np.abs(Z - Z_ref).max())"""),
md("""It works, but look at what moves: the all-gather of $Y$ ships `b·s·4h` numbers — the
*widest* activation of the model — and the all-gather of $Z$ another `b·s·h`. The backward pass
is worse: each device's $YB_i$ used all of $Y$, so the gradient of $Y$ is a **sum** over devices,
an all-reduce of `b·s·4h` numbers, plus one of `b·s·h` for $X$.

`NaiveTensorParallelMLP` is exactly this scheme, with a backward. Let the tracer count the bytes
(in the ring model, an all-gather or reduce-scatter of an `n`-byte buffer sends `n(t−1)/t` bytes per
device, an all-reduce twice that):"""),
code("""def bytes_sent(comm, cls):
    par = cls.from_reference(mlp, comm)
    mark = len(comm.tracer.events)
    par.forward(X)
    par.backward(np.ones_like(X))
    events = [e for e in comm.tracer.events[mark:] if e.category == "comm"]
    return [(e.name, e.nbytes) for e in events], sum(ring_bytes(e) for e in events)

msgs, sent = simpar.launch(lambda c: bytes_sent(c, NaiveTensorParallelMLP), 4)[0]
print("messages:", msgs)
print(f"per device: {sent / 8:.0f} numbers = 15·bsh·(t−1)/t = {15 * b * s * h * 3 / 4:.0f}")"""),
md("""## 2. Deriving f and g

The waste comes from making $Y$ whole. But GeLU is element-wise, so $\\mathrm{GeLU}(XA_i)$ **is**
column block $i$ of $Y$ — and a column block of $Y$ is exactly what a **row** block of $B$ multiplies:

$$Z = YB = [Y_1, \\dots, Y_t]\\begin{bmatrix}B_1\\\\ \\vdots \\\\ B_t\\end{bmatrix} = \\sum_i Y_i B_i .$$

So: split $A$ by columns, $B$ by rows, and each device computes $Y_iB_i$ with no communication at
all in between. One **sum over devices** at the end gives $Z$. That sum is the operator
**g** (all-reduce forward). Its backward: $Z$ was used identically by every device downstream,
so $\\partial L/\\partial (Y_iB_i) = \\partial L/\\partial Z$ — identity.

At the input, every device used the same $X$ for its own $XA_i$, so $\\partial L/\\partial X$ is the
sum of every device's contribution: the operator **f** is identity forward and all-reduce backward.
f and g are *conjugate* — each one's backward is the other's forward. In simpar each is a pair of
one-line functions:"""),
code("""for fn in (tp_lib.copy_to_tp_region, tp_lib.copy_to_tp_region_backward,
           tp_lib.reduce_from_tp_region, tp_lib.reduce_from_tp_region_backward):
    print(inspect.getsource(fn))"""),
md("""`ColumnParallelLinear` puts **f** in front of its GEMM, `RowParallelLinear` puts **g** after its
own; `ParallelMLP` is column → GeLU → row. Every layer is cut from a reference module with
`from_reference`, and `full_gradients()` gathers the gradient shards back to the reference shapes:"""),
code("""dZ = rng.standard_normal(Z_ref.shape)
mlp.zero_grad()
mlp.forward(X)
dX_ref = mlp.backward(dZ)

def megatron(comm):
    par = ParallelMLP.from_reference(mlp, comm)
    Z = par.forward(X)
    dX = par.backward(dZ)
    return Z, dX, par.full_gradients()

for rank, (Z, dX, grads) in enumerate(simpar.launch(megatron, 4)):
    errs = [np.abs(Z - Z_ref).max(), np.abs(dX - dX_ref).max()]
    errs += [np.abs(grads[k] - g).max() for k, g in mlp.gradients().items()]
    print(f"rank {rank}: max abs error over Z, dX and every gradient: {max(errs):.1e}")

msgs, sent = simpar.launch(lambda c: bytes_sent(c, ParallelMLP), 4)[0]
print("messages:", msgs)
print(f"per device: {sent / 8:.0f} numbers = 4·bsh·(t−1)/t = {4 * b * s * h * 3 / 4:.0f}")"""),
md("""Two all-reduces of `b·s·h` instead of two all-gathers and two all-reduces that include the
`b·s·4h` activation: **4 instead of 15** `bsh(t−1)/t` numbers per device.

Attention is split the same way: heads are independent, so the QKV projection is column-parallel
*by heads* (each device gets whole heads) and the output projection is row-parallel — again
f … g. A transformer layer therefore does **2 all-reduces forward and 2 backward**
(Megatron-LM Fig. 4), `8·b·s·h·(t−1)/t` numbers per device.

## 3. A whole GPT on 4 devices

At the ends the **vocabulary** is split: the embedding table by rows (each device looks up the ids
it owns, writes zeros for the rest, and g sums), the output layer by columns. The cross-entropy is
computed from the logit shards with three all-reduces of `b·s` numbers (max, target logit,
Σ exp) — the `(b, s, V)` logits are never gathered. Here `V = 65` is not divisible by 4: it is padded
to 68 and the padding never enters the loss."""),
code("""cfg = GPTConfig(vocab_size=65, seq_len=16, n_layer=2, n_head=8, d_model=64)
gpt = GPT(cfg, seed=0)
idx = rng.integers(0, 65, (4, 16)); tgt = rng.integers(0, 65, (4, 16))
loss_ref = gpt.loss(idx, tgt)

def gpt_step(comm):
    par = ParallelGPT.from_reference(gpt, comm)
    comm.tracer.reset()
    loss = par.loss(idx, tgt)
    return loss, par.full_gradients(), list(comm.tracer.events)

results = simpar.launch(gpt_step, 4)
loss, grads, _ = results[0]
worst = max(np.abs(grads[k] - g).max() / np.abs(g).max() for k, g in gpt.gradients().items())
print(f"loss {loss:.6f} vs reference {loss_ref:.6f}; worst relative gradient error {worst:.1e}")"""),
md("""## 4. The timeline of that step

Blue is compute, orange communication. On the wall clock of this machine the ranks mostly wait for
each other (the model is tiny and four threads share two cores). On the simulated A100 clock a model
this small is pure latency: each all-reduce costs at least `2(t−1)α = 12 µs` while the GEMMs take
nanoseconds — tensor parallelism pays off only for wide layers, inside one NVLink node."""),
code("""events = viz.flatten([r[2] for r in results])
show(viz.timeline(events, "tensor-parallel GPT step, tp=4"))
r0 = [e for e in events if e.rank == 0 and e.category == "comm"]
print(len([e for e in r0 if e.name == "all_reduce"]), "all-reduces on rank 0:",
      "4 per layer x 2 layers + embedding + head + 3 in the loss")"""),
md("""## 5. Communication volume

The demo's `measure` runs one layer on groups of 1, 2 and 4 devices and sums the traced bytes
(dots); lines are the formulas. Sequence parallelism (right, crosses) replaces each all-reduce
by a reduce-scatter plus an all-gather: same bytes."""),
code("""rows = simpar.launch(demo.measure, 4)[0]
show(demo.plot_comm_volume(rows))"""),
md("""## 6. Sequence parallelism and activation memory

With plain tensor parallelism, LayerNorm, the residual adds and dropout are replicated: every device
stores the same `(b, s, h)` activations for them. Korthikanti et al. (2022) split that work along the
**sequence** instead: the operator before a column-parallel layer becomes an all-gather of the
sequence (its backward: reduce-scatter), the one after a row-parallel layer a reduce-scatter
(backward: all-gather):"""),
code("""for fn in (tp_lib.gather_from_sp_region, tp_lib.gather_from_sp_region_backward,
           tp_lib.reduce_scatter_to_sp_region, tp_lib.reduce_scatter_to_sp_region_backward):
    print(inspect.getsource(fn))"""),
md("""LayerNorm's γ and β (and the biases added after a reduce-scatter, and the position embedding)
now see only this device's tokens, so their gradients must be **summed over the group** —
`finalize_grads()`, once per step. Forgetting it is a classic bug; simpar refuses to hand out
such gradients:"""),
code("""def sp_step(comm):
    par = ParallelGPT.from_reference(gpt, comm, sequence_parallel=True)
    loss = par.loss(idx, tgt)
    try:
        par.full_gradients()
    except RuntimeError as e:
        msg = str(e)
    par.finalize_grads()
    return loss, par.full_gradients(), msg

loss, grads, msg = simpar.launch(sp_step, 4)[0]
print("before finalize_grads:", msg)
worst = max(np.abs(grads[k] - g).max() / np.abs(g).max() for k, g in gpt.gradients().items())
print(f"after: loss {loss:.6f}, worst relative gradient error {worst:.1e}")"""),
md("""The memory ledger counts every byte a module keeps for backward. Left: the ledger (dots) equals
simpar's formula for what it saves, with and without sequence parallelism. Right: the same formula
in 16-bit bytes for a GPT-3 175B layer next to Korthikanti et al.'s Table 2 (which also stores
dropout masks and 5 bytes per attention score, and under SP keeps only the sequence shard of
the QKV/fc1 inputs at the price of an extra all-gather in backward)."""),
code("""print(inspect.getdoc(tp_lib.activation_elements))
show(demo.plot_memory(rows))"""),
md("""## Try it

* Make `h` 4× larger in section 1 and check that the naive/Megatron byte ratio stays 15/4.
* Run `ParallelGPT` with `tie_weights=True` or a vocabulary smaller than the number of devices.
* `python -m simpar.demos.tensor_parallel --cluster h100` and `mpiexec -n 4 ...`;
  `python benchmarks/tensor_parallel.py` under `mpiexec -n 2` for the speed-up of a wide MLP."""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
here = os.path.dirname(os.path.abspath(__file__))
nbf.write(nb, os.path.join(here, "..", "01_tensor_parallel.ipynb"))
