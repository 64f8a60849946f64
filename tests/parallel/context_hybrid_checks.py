"""Context-parallel layouts of the hybrid builder, shared by the threads tests and
the MPI script: 20 AdamW steps of a 4-layer GPT (float64) per layout, compared
with the single-device reference by :mod:`tests.parallel.hybrid_checks`; and the
bad layouts, each returning every rank's message."""
from __future__ import annotations

from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.nn import GPT, GPTConfig
from simpar.nn.moe_gpt import MoEGPT, MoEGPTConfig
from simpar.parallel.hybrid import build_model
from tests.parallel.hybrid_checks import Layout, make_reference

P = ParallelConfig
R, U = {"context_parallel": "ring"}, {"context_parallel": "ulysses"}
CP_LAYOUTS = [
    Layout("cp2 ring", P(cp=2), R),
    Layout("cp2 ulysses", P(cp=2), U),
    Layout("cp2 ring contiguous, tile 3", P(cp=2), {**R, "cp_balanced": False,
                                                   "attention_block": 3}),
    Layout("cp4 ring tied", P(cp=4), R, tied=True),
    Layout("cp2xtp2 ring", P(cp=2, tp=2), R),
    Layout("cp2xtp2 ulysses", P(cp=2, tp=2), U),
    Layout("cp2xtp2+SP ring", P(cp=2, tp=2), {**R, "sequence_parallel": True}),
    Layout("cp2xdp2 ring", P(cp=2, dp=2), R),
    Layout("cp2xdp2 ulysses", P(cp=2, dp=2), U),
    Layout("cp2xpp2 ring", P(cp=2, pp=2), R, m=2),
    Layout("cp2xpp2 ulysses tied", P(cp=2, pp=2), U, tied=True),
    Layout("cp2xdp2xtp2 ring", P(cp=2, dp=2, tp=2), R),
    Layout("moe cp2 ring", P(cp=2), R, moe=True),
    Layout("moe cp2xdp2xep2 ulysses", P(cp=2, dp=2, ep=2), U, moe=True),
]
# composed with the other options too (threads only, to keep the MPI runs short)
CP_MORE = [
    Layout("cp2 ring, full recompute", P(cp=2), {**R, "recompute": "full"}),
    Layout("cp2xpp2 ring, zb-h1", P(cp=2, pp=2), {**R, "schedule": "zb-h1"}, m=4),
    Layout("cp2xpp2 ulysses, interleaved vpp2", P(cp=2, pp=2, vpp=2),
           {**U, "schedule": "interleaved"}),
    Layout("moe cp2xpp2 ring, m=4", P(cp=2, pp=2), R, moe=True, m=4),
    Layout("moe cp2xtp2 ring contiguous", P(cp=2, tp=2), {**R, "cp_balanced": False}, moe=True),
    Layout("moe cp2xtp2+SP ring", P(cp=2, tp=2), {**R, "sequence_parallel": True}, moe=True),
    Layout("moe cp2 ring, full recompute, zb-h1 pp2", P(cp=2, pp=2),
           {**R, "recompute": "full", "schedule": "zb-h1"}, moe=True, m=4),
]
CP_BY_NAME = {lay.name: lay for lay in CP_LAYOUTS + CP_MORE}

# name: (config, options, model overrides, the words every rank's error must hold)
BAD = {
    "seq not divisible by 2cp": (P(cp=3), R, {}, "sequence length 8 is not divisible by 6"),
    "seq not divisible by cp": (P(cp=3), U, {}, "sequence length 8 is not divisible by 3"),
    "heads not divisible by cp": (P(cp=4), U, {"n_head": 6, "d_model": 12},
                                  "n_head=6 (per tensor-parallel rank) is not divisible by cp=4"),
    "unknown scheme": (P(cp=2), {"context_parallel": "zigzag"}, {}, "'zigzag'"),
    "ranks disagree on scheme": (P(cp=2), None, {}, "'ring'"),
    "ranks disagree on cp": (P(cp=2), R, {}, "cp=2"),
}


def bad_case(comm, name: str) -> str:
    cfg, opts, model, _ = BAD[name]
    if name == "ranks disagree on cp":        # rank 1 thinks the 2 ranks are dp, not cp
        cfg = cfg if comm.rank == 0 else P(dp=2)
    n0 = len(comm.tracer.events)
    try:
        mesh = Mesh(comm, cfg)
    except ValueError as e:
        return f"{e} [events {len(comm.tracer.events) - n0}]"
    if opts is None:                        # rank-dependent scheme
        opts = {"context_parallel": ("ring", "ulysses")[comm.rank % 2]}
    if model.get("moe"):
        ref = MoEGPT(MoEGPTConfig(13, 8, 2, 4, 16, n_experts=2, top_k=1))
    elif model:
        ref = GPT(GPTConfig(**{**vars(make_reference(Layout("x", cfg)).config), **model}))
    else:
        ref = make_reference(Layout("x", cfg))
    try:
        build_model(ref, mesh, **opts)
    except ValueError as e:
        return f"{e} [events {len(comm.tracer.events) - n0}]"
    return "no error"
