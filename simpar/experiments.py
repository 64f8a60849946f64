"""The experiments that demos, notebooks and tests share: a seeded setup, one
step of a parallel model, and what it is checked against.

* :func:`corpus_batch` — a batch of the shipped corpus (``y`` is ``x`` shifted);
* :func:`gradient_errors` — one step of the reference GPT on a dp × tp mesh
  against the same step on one device (every parameter's relative error);
* pipelines (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2021; ZB-H1, Qi et
  al. 2023): :func:`uniform_config` (stages of equal cost, so simulated bubbles
  equal the papers' formulas), :func:`pipeline_step`, :func:`reference_grads`,
  :func:`stage_errors`, :func:`measured_bubble`;
* tensor parallelism (Shoeybi et al. 2019; Korthikanti et al. 2022):
  :func:`tensor_parallel_errors` — a GPT step against one device, per parameter
  group; :func:`layer_bytes_and_memory` — the bytes one layer sends and the
  activations it saves, per tp size, from the tracer and the memory ledger;
* recomputation (Korthikanti et al. 2022, Table 2): :func:`recompute_rows`;
* experts (Switch, Fedus et al. 2021): :func:`moe_equivalence`,
  :func:`moe_dispatch_events`, :func:`train_moe`;
* ZeRO (Rajbhandari et al. 2020): :func:`zero_step_bytes`; context parallelism:
  :func:`ring_attention_step`, :func:`ring_vs_ulysses_rows`.

A demo composes these and prints; a notebook calls them and draws with
:mod:`simpar.viz`.  Comparisons use :mod:`simpar.testing` (NaN or inf: a failure).
"""
from __future__ import annotations

import numpy as np

from . import testing, trace
from .comm import Comm
from .data import CharTokenizer, get_batch, load_corpus
from .nn import GPT, GPTConfig


def corpus_batch(rows: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` random windows of the shipped corpus, and their next characters."""
    text = load_corpus()
    return get_batch(CharTokenizer(text).encode(text), rows, seq_len,
                     np.random.default_rng(seed))


def vocab_size() -> int:
    """The shipped corpus' character vocabulary (66)."""
    return CharTokenizer(load_corpus()).vocab_size


# =========================================================== hybrid step
def demo_layout(world_size: int):
    """A mesh to show: tp=2 inside, dp over the rest (pure dp for odd sizes)."""
    from .comm.mesh import ParallelConfig
    tp = 2 if world_size % 2 == 0 else 1
    return ParallelConfig(dp=world_size // tp, tp=tp)


def gradient_errors(comm: Comm, seq_len: int = 64, per_rank: int = 2) -> dict:
    """One step of the reference GPT on :func:`demo_layout` (tensor parallelism
    inside, data parallelism across) vs the single-device step on the whole
    batch: the relative error of every parameter's gradient (NaN or inf: ``inf``)."""
    from .comm.mesh import Mesh
    from .parallel.hybrid import build_model
    cfg = GPTConfig(vocab_size(), seq_len, n_layer=2, n_head=4, d_model=128)
    x, y = corpus_batch(per_rank * comm.size, seq_len)
    with trace.untraced():                           # the single-device reference
        ref = GPT(cfg, seed=0)
        ref.loss(x, y)
    # same seed: same weights everywhere; each rank keeps its shards of the layout
    model = build_model(GPT(cfg, seed=0), Mesh(comm, demo_layout(comm.size)))
    model.step(x, y)                                 # the global batch; grads summed over dp
    with trace.untraced():
        grads = model.full_state("grads")            # reference shapes, for the comparison
    return testing.compare(grads, ref.gradients())


# ================================================================ experts
def moe_equivalence(comm: Comm, k: int, capacity_factor, per_rank_tokens=(4, 8), h: int = 16
                    ) -> dict:
    """The expert-parallel MoE layer (2 experts per rank) vs the reference layer
    (``groups = ep``) on the union of the ranks' tokens: errors of output, input
    gradient, loss (with the auxiliary losses) and parameter gradients, worst
    over the ranks; the layer's messages; the dropped fraction."""
    from .nn.moe import MoE
    from .parallel.expert import ExpertParallelMoE
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
    with trace.untraced():
        y_ref, loss_ref, dx_ref = reference()
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


def moe_dispatch_events(comm: Comm, tokens: int = 512, h: int = 256, d_ff: int = 1024) -> list:
    """One forward and backward of a float32 MoE layer with 2 experts per device
    (after a warm-up pass); returns this rank's events."""
    from .nn.moe import MoE
    from .parallel.expert import ExpertParallelMoE
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


def train_moe(comm: Comm, balance_coef: float, steps: int, seed: int = 0, seq_len: int = 32,
              batch_per_rank: int = 8, d_model: int = 32) -> dict:
    """Train an MoE GPT (every block MoE, top-1, capacity factor 1.25; Switch
    load-balancing loss ``balance_coef``) with its experts split over ``comm``:
    tokens per expert (summed over the ranks), dropped fraction and auxiliary
    loss per step, from the tracer's router records."""
    from .comm.mesh import Mesh, ParallelConfig
    from .data import train_val_split
    from .nn.moe_gpt import MoEGPT, MoEGPTConfig
    from .optim import AdamW
    from .parallel.hybrid import build_model
    text = load_corpus()
    tok = CharTokenizer(text)
    ids, _ = train_val_split(tok.encode(text))
    n_experts = 8 if 8 % comm.size == 0 else 2 * comm.size
    cfg = MoEGPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=2, n_head=4,
                       d_model=d_model, n_experts=n_experts, top_k=1, capacity_factor=1.25,
                       balance_coef=balance_coef, groups=comm.size)
    # experts over all devices: data parallelism of degree ep, one expert group
    model = build_model(MoEGPT(cfg, seed=seed), Mesh(comm, ParallelConfig(dp=comm.size,
                                                                          ep=comm.size)))
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)                  # the global batch, the same everywhere
    loads, dropped, aux, losses = [], [], [], []
    for _ in range(steps):
        x, y = get_batch(ids, batch_per_rank * comm.size, seq_len, rng)
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


# ============================================================ ZeRO, context
def zero_step_bytes(comm: Comm, stage: int) -> dict:
    """One AdamW step of a small float64 GPT under ZeRO ``stage`` over
    ``dp = comm.size``: the ledger's parameter + gradient + optimizer bytes on
    this rank beside ZeRO §5's formula (``K = 16``), and the bytes it sent over
    dp beside §7's ``2Ψ(N−1)/N`` (Rajbhandari et al. 2020)."""
    from . import formulas
    from .comm.mesh import Mesh, ParallelConfig
    from .parallel.hybrid import build_model
    from .parallel.tensor.accounting import ring_bytes
    from .parallel.zero import DistributedOptimizer
    cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=4, n_head=4, d_model=16)
    model = build_model(GPT(cfg, seed=0), Mesh(comm, ParallelConfig(dp=comm.size)))
    opt = DistributedOptimizer(model, stage, lr=1e-2)
    x = np.random.default_rng(0).integers(0, 16, (8, 8))
    comm.tracer.reset()
    model.zero_grad()
    model.step(x, np.roll(x, -1, 1), 1)
    opt.clip_grad_norm(1.0)
    opt.step()
    led = comm.tracer.memory.current
    psi = sum(p.size for p in model.parameters().values())
    sent = sum(ring_bytes(e) for e in comm.tracer.events if e.category == "comm"
               and e.group == "dp")
    return {"stage": stage, "dp": comm.size, "psi": psi,
            "ledger": sum(led.get(k, 0) for k in ("params", "grads", "optimizer")),
            "formula": formulas.zero_memory_bytes(psi, comm.size, stage, k=16,
                                                  param_bytes=8, grad_bytes=8),
            "sent": sent, "dp_sent": 8 * formulas.dp_comm_elements(psi, comm.size)}


def ring_attention_step(comm: Comm, balanced: bool, seq: int, width: int, tile: int
                        ) -> tuple[list, float]:
    """One float32 ring-attention layer (one head of ``width``) forward + backward
    over ``comm`` (Liu et al. 2023), load-balanced chunks or the naive split:
    this rank's events and the ``tile × tile`` score tiles it computed."""
    from .parallel import context as C
    rng = np.random.default_rng(comm.rank)
    q, k, v, dy = (rng.standard_normal((1, seq // comm.size, width)).astype(np.float32)
                   for _ in range(4))
    comm.barrier()
    comm.tracer.reset()
    y, cache = C.ring_attention_forward(q, k, v, 1, comm, balanced, tile)
    C.ring_attention_backward(dy, cache, comm)
    tiles = sum(e.flops for e in comm.tracer.events if e.name.endswith("ring.forward")) / \
        (4 * width * tile * tile)
    return list(comm.tracer.events), tiles


def ring_vs_ulysses_rows(cluster) -> list[dict]:
    """One attention layer's forward + backward time, ring against Ulysses
    (Jacobs et al. 2023), from the closed forms (tested equal to the simulated
    clock), for ``h`` = 4096, 16-bit, over sequence lengths and ``cp``."""
    from . import formulas
    rows, h, tile = [], 4096, 128
    for cp in (2, 4, 8, 16, 32):
        link = cluster.link(range(cp))
        for e in range(11, 21):
            s = 2 ** e
            if s % (2 * cp * tile):
                continue
            ring = sum(formulas.ring_attention_time(1, s, h, cp, tile, cluster.device.flops,
                                                    link))
            uly = sum(formulas.ulysses_attention_time(1, s, h, cp, tile, cluster.device.flops,
                                                      link))
            n = s // tile
            compute = 3 * 4.0 * h * tile * tile * (n * (n + 1) // 2) / cp / cluster.device.flops
            rows.append({"cp": cp, "s": s, "ring": ring, "ulysses": uly, "compute": compute,
                         "link": link.name})
    return rows


# ============================================================== pipelines
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


def corpus_batches(cfg: GPTConfig, m: int, batch: int, seed: int = 0):
    """``m`` micro-batches of ``batch`` rows: two lists ``xs``, ``ys``."""
    x, y = corpus_batch(m * batch, cfg.seq_len, seed)
    return list(x.reshape(m, batch, -1)), list(y.reshape(m, batch, -1))


def pipeline_step(comm: Comm, name: str, m: int, v: int, cfg: GPTConfig, sizes, xs, ys,
                  dtype=np.float64, seed: int = 0):
    """Build the model (same seed on every rank), cut it, run one step of schedule
    ``name``; returns ``(StepResult, stages, every rank's records)``."""
    from .parallel.pipeline import (PipelineStage, gather_records, make_schedule, partition,
                                    run_schedule)
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
    """The loss and gradients of one device on all micro-batches at once."""
    ref = GPT(cfg, seed=seed)
    loss = ref.loss(np.concatenate(xs), np.concatenate(ys), key="ref")
    return loss, ref.gradients()


def stage_errors(res, stages, ref_loss, ref_grads) -> dict:
    """Relative error of the loss (on the last stage) and of every gradient of
    this rank's stages against the reference (NaN or inf: ``inf``)."""
    errs = {}
    for st in stages.values():
        errs.update(testing.compare(st.gradients(), ref_grads))
    if res.loss is not None:
        errs["loss"] = testing.rel_error(res.loss, ref_loss)
    return errs


def max_error(res, stages, ref_loss, ref_grads) -> float:
    """The largest of :func:`stage_errors` (``inf`` for any NaN)."""
    return testing.worst(stage_errors(res, stages, ref_loss, ref_grads))


def measured_bubble(name: str, records, p: int, m: int, v: int) -> tuple[float, float]:
    """(simulated bubble fraction, the papers' formula) of one step."""
    from .formulas import bubble_fraction
    from .parallel.pipeline import stage_times, summarize
    t = stage_times(records)
    times = {k: t.get((0, k), 0.0) for k in ("F", "I", "W")}
    return summarize(records, "sim").bubble_fraction, bubble_fraction(name, p, m, v, times)


# ===================================================== tensor parallelism
#: the tensor-parallel check's rows: (label, parameter-name parts; None: logits/loss)
GRAD_GROUPS = (("logits", None), ("loss", None), ("embedding grads", ("wte", "wpe")),
          ("attention grads", (".attn.",)), ("MLP grads", (".mlp.",)),
          ("LayerNorm grads", (".ln1.", ".ln2.", "ln_f.")), ("head grads", ("lm_head.",)))


def tensor_parallel_errors(comm: Comm, seq: int, batch: int, d_model: int, n_head: int,
                           n_layer: int) -> tuple[dict, list]:
    """One step of a GPT cut over ``comm`` by tensor parallelism (Megatron-LM), with
    and without sequence parallelism, against the single-device step: the worst
    relative error per :data:`GRAD_GROUPS` row (``{"tp": {...}, "tp+sp": {...}}``,
    this rank's); and the traced events of the tp step."""
    from .parallel.tensor import ParallelGPT
    cfg = GPTConfig(vocab_size(), seq, n_layer, n_head, d_model)
    idx, tgt = corpus_batch(batch, seq)
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
        for group, keys in GRAD_GROUPS[2:]:
            names = [n for n in ref_grads if any(n.startswith(k) or k in n for k in keys)]
            col[group] = testing.worst([grad_errors[n] for n in names])
        errors["tp+sp" if sp else "tp"] = col
    return errors, step_events


def _tp_group(comm: Comm, t: int) -> Comm | None:
    """Split the world into groups of ``t`` consecutive ranks (named "tp")."""
    groups = comm.size // t
    color = comm.rank // t if comm.rank < groups * t else groups
    tp = comm.split(color, comm.rank, name="tp")
    return tp if color < groups else None


def _one_layer(tp: Comm, module, x, dy) -> tuple[float, int]:
    """Ring bytes of one forward + backward of ``module``, and the activation
    bytes it saved, from the tracer and the memory ledger."""
    from .parallel.tensor import ring_bytes
    mark, ledger = len(tp.tracer.events), tp.tracer.memory
    before = ledger.current.get("activations", 0)
    module.forward(x)
    saved = ledger.current["activations"] - before
    module.backward(dy)
    sent = sum(ring_bytes(e) for e in tp.tracer.events[mark:]
               if e.category == "comm" and e.group == tp.name)
    return sent, saved


def layer_bytes_and_memory(comm: Comm, b: int, s: int, h: int, heads: int) -> list[dict]:
    """For every tp size dividing the world: one layer's bytes sent (ring model)
    and activation bytes saved, for a block (tp, tp+sp) and an MLP (Megatron,
    naive); float64.  Rows ``{"t", "tp bytes", "tp saved", "tp+sp bytes", ...}``."""
    from .nn import MLP, TransformerBlock
    from .parallel.tensor import NaiveTensorParallelMLP, ParallelMLP, ParallelTransformerBlock
    from .parallel.tensor.mappings import split_along
    rows = []
    rng = np.random.default_rng(7)
    with trace.untraced():
        block = TransformerBlock(h, heads, rng=rng)
        mlp = MLP(h, rng=rng)
    x = rng.standard_normal((b, s, h))
    for t in [t for t in range(1, comm.size + 1) if comm.size % t == 0]:
        tp = _tp_group(comm, t)
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


# ========================================================= recomputation
def layer_activation_bytes(comm: Comm, b: int, s: int, h: int, a: int, sp: bool,
                           mode: str) -> int:
    """Activation bytes the ledger holds after one float64 layer's forward on
    this rank (tensor parallelism over ``comm``, recompute ``mode``)."""
    from .nn import TransformerBlock
    from .parallel.tensor import ParallelTransformerBlock
    blk = TransformerBlock(h, a, 4 * h, rng=0)
    tp = comm.split(0, comm.rank, name="tp")
    par = ParallelTransformerBlock.from_reference(blk, tp, sp)
    par.set_recompute(mode)
    x = np.random.default_rng(1).standard_normal((b, s // tp.size if sp else s, h))
    led = comm.tracer.memory
    before = led.current.get("activations", 0)
    par.forward(x, key=0)
    saved = led.current["activations"] - before
    par.clear_saved()
    return saved


def recompute_rows(b: int, s: int, h: int, a: int, tps=(1, 2, 4, 8)) -> list[dict]:
    """The ledger's activation bytes of one layer beside the formula
    (:func:`simpar.parallel.tensor.activation_elements`, 8-byte elements) for
    every ``t``, with and without sequence parallelism, recompute none /
    selective / full: rows ``{"t", "sp", "recompute", "ledger", "formula"}``."""
    from .comm import launch
    from .parallel.tensor import activation_elements
    rows = []
    for t in tps:
        for sp in (False, True):
            for mode in ("none", "selective", "full"):
                got = launch(lambda c: layer_activation_bytes(c, b, s, h, a, sp, mode), t)[0]
                want = 8 * activation_elements(b, s, h, a, t, sequence_parallel=sp,
                                               recompute=mode)
                rows.append({"t": t, "sp": sp, "recompute": mode, "ledger": got,
                             "formula": want})
    return rows
