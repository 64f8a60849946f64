"""Builds notebooks/00_basics.ipynb (run: python notebooks/build/build_00_basics.py)."""
import os

import nbformat as nbf

nb = nbf.v4.new_notebook()
md = lambda s: nbf.v4.new_markdown_cell(s)
code = lambda s: nbf.v4.new_code_cell(s)
nb.cells = [
md("""# 00 — simpar basics: devices, collectives, clocks

Every rank of a simpar world plays one device. In this notebook the world lives in
this process (one thread per device); the same functions run unchanged under
`mpiexec -n 4` with one process per device.

We will
1. start a world and use the collectives that every parallel paradigm is built from,
2. lay ranks out on a device mesh,
3. read the **simulated clock** (what the same communication would cost on an A100 cluster) and check it against the α-β formulas,
4. run the reference GPT and count its FLOPs,
5. draw a timeline of a data-parallel step on both clocks."""),
code("""import numpy as np
import simpar
from simpar import sim, trace, viz
from simpar.comm.mesh import Mesh, ParallelConfig"""),
md("""## 1. A world of 4 devices

`simpar.launch(fn, world_size)` calls `fn(comm)` on every rank and returns the per-rank results."""),
code("""def hello(comm):
    x = np.full(3, float(comm.rank))
    return {
        "all_reduce": comm.all_reduce(x),                 # sum over ranks: 0+1+2+3
        "all_gather": comm.all_gather(x[:1]),             # concatenate along axis 0
        "reduce_scatter": comm.reduce_scatter(np.arange(8.0)),  # sum, keep my quarter
    }

for rank, out in enumerate(simpar.launch(hello, world_size=4)):
    print(rank, {k: v.tolist() for k, v in out.items()})"""),
md("""`all_reduce` = `reduce_scatter` followed by `all_gather`: that identity is why a ring all-reduce
moves twice the bytes of either half. Messages go point to point with `send`/`recv`:"""),
code("""def ring(comm):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    req = comm.irecv((2,), np.float64, src=left)
    comm.send(np.array([comm.rank, comm.rank ** 2], dtype=float), dst=right)
    return req.wait()

print(simpar.launch(ring, 4))"""),
md("""## 2. The device mesh

Megatron-LM places tensor-parallel peers next to each other: `rank = tp + tp·(dp + dp·pp)`."""),
code("""cfg = ParallelConfig(dp=2, tp=2, pp=2)
print(cfg.grid())

def groups(comm):
    mesh = Mesh(comm, cfg)
    return mesh.tp.world_ranks, mesh.dp.world_ranks, mesh.pp.world_ranks

for r, (tp, dp, pp) in enumerate(simpar.launch(groups, 8)):
    print(f"rank {r}: tp group {tp}  dp group {dp}  pp group {pp}")"""),
md("""## 3. Two clocks

Each event is recorded with the wall clock of this machine **and** a simulated clock. A ring
all-reduce of `n` bytes over `p` devices costs `2(p−1)α + 2n(p−1)/p·β`."""),
code("""cluster = sim.a100_cluster()
n = 16 << 20                      # 16 MiB of gradients

def one_all_reduce(comm):
    comm.all_reduce(np.zeros(n // 8))
    return comm.tracer.select("comm", name="all_reduce")[0]

ev = simpar.launch(one_all_reduce, 4, cluster=cluster)[0]
link = cluster.intra
formula = 2 * 3 * link.alpha + 2 * n * 3 / 4 * link.beta
print(f"simulated {ev.sim_end - ev.sim_start:.6e} s   formula {formula:.6e} s   "
      f"wall clock here {ev.wall_end - ev.wall_start:.3e} s")"""),
md("""## 4. The reference GPT

Every parallel model in simpar is cut from this single-device model, and checked against it.
Its forward FLOPs are `24·b·s·h² + 4·b·s²·h` per layer plus `2·b·s·h·V` for the LM head."""),
code("""from simpar.data import CharTokenizer, get_batch, load_corpus
from simpar.nn import GPT, GPTConfig

text = load_corpus()
tok = CharTokenizer(text)
ids = tok.encode(text)
cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=2, n_head=4, d_model=64)
model = GPT(cfg, seed=0)
x, y = get_batch(ids, 4, 32, np.random.default_rng(0))
loss = model.loss(x, y)          # forward, cross-entropy, backward (gradients accumulate)
b, s, h, L, V = 4, 32, 64, 2, tok.vocab_size
print(f"loss {loss:.3f} (ln V = {np.log(V):.3f}), parameters {model.num_parameters():,}")
print("FLOPs", model.flops(b, s), "=", L * (24*b*s*h*h + 4*b*s*s*h) + 2*b*s*h*V)"""),
md("""## 5. A data-parallel step on both clocks

Each device takes a slice of the batch, runs forward and backward, and the gradients are
averaged with one all-reduce. The result equals the single-device gradient of the whole batch."""),
code("""from simpar.demos.overview import reference_step

def dp_step(comm):
    err = reference_step(comm)
    return err, comm.tracer.events

out = simpar.launch(dp_step, 4, cluster=cluster)
print("max relative gradient error vs one device:", max(e for e, _ in out))
fig = viz.timeline(viz.flatten([evs for _, evs in out]), "data-parallel GPT step")"""),
md("""On the wall clock (top) the devices share this machine's cores; on the simulated clock (bottom)
each device is an A100 and the all-reduce runs over NVLink. Next: `01_tensor_parallel.ipynb`."""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "00_basics.ipynb"))
