"""The reference training run: one process, one model, no parallelism.

Everything parallel in simpar is checked against this loop::

    text  -> CharTokenizer -> ids -> (train, val)
    repeat: x, y = get_batch(train)          # y is x shifted by one
            model.zero_grad()
            loss = model.loss(x, y)          # forward + cross-entropy + backward
            opt.step(model.gradients())      # AdamW, in place

Run it from the shell (``python -m simpar.train``) or call
:func:`train_reference`; with the default configuration a character-level GPT
goes from ``ln(vocab) = ln 66 ~ 4.19`` nats to about 1.5 nats (train and
validation) in 500 steps, about 12 s on one core.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import runtime
from .data import CharTokenizer, get_batch, load_corpus, train_val_split
from .optim import AdamW, clip_grad_norm

__all__ = ["DEFAULT_MODEL", "default_config", "train_reference", "evaluate", "sample",
           "train", "build_reference"]

#: The default reference model: small enough for a laptop core, big enough to learn words.
DEFAULT_MODEL = dict(seq_len=64, n_layer=2, n_head=4, d_model=64)


def default_config(vocab_size: int, **overrides):
    """A ``GPTConfig`` for the reference run (``DEFAULT_MODEL`` plus ``overrides``)."""
    from .nn import GPTConfig
    kw = dict(DEFAULT_MODEL)
    kw.update(overrides)
    return GPTConfig(vocab_size=vocab_size, **kw)


def _resolve_config(config, vocab_size: int):
    from .nn import GPTConfig
    if config is None:
        return default_config(vocab_size)
    if isinstance(config, dict):
        kw = dict(config)
        if kw.setdefault("vocab_size", vocab_size) != vocab_size:
            raise ValueError(f"config vocab_size={kw['vocab_size']} does not match the "
                             f"tokenizer's vocab_size={vocab_size}")
        return default_config(**kw)
    if isinstance(config, GPTConfig):
        if config.vocab_size != vocab_size:
            raise ValueError(f"config vocab_size={config.vocab_size} does not match the "
                             f"tokenizer's vocab_size={vocab_size}")
        return config
    raise TypeError(f"config must be None, a dict or a GPTConfig, got {type(config).__name__}")


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_lr_frac * lr``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if steps <= warmup + 1:
        return lr
    progress = (step - warmup) / (steps - warmup - 1)
    return lr * (min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def evaluate(model, ids: np.ndarray, batch_size: int, n_batches: int = 8, seed: int = 1234) -> float:
    """Mean cross-entropy of ``model`` on ``n_batches`` fixed random batches of ``ids``.

    Forward only (no gradient is touched); the batches depend only on ``seed``,
    so two models are compared on the same text.
    """
    seq_len = model.config.seq_len
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_batches):
        x, y = get_batch(ids, batch_size, min(seq_len, len(ids) - 1), rng)
        total += float(model.eval_loss(x, y))
    return total / n_batches


def train_reference(config=None, steps: int = 500, batch_size: int = 16, lr: float = 5e-3,
                    seed: int = 0, log_every: int = 0, dtype=np.float32, *,
                    weight_decay: float = 0.0, warmup: int = 10, min_lr_frac: float = 0.1,
                    grad_clip: float | None = 1.0, corpus: str = "corpus",
                    val_frac: float = 0.1, eval_batches: int = 8, log=print) -> dict:
    """Train a character-level GPT on the shipped corpus with AdamW; return the history.

    Parameters
    ----------
    config : ``GPTConfig``, dict of its fields, or ``None`` for ``DEFAULT_MODEL``.
        ``vocab_size`` is taken from the tokenizer.
    steps, batch_size, lr : the run; the learning rate warms up linearly for
        ``warmup`` steps, then decays with a cosine to ``min_lr_frac * lr``.
    seed : model initialisation and batch sampling; the same seed gives a
        bit-identical loss history.
    log_every : print a line every ``log_every`` steps (0: silent).
    dtype : parameter dtype (float32 for speed, float64 for comparisons).
    grad_clip : clip the global gradient norm to this value (``None``: off).

    Returns
    -------
    dict with ``loss`` (one float per step), ``lr`` (per step), ``grad_norm``,
    ``initial_loss``, ``final_loss`` (mean of the last 10 steps), ``val_loss``
    (after training), ``ln_vocab``, ``seconds``, ``tokens``, and the objects
    ``config``, ``tokenizer``, ``model``, ``optimizer``.
    """
    from .nn import GPT
    for name, v, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                         ("log_every", log_every, 0)):
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {name}={v!r}")
    text = load_corpus(corpus)
    tok = CharTokenizer(text)
    train_ids, val_ids = train_val_split(tok.encode(text), 1.0 - val_frac)
    cfg = _resolve_config(config, tok.vocab_size)
    model = GPT(cfg, seed=seed, dtype=dtype)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = dict(steps=steps, lr=lr, warmup=warmup, min_lr_frac=min_lr_frac)
    with runtime.one_blas_thread_per_device():          # one device: one BLAS thread
        hist = _reference_loop(model, opt, train_ids, batch_size, seed, grad_clip, schedule,
                               log_every, log)
        val_loss = evaluate(model, val_ids, batch_size, eval_batches) if eval_batches \
            else float("nan")
    if log_every:
        log(f"val loss {val_loss:.4f} (ln vocab = {math.log(tok.vocab_size):.4f}) "
            f"after {steps} steps in {hist['seconds']:.1f} s")
    return {**hist, "initial_loss": hist["loss"][0],
            "final_loss": float(np.mean(hist["loss"][-10:])), "val_loss": val_loss,
            "ln_vocab": math.log(tok.vocab_size), "tokens": steps * batch_size * cfg.seq_len,
            "config": cfg, "tokenizer": tok, "model": model, "optimizer": opt}


def _reference_loop(model, opt, train_ids, batch_size: int, seed: int, grad_clip,
                    schedule: dict, log_every: int, log) -> dict:
    """The loop of :func:`train_reference`: ``loss``, ``lr``, ``grad_norm`` per
    step and ``seconds``."""
    grads = model.gradients()
    rng = np.random.default_rng(seed)
    hist: dict = {"loss": [], "lr": [], "grad_norm": []}
    t0 = time.perf_counter()
    for step in range(schedule["steps"]):
        x, y = get_batch(train_ids, batch_size, model.config.seq_len, rng)
        model.zero_grad()
        loss = float(model.loss(x, y))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step} (lr={schedule['lr']})")
        hist["grad_norm"].append(clip_grad_norm(grads, grad_clip) if grad_clip else float("nan"))
        opt.lr = _lr_at(step, **schedule)
        opt.step(grads)
        hist["loss"].append(loss)
        hist["lr"].append(opt.lr)
        if log_every and (step % log_every == 0 or step == schedule["steps"] - 1):
            log(f"step {step:5d} | loss {loss:.4f} | lr {opt.lr:.2e} | "
                f"{time.perf_counter() - t0:6.1f} s")
    hist["seconds"] = time.perf_counter() - t0
    return hist


def sample(model, tokenizer: CharTokenizer, prompt: str = "\n", n: int = 200,
           temperature: float = 1.0, seed: int = 0) -> str:
    """Continue ``prompt`` by ``n`` characters drawn from the model (forward only)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")
    rng = np.random.default_rng(seed)
    ids = list(tokenizer.encode(prompt)) or [0]
    seq_len = model.config.seq_len
    key = "__sample__"
    for _ in range(n):
        ctx = np.array(ids[-seq_len:], dtype=np.int64)[None, :]
        try:
            logits = model.forward(ctx, key=key)
        finally:
            model.clear_saved(key)
        z = np.asarray(logits[0, -1], dtype=np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        ids.append(int(rng.choice(len(p), p=p)))
    return tokenizer.decode(ids[len(prompt):] if prompt else ids[1:])


# ================================================================ any layout
def build_reference(vocab_size: int, seed: int = 0, dtype=np.float32, moe_experts: int = 0,
                    moe_k: int = 1, groups: int = 1, **overrides):
    """The reference model of a run: ``DEFAULT_MODEL`` (plus ``overrides``), a GPT
    or — with ``moe_experts`` > 0 — an MoE GPT (``groups``: its routing groups)."""
    from .nn import GPT
    from .nn.moe_gpt import MoEGPT, MoEGPTConfig
    cfg = default_config(vocab_size, **overrides)
    if moe_experts:
        from dataclasses import asdict as _asdict
        cfg = MoEGPTConfig(**_asdict(cfg), n_experts=moe_experts, top_k=moe_k, groups=groups)
        return MoEGPT(cfg, seed=seed, dtype=dtype)
    return GPT(cfg, seed=seed, dtype=dtype)


@dataclass(frozen=True)
class TrainOptions:
    """Every hyper-parameter of :func:`train` (its keyword arguments but ``log``):
    what the ranks of a run must agree on."""
    steps: int = 500
    batch_size: int = 16
    micro_batches: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    moe_experts: int = 0
    moe_k: int = 1
    lr: float = 5e-3
    seed: int = 0
    dtype: Any = np.float32
    weight_decay: float = 0.0
    warmup: int = 10
    min_lr_frac: float = 0.1
    grad_clip: float | None = 1.0
    overlap: bool = False
    bucket_bytes: int = 1 << 20
    model: dict | None = None
    corpus: str = "corpus"
    log_every: int = 0
    attention: str = "ring"
    zero: int = 0
    save: str | None = None
    save_every: int = 0
    resume: str | None = None
    recompute: str = "none"
    precision: str | None = None
    loss_scaling: bool = True

    @property
    def half(self) -> bool:
        """A 16-bit model (bf16/fp16) with float32 masters."""
        from .nn.precision import is_half, precision_dtype
        return self.precision is not None and is_half(precision_dtype(self.precision))

    @property
    def param_dtype(self):
        from .nn.precision import precision_dtype
        return precision_dtype(self.precision) if self.precision is not None else self.dtype

    def lr_schedule(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "warmup": self.warmup,
                "min_lr_frac": self.min_lr_frac}


def train(comm, layout, *, steps: int = 500, batch_size: int = 16, micro_batches: int = 1,
          schedule: str = "1f1b", sequence_parallel: bool = False, moe_experts: int = 0,
          moe_k: int = 1, lr: float = 5e-3, seed: int = 0, dtype=np.float32,
          weight_decay: float = 0.0, warmup: int = 10, min_lr_frac: float = 0.1,
          grad_clip: float | None = 1.0, overlap: bool = False, bucket_bytes: int = 1 << 20,
          model: dict | None = None, corpus: str = "corpus", log_every: int = 0,
          attention: str = "ring",
          zero: int = 0, save: str | None = None, save_every: int = 0,
          resume: str | None = None, recompute: str = "none", precision: str | None = None,
          loss_scaling: bool = True, log=print) -> dict:
    """Train on ``layout`` (a :class:`~simpar.comm.mesh.ParallelConfig`): every rank of
    ``comm`` calls this.  ``batch_size`` is the **global** batch, so every layout
    trains the same model on the same data and — for a dense GPT — prints the
    same losses as :func:`train_reference` (to rounding).  Rank 0 logs.  The ranks
    must pass equal options (:class:`TrainOptions`): they are checked with
    ``comm.agree`` before any other message, and ranks that differ get a
    ``ValueError`` naming each rank's options.

    Returns (on every rank) ``loss`` per step, ``sim_step`` (simulated seconds per
    step), ``seconds``, ``tokens_per_s``, and ``model`` (this rank's
    :class:`~simpar.parallel.hybrid.HybridModel`).  The tracer is reset before
    the last step, so it holds that step's events (for a timeline).

    ``attention``: the context-parallel scheme when ``layout.cp > 1``, ``"ring"``
    (load-balanced ring attention) or ``"ulysses"`` (:mod:`simpar.parallel.context`).
    ``zero``: ZeRO stage 0-3 of the optimizer (:mod:`simpar.parallel.zero`).
    ``save``: a checkpoint root (:mod:`simpar.checkpoint`), written every
    ``save_every`` steps and after the last; ``resume``: a checkpoint to continue
    from (any layout, any ZeRO stage) — step, learning-rate schedule position and
    the data sampler's RNG state come back with it, so the losses continue those
    of an uninterrupted run.  ``recompute``: activation recomputation ``"none"``,
    ``"selective"`` or ``"full"`` (Korthikanti et al. 2022, §5; same losses).
    ``precision``: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` — a 16-bit model with float32
    master weights and optimizer state (:mod:`simpar.mixed_precision`; fp16 with
    dynamic loss scaling unless ``loss_scaling=False``); overrides ``dtype``.
    The result also has ``mfu`` / ``hfu`` (model / hardware FLOPs utilisation of the
    last step, this machine and simulated), ``skipped`` (steps skipped on overflow),
    ``loss_scale`` and ``zero_grads``: per step, the fractions of gradient elements
    that are 0 and that are below the dtype's normal range (:func:`underflow`)."""
    o = TrainOptions(steps=steps, batch_size=batch_size, micro_batches=micro_batches,
                     schedule=schedule, sequence_parallel=sequence_parallel,
                     moe_experts=moe_experts, moe_k=moe_k, lr=lr, seed=seed, dtype=dtype,
                     weight_decay=weight_decay, warmup=warmup, min_lr_frac=min_lr_frac,
                     grad_clip=grad_clip, overlap=overlap, bucket_bytes=bucket_bytes,
                     model=model, corpus=corpus, log_every=log_every, attention=attention,
                     zero=zero, save=save, save_every=save_every, resume=resume,
                     recompute=recompute, precision=precision, loss_scaling=loss_scaling)
    check_options(o, layout)
    comm.agree("training loop", (layout, o))      # before any other message
    log = log if comm.rank == 0 else (lambda *a, **k: None)
    hybrid, tok, train_ids = _build(comm, layout, o)
    opt = _optimizer(comm, hybrid, o)
    rng = np.random.default_rng(o.seed)
    start = _resume(hybrid, opt, rng, o, log)
    hist = _loop(comm, hybrid, opt, rng, train_ids, start, o, log)
    return _result(comm, hybrid, opt, tok, start, hist, o, log)


def _result(comm, hybrid, opt, tok, start: int, hist: dict, o: TrainOptions, log) -> dict:
    """:func:`train`'s result, with the last step's MFU / HFU (logged)."""
    tokens = (o.steps - start) * o.batch_size * hybrid.config.seq_len
    util = utilization(comm, hybrid, o.batch_size, hist["wall"][-1], hist["sim"][-1]) \
        if hist["wall"] else {}
    if util and o.log_every:
        log(f"MFU {util['mfu_machine']:.1%} HFU {util['hfu_machine']:.1%} of this machine "
            f"({util['core_flops'] / 1e9:.0f} GFLOP/s per device); simulated "
            f"({comm.tracer.cluster.name}): MFU {util['mfu_sim']:.1%} HFU {util['hfu_sim']:.1%}")
    scaled = o.half and o.zero == 0                  # MixedPrecisionOptimizer's own scaler
    return {"loss": hist["loss"], "sim_step": hist["sim"], "seconds": hist["seconds"],
            "tokens": tokens, "tokens_per_s": tokens / hist["seconds"], "model": hybrid,
            "tokenizer": tok, "start_step": start, "optimizer": opt, **util,
            "skipped": opt.scaler.skipped if scaled else 0,
            "loss_scale": opt.loss_scale if scaled else 1.0, "zero_grads": hist["zero_grads"]}


def check_options(o: TrainOptions, layout) -> None:
    """Every rank's own check of :func:`train`'s options, before any message."""
    from .parallel.zero import check_zero
    if o.half and o.moe_experts:
        raise ValueError(f"precision={o.precision!r} with MoE layers (moe_experts="
                         f"{o.moe_experts}) is not supported yet: the router runs in the "
                         "model dtype")
    if o.half and (o.save or o.resume or (o.zero and o.precision != "bf16")):
        raise ValueError(f"precision={o.precision!r} with --save/--resume, or fp16 (loss "
                         f"scaling) with ZeRO, is not supported yet (zero={o.zero}, "
                         f"save={o.save!r}, resume={o.resume!r})")
    check_zero(o.zero, layout, moe=bool(o.moe_experts), sequence_parallel=o.sequence_parallel,
               overlap=o.overlap)
    if isinstance(o.save_every, bool) or not isinstance(o.save_every, (int, np.integer)) \
            or o.save_every < 0 or (o.save_every and not o.save):
        raise ValueError(f"save_every must be an integer >= 0 (with save=DIR), got "
                         f"save_every={o.save_every!r}, save={o.save!r}")
    for name in ("steps", "batch_size", "micro_batches"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={v!r}")
    if o.batch_size % (layout.dp * o.micro_batches):
        raise ValueError(f"batch_size={o.batch_size} (global) is not divisible by "
                         f"dp={layout.dp} x micro_batches={o.micro_batches} = "
                         f"{layout.dp * o.micro_batches}")


def _build(comm, layout, o: TrainOptions):
    """The corpus, the reference model cut over ``layout``: ``(hybrid, tok, train_ids)``."""
    from .comm.mesh import Mesh
    from .parallel.hybrid import build_model
    text = load_corpus(o.corpus)
    tok = CharTokenizer(text)
    train_ids, _ = train_val_split(tok.encode(text), 0.9)
    ref = build_reference(tok.vocab_size, o.seed, o.param_dtype, o.moe_experts, o.moe_k,
                          groups=layout.dp * o.micro_batches, **(o.model or {}))
    hybrid = build_model(ref, Mesh(comm, layout), schedule=o.schedule,
                         sequence_parallel=o.sequence_parallel, context_parallel=o.attention,
                         overlap=o.overlap, bucket_bytes=o.bucket_bytes, recompute=o.recompute)
    return hybrid, tok, train_ids


def _optimizer(comm, hybrid, o: TrainOptions):
    """AdamW, sharded by ZeRO stage ``o.zero``; 16-bit: over float32 masters."""
    from .parallel.zero import DistributedOptimizer
    if o.half and o.zero:           # bf16 + ZeRO: the shards' float32 masters + moments
        return DistributedOptimizer(hybrid, o.zero, "adamw-mp", lr=o.lr,
                                    weight_decay=o.weight_decay, comm=comm)
    if o.half:                      # 16-bit model, float32 masters, agreed overflow checks
        from . import trace as _trace
        from .mixed_precision import MixedPrecisionOptimizer, default_scaler
        params = hybrid.parameters()
        _trace.alloc("params", sum(p.nbytes for p in params.values()))
        _trace.alloc("grads", sum(p.nbytes for p in params.values()))
        return MixedPrecisionOptimizer(params, "adamw", comm=comm, lr=o.lr,
                                       weight_decay=o.weight_decay,
                                       scaler=default_scaler(o.param_dtype, o.loss_scaling))
    return DistributedOptimizer(hybrid, o.zero, "adamw", lr=o.lr, weight_decay=o.weight_decay)


def _resume(hybrid, opt, rng, o: TrainOptions, log) -> int:
    """Load ``o.resume`` (model, optimizer, the sampler's RNG); the step to start at."""
    if not o.resume:
        return 0
    from . import checkpoint
    state = checkpoint.load(o.resume, hybrid, opt)
    if state.get("lr_schedule") != o.lr_schedule():
        raise ValueError(f"checkpoint {o.resume} was saved with learning-rate schedule "
                         f"{state.get('lr_schedule')}, this run has {o.lr_schedule()}")
    rng.bit_generator.state = state["data_rng"]        # the sampler's position
    log(f"resumed from {o.resume} at step {state['step']}")
    return int(state["step"])


def _loop(comm, hybrid, opt, rng, train_ids, start: int, o: TrainOptions, log) -> dict:
    """Steps ``start .. o.steps - 1``: losses, wall and simulated seconds per step."""
    from . import checkpoint
    scaled = o.half and o.zero == 0                  # MixedPrecisionOptimizer steps itself
    tracer = comm.tracer
    hist = {"loss": [], "sim": [], "wall": [], "zero_grads": []}
    t0 = time.perf_counter()
    for step in range(start, o.steps):
        x, y = get_batch(train_ids, o.batch_size, hybrid.config.seq_len, rng)  # same everywhere
        if step == o.steps - 1:
            tracer.reset()        # keep the last step's events only (clocks agree here)
        s0, w0 = tracer.sim_now, time.perf_counter()
        hybrid.zero_grad()
        loss = hybrid.step(x, y, o.micro_batches,
                           **({"loss_scale": opt.loss_scale} if scaled else {}))["loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step} (lr={o.lr})")
        opt.lr = _lr_at(step, o.steps, o.lr, o.warmup, o.min_lr_frac)
        if o.precision is not None:
            hist["zero_grads"].append(underflow(hybrid.gradients()))
        if scaled:
            opt.step(hybrid.gradients(), max_norm=o.grad_clip or None, norm=hybrid.grad_norm)
        else:
            if o.grad_clip:
                hybrid.clip_grad_norm(o.grad_clip)
            opt.step()
        hist["loss"].append(loss)
        hist["wall"].append(time.perf_counter() - w0)
        hist["sim"].append(tracer.sim_now - s0)
        if o.save and ((o.save_every and (step + 1) % o.save_every == 0) or step == o.steps - 1):
            checkpoint.save(o.save, hybrid, opt, {"step": step + 1, "lr_schedule": o.lr_schedule(),
                                                  "data_rng": rng.bit_generator.state}, step=step + 1)
        if o.log_every and (step % o.log_every == 0 or step == o.steps - 1):
            log(f"step {step:5d} | loss {loss:.4f} | "
                f"{x.size / (time.perf_counter() - w0):8.0f} tok/s | simulated step "
                f"{hist['sim'][-1] * 1e3:.3f} ms ({tracer.cluster.name}) | "
                f"{time.perf_counter() - t0:6.1f} s")
    hist["seconds"] = time.perf_counter() - t0
    return hist


def underflow(grads) -> tuple[float, float]:
    """``(zero, subnormal)``: the fractions of gradient elements that are exactly 0
    and that are nonzero but below the smallest normal number of their dtype
    (float16: 2⁻¹⁴ ≈ 6·10⁻⁵; precision is lost there, and under 2⁻²⁴ the value is
    flushed to 0 — Micikevicius et al. 2018, Fig. 3)."""
    from .nn.precision import BF16
    import ml_dtypes
    zeros = tiny = total = 0
    for g in grads.values():
        lim = float(ml_dtypes.finfo(g.dtype).tiny if g.dtype == BF16 else np.finfo(g.dtype).tiny)
        a = np.abs(g.astype(np.float32) if g.dtype == BF16 else g)
        z = int(g.size - np.count_nonzero(a))
        zeros, tiny, total = zeros + z, tiny + int(np.count_nonzero(a < lim)) - z, total + g.size
    return zeros / max(total, 1), tiny / max(total, 1)


def utilization(comm, hybrid, batch_size: int, wall_step: float, sim_step: float) -> dict:
    """Model and hardware FLOPs utilisation of the last step (Chowdhery et al. 2022,
    PaLM, appendix B; Korthikanti et al. 2022 §6.3):

    * MFU = model FLOPs / (time · devices · peak), model FLOPs = 3 × the forward's
      matmul FLOPs (:func:`simpar.formulas.layer_forward_flops` per layer + LM head)
      — what the model needs, whatever the implementation does;
    * HFU = hardware FLOPs / (time · devices · peak), hardware FLOPs = every compute
      region's FLOPs this step on every rank (the tracer), recomputation included.

    Recomputation raises HFU, not MFU.  "Machine": this machine's wall clock and its
    measured one-core float32 matmul peak per device; "sim": the simulated clock and
    the preset's device peak."""
    from . import formulas, sim
    c = hybrid.config
    tokens = batch_size * c.seq_len
    fwd = c.n_layer * formulas.layer_forward_flops(batch_size, c.seq_len, c.d_model, c.d_ff) + \
        formulas.linear_flops(tokens, c.d_model, c.vocab_size)
    model_flops = 3.0 * fwd
    mine = sum(e.flops for e in comm.tracer.events if e.category == "compute")
    hw_flops = float(comm.all_reduce(np.array([mine]))[0])
    n = comm.size
    core = sim.this_machine().device.flops
    dev = comm.tracer.cluster.device.flops
    return {"model_flops": model_flops, "hardware_flops": hw_flops, "core_flops": core,
            "mfu_machine": model_flops / (wall_step * n * core),
            "hfu_machine": hw_flops / (wall_step * n * core),
            "mfu_sim": model_flops / (sim_step * n * dev), "hfu_sim": hw_flops / (sim_step * n * dev)}


def parser():
    """``python -m simpar train``'s options."""
    from . import sim
    from .cli import Parser
    ap = Parser("python -m simpar train",
                "Train a character-level GPT on the shipped corpus on any layout dp x tp x pp "
                "(x ep, x cp): threads with the layout's world size, or the ranks of mpiexec.")
    add = ap.add_argument
    add("--dp", type=int, default=1, help="data-parallel degree")
    add("--tp", type=int, default=1, help="tensor-parallel degree")
    add("--pp", type=int, default=1, help="pipeline stages")
    add("--ep", type=int, default=1, help="expert-parallel degree (divides dp)")
    add("--vpp", type=int, default=1, help="model chunks per pipeline rank (interleaved)")
    add("--cp", type=int, default=1, help="context-parallel degree: the sequence split over "
        "cp ranks")
    add("--attention", default="ring", choices=("ring", "ulysses"),
        help="context-parallel attention with --cp > 1: ring (load-balanced ring attention) "
        "or ulysses (all-to-all over heads)")
    add("--schedule", default=None, choices=("naive", "gpipe", "1f1b", "interleaved", "zb-h1"),
        help="pipeline schedule (None: 1f1b, or interleaved when --vpp > 1)")
    add("--micro-batches", type=int, default=1, metavar="M", help="micro-batches per step")
    add("--sequence-parallel", action="store_true", help="sequence parallelism inside tp")
    add("--moe-experts", type=int, default=0, metavar="E",
        help="MoE layers with this many experts (0: dense)")
    add("--moe-k", type=int, default=1, metavar="K", help="experts per token (top-k)")
    add("--overlap", action="store_true", help="overlap gradient all-reduces with backward")
    add("--bucket-bytes", type=int, default=1 << 20, metavar="B", help="gradient bucket size")
    add("--steps", type=int, default=500, help="training steps")
    add("--batch-size", type=int, default=16, help="GLOBAL batch size (all replicas)")
    add("--lr", type=float, default=5e-3, help="peak learning rate")
    add("--seed", type=int, default=0, help="model and data seed")
    add("--log-every", type=int, default=25, metavar="N", help="print every N steps")
    add("--float64", action="store_true", help="train in float64 (else float32)")
    add("--cluster", default="a100", choices=sorted(sim.PRESETS),
        help="simulated cluster preset for the simulated clock")
    add("--out", default="out", help="folder for the loss curve and timeline (git-ignored)")
    add("--zero", type=int, default=0, choices=(0, 1, 2, 3),
        help="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters")
    add("--save", default=None, metavar="DIR", help="write sharded checkpoints into DIR")
    add("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps "
        "(and after the last; needs --save)")
    add("--resume", default=None, metavar="DIR", help="continue from the checkpoint in DIR "
        "(any layout, any ZeRO stage)")
    add("--recompute", default="none", choices=("none", "selective", "full"),
        help="activation recomputation: selective recomputes attention's softmax, full "
        "each layer's forward, in backward")
    add("--precision", default=None, choices=("fp32", "bf16", "fp16"),
        help="16-bit model (bf16 or fp16) with float32 master weights and Adam state; fp16 "
        "uses dynamic loss scaling (None: fp32, or fp64 with --float64)")
    add("--no-loss-scaling", action="store_true", help="fp16 without loss scaling (to see "
        "gradients underflow)")
    return ap


def main(argv=None) -> dict:
    from . import sim, viz
    from .comm import launch, launcher_size, run
    from .comm.mesh import ParallelConfig
    args = parser().parse_args(argv)
    layout = ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp,
                            cp=args.cp)
    schedule = args.schedule or ("interleaved" if args.vpp > 1 else "1f1b")
    cluster = sim.preset(args.cluster)
    kw = dict(steps=args.steps, batch_size=args.batch_size, micro_batches=args.micro_batches,
              schedule=schedule, sequence_parallel=args.sequence_parallel,
              attention=args.attention,
              moe_experts=args.moe_experts, moe_k=args.moe_k, lr=args.lr, seed=args.seed,
              dtype=np.float64 if args.float64 else np.float32, overlap=args.overlap,
              bucket_bytes=args.bucket_bytes, log_every=args.log_every, zero=args.zero,
              save=args.save, save_every=args.save_every, resume=args.resume,
              recompute=args.recompute, precision=args.precision,
              loss_scaling=not args.no_loss_scaling)

    def job(comm):
        out = train(comm, layout, **kw)
        events = comm.gather_objects(comm.tracer.events)        # the last step, every rank
        return {k: out.get(k) for k in ("loss", "sim_step", "seconds", "tokens_per_s", "mfu_machine",
                                        "hfu_machine", "mfu_sim", "hfu_sim", "skipped",
                                        "loss_scale", "zero_grads")} | \
            {"events": events if comm.rank == 0 else None}

    if launcher_size() > 1:
        results = run(job, cluster=cluster)
    else:
        print(layout.grid())
        results = launch(job, layout.world_size, cluster=cluster)
    out = results[0]
    if not out["loss"]:                          # resumed at the last step
        if init_rank() == 0:
            print(f"nothing to train: the checkpoint is at step {args.steps} of {args.steps}")
        return out
    if init_rank() == 0:
        label = f"dp{layout.dp} tp{layout.tp} pp{layout.pp} ep{layout.ep}" + \
            (f" cp{layout.cp} {args.attention}" if layout.cp > 1 else "")
        os.makedirs(args.out, exist_ok=True)
        viz.save(viz.loss_curves({label: out["loss"]}, "training loss"),
                 os.path.join(args.out, "train_loss.png"))
        viz.save(viz.timeline([e for r in out["events"] for e in r], f"last step, {label}"),
                 os.path.join(args.out, "train_timeline.png"))
        last = out["loss"][-10:]
        print(f"{label}: final loss {np.mean(last):.4f} (mean of the last {len(last)} steps), "
              f"{out['tokens_per_s']:.0f} tokens/s, simulated step "
              f"{out['sim_step'][-1] * 1e3:.3f} ms; figures in {args.out}/")
    return out


def init_rank() -> int:
    """This process's rank under mpiexec (0 otherwise)."""
    from .comm import init
    if init() == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_rank()
    return 0


if __name__ == "__main__":
    main()
