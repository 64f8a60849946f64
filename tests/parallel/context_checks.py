"""Context-parallel attention checks shared by the threads tests and the MPI script.

:func:`layer_errors` runs one :class:`~simpar.parallel.context.ContextParallelAttention`
(ring or Ulysses) over the whole world as the cp group, forward and backward,
and compares the gathered output, input gradient and summed parameter
gradients with the reference :class:`~simpar.nn.CausalSelfAttention`
(NaN-aware, :mod:`simpar.testing`).  :func:`error_case` returns each rank's
error message for a bad input, with the number of events recorded before it.
"""
from __future__ import annotations

import numpy as np

from simpar import trace
from simpar.nn import CausalSelfAttention
from simpar.parallel.context import (ContextParallelAttention, chunk_positions, gather_sequence,
                                     shard_sequence)
from simpar.testing import compare, rel_error

B, S, H, NH = 2, 24, 24, 12          # s divisible by 2·cp and heads by cp for cp = 2, 3, 4

# (scheme, balanced, tile size): tiles that do and do not divide the chunks
LAYER_CASES = [("ring", True, 4), ("ring", True, 5), ("ring", False, 3), ("ring", False, 64),
               ("ulysses", False, 5), ("ulysses", True, 4)]


def reference(seed: int = 0):
    rng = np.random.default_rng(seed)
    attn = CausalSelfAttention(H, NH, rng=rng).init_random_(rng, std=0.3)
    x = rng.standard_normal((B, S, H))
    dy = rng.standard_normal((B, S, H))
    return attn, x, dy


def layer_errors(comm, scheme: str, balanced: bool, block: int, seed: int = 0,
                 tamper=None, data_balanced: bool | None = None) -> dict[str, float]:
    """Errors of the cp layer on ``comm`` (every rank returns the same dict).
    ``data_balanced`` (negative controls): cut the data differently from the layer."""
    cut = balanced if data_balanced is None else data_balanced
    attn, x, dy = reference(seed)
    with trace.untraced():
        ref = CausalSelfAttention(H, NH)
        ref.load_state_dict(attn.state_dict())
        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
    layer = ContextParallelAttention.from_reference(attn, comm, scheme, balanced, block)
    P, r = comm.size, comm.rank
    xs = shard_sequence(x, P, r, cut)
    y = layer.forward(xs)
    g = shard_sequence(dy, P, r, cut)
    if tamper is not None:
        tamper(layer, g)
    dx = layer.backward(g)
    ys = comm.gather_objects((y, dx))
    grads = {n: comm.all_reduce(np.ascontiguousarray(a)) for n, a in layer.gradients().items()}
    err = {"y": rel_error(gather_sequence([p[0] for p in ys], cut), y_ref),
           "dx": rel_error(gather_sequence([p[1] for p in ys], cut), dx_ref)}
    err.update(compare(grads, ref.gradients()))
    return err


def positions_table(s: int, cp: int, balanced: bool) -> list[list[int]]:
    return [chunk_positions(s, cp, r, balanced).tolist() for r in range(cp)]


def error_case(comm, case: str) -> str:
    """``"<message> [events N]"`` for a bad input on this rank (N: events before it)."""
    n0 = len(comm.tracer.events)
    attn, x, _ = reference()
    try:
        if case == "seq not divisible by 2cp":
            shard_sequence(np.zeros((1, 2 * comm.size + 2, 4)), comm.size, comm.rank, True)
        elif case == "seq not divisible by cp":
            shard_sequence(np.zeros((1, comm.size + 1, 4)), comm.size, comm.rank, False)
        elif case == "heads not divisible by cp":
            bad = CausalSelfAttention(10, 5)
            ContextParallelAttention.from_reference(bad, comm, "ulysses")
        elif case == "ranks disagree on scheme":
            ContextParallelAttention.from_reference(attn, comm, ("ring", "ulysses")[comm.rank % 2])
        elif case == "unknown scheme":
            ContextParallelAttention.from_reference(attn, comm, "zigzag")
        else:
            raise KeyError(case)
    except ValueError as e:
        return f"{e} [events {len(comm.tracer.events) - n0}]"
    return "no error"


ERROR_CASES = {
    "seq not divisible by 2cp": "is not divisible by",
    "seq not divisible by cp": "is not divisible by",
    "heads not divisible by cp": "n_head=5",
    "ranks disagree on scheme": "'ulysses'",
    "unknown scheme": "'zigzag'",
}


def core_checks(comm, cluster=None) -> dict[str, bool]:
    """The tracer's messages, bytes and simulated step of one ring and one Ulysses
    core (forward + backward) on ``comm`` against :mod:`simpar.formulas`; for the
    MPI script (the threads tests check each in detail)."""
    from simpar import formulas
    from simpar.parallel import context as C
    b, s, h, nh, block, P = 1, 16 * comm.size, 24, 12, 4, comm.size
    out = {}
    for scheme in ("ring", "ulysses"):
        rng = np.random.default_rng(comm.rank)
        q, k, v, dy = (rng.standard_normal((b, s // P, h)) for _ in range(4))
        comm.barrier()
        comm.tracer.reset()
        if scheme == "ring":
            _, c = C.ring_attention_forward(q, k, v, nh, comm, True, block)
            C.ring_attention_backward(dy, c, comm)
            fwd, bwd = formulas.ring_attention_comm_elements(b, s, h, P)
            sent = sum(e.nbytes for e in comm.tracer.events if e.name == "send")
            out["ring bytes"] = sent == 8 * (fwd + bwd)
            t = formulas.ring_attention_time(b, s, h, P, block, comm.tracer.cluster.device.flops,
                                             comm.link, itemsize=8)
        else:
            _, c = C.ulysses_attention_forward(q, k, v, nh, comm, False, block)
            C.ulysses_attention_backward(dy, c, comm)
            a2a = [e for e in comm.tracer.events if e.name == "all_to_all"]
            moved = formulas.ulysses_comm_elements(b, s, h, P)
            out["ulysses all-to-alls"] = len(a2a) == 8 and all(
                e.nbytes * (P - 1) / P == 8 * moved for e in a2a)
            t = formulas.ulysses_attention_time(b, s, h, P, block,
                                                comm.tracer.cluster.device.flops, comm.link,
                                                itemsize=8)
        out[f"{scheme} clock"] = abs(comm.tracer.sim_now - sum(t)) <= 1e-12 * sum(t)
    return out
