"""Tensor parallelism, Megatron-LM style, and sequence parallelism.

The two identities every layer here rests on (Shoeybi et al. 2019, §3)::

    column split:  X · [A₁, …, A_t]   = [X A₁, …, X A_t]          (no communication)
    row split:     [X₁, …, X_t] · [A₁; …; A_t] = Σᵢ Xᵢ Aᵢ          (one all-reduce)

and under sequence parallelism the all-reduce becomes a reduce-scatter plus an
all-gather along the sequence (Korthikanti et al. 2022, §4.2.2).

Read in this order — each module is one idea, with forward and backward side by side:

1. :mod:`.mappings` — the communication operators as forward/backward pairs:
   ``f`` = :func:`copy_to_tp_region` (identity / all-reduce), ``g`` =
   :func:`reduce_from_tp_region` (all-reduce / identity), scatter/gather along the
   hidden axis, and the sequence-parallel pairs (all-gather / reduce-scatter);
2. :mod:`.layers` — :class:`ColumnParallelLinear`, :class:`RowParallelLinear`, and
   :class:`TensorParallelModule` (cutting shards from a reference, gathering them back);
3. :mod:`.mlp` — :class:`ParallelMLP` (column → GeLU → row, one all-reduce each way)
   and the naive :class:`NaiveTensorParallelMLP` (all-gather after every layer);
4. :mod:`.attention` — :class:`ParallelAttention` (heads split over the group);
5. :mod:`.vocab` — :class:`VocabParallelEmbedding` and
   :func:`vocab_parallel_cross_entropy` (never gathers the logits);
6. :mod:`.transformer` — :class:`ParallelTransformerBlock` and :class:`ParallelGPT`,
   with ``sequence_parallel=True`` as an option, and what they save for backward;
7. :mod:`.accounting` — traced bytes in the ring model, and the package's names for
   the closed forms of :mod:`simpar.formulas` (bytes communicated, activations saved).

Every layer is cut from a reference module of :mod:`simpar.nn`::

    mesh = Mesh(comm, ParallelConfig(tp=comm.size))
    block = ParallelTransformerBlock.from_reference(reference_block, mesh.tp)
    y = block.forward(x); dx = block.backward(dy)
    grads = block.full_gradients()        # reference names and shapes (collective)
"""
from .accounting import (activation_elements, korthikanti_activation_bytes,
                         layer_comm_elements, mlp_comm_elements, recompute_flops, ring_bytes)
from .attention import ParallelAttention
from .layers import (ColumnParallelLinear, RowParallelLinear, TensorParallelModule,
                     agree_structure)
from .mappings import (allreduce_sequence_parallel_grads, copy_to_tp_region,
                       copy_to_tp_region_backward, gather_from_sp_region,
                       gather_from_sp_region_backward, gather_from_tp_region,
                       gather_from_tp_region_backward, reduce_from_tp_region,
                       reduce_from_tp_region_backward, reduce_scatter_to_sp_region,
                       reduce_scatter_to_sp_region_backward, scatter_to_sp_region,
                       scatter_to_sp_region_backward, scatter_to_tp_region,
                       scatter_to_tp_region_backward)
from .mlp import NaiveTensorParallelMLP, ParallelMLP
from .transformer import ParallelGPT, ParallelTransformerBlock
from .vocab import (VocabParallelEmbedding, vocab_parallel_cross_entropy,
                    vocab_parallel_cross_entropy_backward, vocab_range)

__all__ = [
    "copy_to_tp_region", "copy_to_tp_region_backward",
    "reduce_from_tp_region", "reduce_from_tp_region_backward",
    "scatter_to_tp_region", "scatter_to_tp_region_backward",
    "gather_from_tp_region", "gather_from_tp_region_backward",
    "scatter_to_sp_region", "scatter_to_sp_region_backward",
    "gather_from_sp_region", "gather_from_sp_region_backward",
    "reduce_scatter_to_sp_region", "reduce_scatter_to_sp_region_backward",
    "allreduce_sequence_parallel_grads",
    "TensorParallelModule", "agree_structure", "ColumnParallelLinear", "RowParallelLinear",
    "ParallelMLP", "NaiveTensorParallelMLP", "ParallelAttention",
    "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "vocab_parallel_cross_entropy_backward", "vocab_range",
    "ParallelTransformerBlock", "ParallelGPT",
    "ring_bytes", "layer_comm_elements", "mlp_comm_elements", "activation_elements",
    "recompute_flops",
    "korthikanti_activation_bytes",
]
