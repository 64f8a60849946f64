"""Ranks of a parallel group that disagree: each case runs on every rank and
returns the error message it got (the same ValueError on every rank, naming each
rank's value) — shared by the threads test and the MPI script."""
from __future__ import annotations

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.nn import GPT, GPTConfig
from simpar.nn.moe import MoE
from simpar.parallel.expert import ExpertParallelMoE
from simpar.parallel.hybrid import build_model
from simpar.parallel.pipeline import make_schedule, run_schedule, stages_for_rank
from simpar.nn import MLP, Linear, TransformerBlock
from simpar.parallel.pipeline import PipelineStage
from simpar.parallel.tensor import (ColumnParallelLinear, ParallelGPT, ParallelMLP,
                                    ParallelTransformerBlock)

CFG = GPTConfig(vocab_size=11, seq_len=6, n_layer=6, n_head=2, d_model=8)


def pipeline_split(comm):
    """rank 0 cuts (2, 2, 2), the others (1, 3, 2): silently wrong before."""
    sch = make_schedule("1f1b", comm.size, 4)
    by = [2, 2, 2] if comm.rank == 0 else [1, 3, 2]
    stages = stages_for_rank(GPT(CFG), sch, comm.rank, by)
    ids = np.zeros((2, 6), np.int64)
    run_schedule(comm, sch, stages, [ids] * 4, [ids] * 4)


def pipeline_micro_batches(comm):
    """rank 0 runs m=5, the others m=4: hung forever under mpiexec before."""
    m = 5 if comm.rank == 0 else 4
    sch = make_schedule("1f1b", comm.size, m)
    stages = stages_for_rank(GPT(CFG), sch, comm.rank)
    ids = np.zeros((2, 6), np.int64)
    run_schedule(comm, sch, stages, [ids] * m, [ids] * m)


def expert_top_k(comm):
    """ranks built with different top-k: ran without error before."""
    ref = MoE(8, 4, 16, k=1 if comm.rank == 0 else 2, rng=0)
    ExpertParallelMoE.from_reference(ref, comm)


def hybrid_batch_shape(comm):
    """same size, different shape ((2, 6) vs (3, 4)): a loss matching neither before."""
    model = build_model(GPT(CFG), Mesh(comm, ParallelConfig(tp=comm.size)))
    shape = (2, 6) if comm.rank == 0 else (3, 4)
    ids = np.zeros(shape, np.int64)
    model.step(ids, ids)


def hybrid_step_twice(comm):
    """a second step() without zero_grad would sum the summed gradients again."""
    model = build_model(GPT(CFG), Mesh(comm, ParallelConfig(dp=comm.size)))
    ids = np.zeros((comm.size * 2, 6), np.int64)
    model.step(ids, ids)
    model.step(ids, ids)


def finalize_twice(comm):
    """sequence parallelism: finalize_grads after each of two accumulated losses."""
    par = ParallelGPT.from_reference(GPT(CFG), comm, sequence_parallel=True)
    ids = np.zeros((2, 6), np.int64)
    par.loss(ids, ids)
    par.finalize_grads()
    par.loss(ids, ids)
    par.finalize_grads()


def _before_any_message(comm, build) -> None:
    """``build()`` must fail before any traced message (the agreement is not traced)."""
    n0 = len(comm.tracer.events)
    try:
        build()
    except ValueError as e:
        raise ValueError(f"{e} [events {len(comm.tracer.events) - n0}]") from None


def _cfg(comm, n_layer=2):
    return GPTConfig(vocab_size=11, seq_len=6, n_layer=n_layer,
                     n_head=4 if comm.rank == 0 else 2, d_model=8)


def tp_gpt_heads(comm):
    """tensor-parallel GPT with n_head 4 on rank 0, 2 on rank 1: a loss matching
    neither reference before."""
    _before_any_message(comm, lambda: ParallelGPT.from_reference(GPT(_cfg(comm), seed=1), comm))


def tp_block_sequence_parallel(comm):
    """one rank sequence-parallel, the other not."""
    block = TransformerBlock(8, 2, 32, rng=np.random.default_rng(0))
    _before_any_message(comm, lambda: ParallelTransformerBlock.from_reference(
        block, comm, sequence_parallel=comm.rank == 0))


def tp_mlp_dtype(comm):
    """float64 on rank 0, float32 on rank 1."""
    dtype = np.float64 if comm.rank == 0 else np.float32
    mlp = MLP(8, 16, rng=np.random.default_rng(0), dtype=dtype)
    _before_any_message(comm, lambda: ParallelMLP.from_reference(mlp, comm))


def tp_linear_shapes(comm):
    """column-parallel layers of different widths (shard shapes (4, 4) vs (4, 6))."""
    n_out = 8 if comm.rank == 0 else 12
    _before_any_message(comm, lambda: ColumnParallelLinear.from_reference(
        Linear(4, n_out, rng=np.random.default_rng(0)), comm))


def tp_pipeline_stage(comm):
    """a pipeline stage's tensor-parallel pieces: one exchange for the stage."""
    _before_any_message(comm, lambda: PipelineStage(GPT(_cfg(comm), seed=1), 0, 1, range(2),
                                                    comm))


#: (case, world size, words the message must contain)
CASES = [
    (pipeline_split, 3, ["layer split", "rank 0: stage 0 = layers [0, 2)",
                         "rank 1: stage 1 = layers [1, 4)"]),
    (pipeline_micro_batches, 2, ["pipeline step", "rank 0", "rank 1"]),
    (expert_top_k, 2, ["expert-parallel MoE layer", "rank 0", "rank 1"]),
    (hybrid_batch_shape, 2, ["global batch", "(2, 6)", "(3, 4)"]),
    (hybrid_step_twice, 2, ["without zero_grad"]),
    (finalize_twice, 2, ["finalize_grads() called twice"]),
    (tp_gpt_heads, 2, ["tensor-parallel ParallelGPT", "rank 0: ('ParallelGPT(config=GPTConfig(",
                       "n_head=4", "rank 1: ('ParallelGPT(", "n_head=2", "[events 0]"]),
    (tp_block_sequence_parallel, 2, ["tensor-parallel ParallelTransformerBlock",
                                     "sequence_parallel=True", "sequence_parallel=False",
                                     "[events 0]"]),
    (tp_mlp_dtype, 2, ["tensor-parallel ParallelMLP", "rank 0", "dtype float64", "rank 1",
                       "dtype float32", "[events 0]"]),
    (tp_linear_shapes, 2, ["tensor-parallel ColumnParallelLinear", "n_out=8", "n_out=12",
                           "[events 0]"]),
    (tp_pipeline_stage, 2, ["tensor-parallel pipeline stage 0", "n_head=4", "n_head=2",
                            "[events 0]"]),
]


def run_case(comm, case) -> str:
    try:
        case(comm)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"
