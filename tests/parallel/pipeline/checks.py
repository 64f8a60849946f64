"""Pipeline checks written once as functions of ``comm``: run by pytest on the
threads backend and by ``scripts/run_checks.py`` under ``mpiexec``."""
from __future__ import annotations

import numpy as np

from simpar import sim
from simpar.nn import GPT, GPTConfig
from simpar.parallel.pipeline import (PipelineStage, make_schedule, partition, run_schedule,
                                      stages_for_rank)
from simpar.testing import TOL, compare, rel_error, worst

V_INTERLEAVED = 2


def tiny_config(n_layer: int, vocab: int = 11, seq: int = 5, h: int = 8, d_ff: int = 12):
    return GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=n_layer, n_head=2, d_model=h,
                     d_ff=d_ff)


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Random parameters everywhere (biases and LayerNorms too), same on every rank."""
    return GPT(cfg, seed=seed).init_random_(np.random.default_rng(seed + 100), std=0.3)


def micro_batches(cfg: GPTConfig, m: int, b: int | list = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = b if isinstance(b, list) else [b] * m
    xs = [rng.integers(0, cfg.vocab_size, size=(n, cfg.seq_len)) for n in sizes]
    ys = [rng.integers(0, cfg.vocab_size, size=(n, cfg.seq_len)) for n in sizes]
    return xs, ys


def reference(cfg, xs, ys, seed: int = 0):
    """Loss and gradients of one process on all micro-batches as one batch."""
    ref = make_model(cfg, seed)
    loss = ref.loss(np.concatenate(xs), np.concatenate(ys), key="ref")
    return loss, ref.gradients()


def layer_split(n_stages: int, n_layer: int, how: str):
    """``how``: ``even`` (by layer count), ``params`` or ``front`` (an explicit
    uneven split with the extra layers on the first stage)."""
    if how == "front":
        return [n_layer - n_stages + 1] + [1] * (n_stages - 1)
    return "layers" if how == "even" else "params"


def check_equivalence(comm, name: str, m: int, n_layer: int, split: str = "even",
                      b=2, clobber: bool = True, seed: int = 0,
                      inject: tuple[str, float] | None = None) -> float:
    """Loss and every gradient of this rank's stages vs the reference; returns the
    max relative error (asserts it is <= 1e-10).  ``inject=(name, value)`` is the
    negative control: one element of gradient ``name`` (on the rank that holds
    it) is replaced by ``value`` (NaN, inf) before the comparison, which must fail."""
    v = V_INTERLEAVED if name == "interleaved" else 1
    sch = make_schedule(name, comm.size, m, v)
    cfg = tiny_config(n_layer)
    xs, ys = micro_batches(cfg, m, b, seed)
    ref_loss, ref_grads = reference(cfg, xs, ys, seed)
    model = make_model(cfg, seed)
    stages = stages_for_rank(model, sch, comm.rank, layer_split(sch.n_stages, n_layer, split))
    res = run_schedule(comm, sch, stages, xs, ys, clobber_buffers=clobber)
    grads = {k: g for st in stages.values() for k, g in st.gradients().items()}
    if inject is not None and inject[0] in grads:
        bad = np.array(grads[inject[0]], dtype=np.float64)
        bad.flat[bad.size // 2] = inject[1]
        grads[inject[0]] = bad
    errs = compare(grads, ref_grads)
    if res.loss is not None:
        errs["loss"] = rel_error(res.loss, ref_loss)
    bad = [k for k, e in errs.items() if not e <= TOL]          # NaN-aware: NaN fails
    assert not bad, f"{name} p={comm.size} m={m} {split}: " + \
        ", ".join(f"{k} error {errs[k]:.2e}" for k in bad)
    # every parameter is covered exactly once across the ranks
    names = sorted(k for st in stages.values() for k in st.parameters())
    every = comm.gather_objects(names)
    flat = sorted(k for r in every for k in r)
    assert flat == sorted(model.parameters()), "stages do not cover the model exactly once"
    return worst(errs)


def equivalence_cases(p: int) -> list[tuple]:
    """(schedule, m, n_layer, split) for a pipeline of p ranks: every schedule,
    m in {1, 2, 3, 4, 8} where allowed, even and uneven splits."""
    cases = []
    for name in ("naive", "gpipe", "1f1b", "zb-h1", "interleaved"):
        stages = p * (V_INTERLEAVED if name == "interleaved" else 1)
        for m in (1, 2, 3, 4, 8):
            if name == "interleaved" and m % p:
                continue
            split = ("even", "front", "params")[(m + len(name)) % 3]
            n_layer = stages + 1 + (m % 2)          # never a multiple: uneven stages
            cases.append((name, m, n_layer, split))
    return cases


# ----------------------------------------------------------- bad input, no hang
def check_errors(comm) -> list[str]:
    """Each bad configuration raises a clear ValueError on every rank before any
    message; returns the messages (the caller checks nothing hung)."""
    p = comm.size
    msgs = []
    cfg = tiny_config(2 * p)
    xs, ys = micro_batches(cfg, 5)
    # interleaved with m not a multiple of p
    try:
        make_schedule("interleaved", p, p + 1, 2)
    except ValueError as e:
        assert f"m={p + 1}" in str(e) and f"p={p}" in str(e), e
        msgs.append(str(e))
    else:
        raise AssertionError("interleaved with m % p != 0 accepted")
    # more stages than layers
    if p > 1:
        try:
            stages_for_rank(make_model(tiny_config(p - 1)), make_schedule("1f1b", p, 2), comm.rank)
        except ValueError as e:
            assert f"n_layer={p - 1}" in str(e) and f"{p} pipeline stages" in str(e), e
            msgs.append(str(e))
        else:
            raise AssertionError("more stages than layers accepted")
    # fewer micro-batches than stages: works (1F1B, GPipe, ZB-H1), checked for equality
    for name in ("1f1b", "gpipe", "zb-h1"):
        check_equivalence(comm, name, 1, p + 1)
    # wrong number of micro-batches for the schedule
    sch = make_schedule("1f1b", p, 4)
    model = make_model(cfg)
    stages = stages_for_rank(model, sch, comm.rank)
    try:
        run_schedule(comm, sch, stages, xs[:3], ys[:3])
    except ValueError as e:
        assert "m=4" in str(e), e
        msgs.append(str(e))
    else:
        raise AssertionError("wrong micro-batch count accepted")
    # a schedule for another pipeline size
    try:
        run_schedule(comm, make_schedule("gpipe", p + 1, 4), stages, xs[:4], ys[:4])
    except ValueError as e:
        assert f"p={p + 1}" in str(e), e
        msgs.append(str(e))
    else:
        raise AssertionError("schedule for another world size accepted")
    # a broken schedule (a receive dropped) is refused before any message
    from simpar.parallel.pipeline import ScheduleError
    if p > 1:
        broken = make_schedule("1f1b", p, 4)
        broken.actions[1] = [a for a in broken.actions[1] if a.kind != "RECV_F"]
        try:
            run_schedule(comm, broken, stages, xs[:4], ys[:4])
        except ScheduleError as e:
            msgs.append(str(e))
        else:
            raise AssertionError("broken schedule accepted")
    # the stages must still be usable: nothing was sent, nothing left half-done
    for st in stages.values():
        assert st.saved_keys() == [], st.saved_keys()
    return msgs


# ------------------------------------------------------- the simulated clock
def uniform_config(p: int, v: int = 1, k: int = 2, b: int = 1):
    """A GPT whose ``p·v`` stages all cost the same on the simulated clock: the
    last stage has one block less and the LM head, and ``vocab = 4h + 2·d_ff + 2s``
    makes the head's FLOPs ``2bsh·vocab`` equal one block's
    ``2bs(4h² + 2h·d_ff) + 4bs²h`` (forward, and backward = 2 × forward for both).
    Returns (config, layer counts per stage)."""
    h, d_ff, s = 8, 12, 4
    n = p * v
    cfg = GPTConfig(vocab_size=4 * h + 2 * d_ff + 2 * s, seq_len=s, n_layer=n * k - 1,
                    n_head=2, d_model=h, d_ff=d_ff)
    return cfg, [k] * (n - 1) + [k - 1]


def exact_cluster(cluster=None):
    """Device FLOP/s a power of two: every duration is a dyadic rational, so sums of
    simulated times are exact and bubble formulas can be checked with ``==``."""
    base = cluster or sim.ideal_cluster()
    return sim.ClusterSpec(base.name, sim.DeviceSpec("2^40 FLOP/s", 2.0 ** 40), base.intra,
                           base.inter, base.devices_per_node)


def run_uniform(comm, name: str, m: int, v: int = 1, b: int = 1):
    """One step of a uniform-stage GPT; returns this rank's StepResult."""
    cfg, sizes = uniform_config(comm.size, v)
    sch = make_schedule(name, comm.size, m, v)
    model = make_model(cfg)
    xs, ys = micro_batches(cfg, m, b)
    bounds = partition(model, sch.n_stages, sizes)
    stages = {s: PipelineStage(model, s, sch.n_stages, r) for s, r in enumerate(bounds)
              if sch.rank_of(s) == comm.rank}
    comm.tracer.reset()                     # every rank's clock starts the step at 0
    return run_schedule(comm, sch, stages, xs, ys)
