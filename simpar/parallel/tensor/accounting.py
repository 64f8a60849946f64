"""Closed-form communication volume and activation memory of tensor parallelism.

The closed forms live in :mod:`simpar.formulas` (one home): the papers' and
simpar's exact counts (:func:`~simpar.formulas.tp_mlp_comm_elements`,
:func:`~simpar.formulas.tp_activation_elements`,
:func:`~simpar.formulas.recompute_flops`); this module reads a traced event in
the ring model (:func:`ring_bytes`) and keeps the names the tensor-parallel
package has always exported for those formulas.

The tests check these formulas against what the code really does: bytes from the
tracer's communication events, activation bytes from the memory ledger.

**Bytes on the wire (ring model, DESIGN.md §6).**  A communication event records
``n`` = the bytes of the full buffer (all-reduce: the array; all-gather: its
output; reduce-scatter: its input).  In a ring of ``p`` ranks each device sends
(and receives) ``n·(p−1)/p`` bytes for an all-gather or a reduce-scatter, and
twice that for an all-reduce (a reduce-scatter followed by an all-gather)::

    ring_bytes(event) = 2n(p−1)/p  (all-reduce),   n(p−1)/p  (all-gather, reduce-scatter)

A transformer layer with tensor parallelism all-reduces the ``(b, s, h)``
activation 4 times (2 forward, 2 backward), so per device it moves
``4 · 2·bsh·(t−1)/t = 8·b·s·h·(t−1)/t`` elements (Narayanan et al. 2021 §3.2);
sequence parallelism's 4 all-gathers + 4 reduce-scatters of the same tensor move
exactly as much.
"""
from __future__ import annotations

from ... import formulas
from ...trace import Event


def ring_bytes(event: Event) -> float:
    """Bytes one device sends for a traced collective, in the ring model."""
    return formulas.ring_elements(event.name, event.nbytes, event.args.get("size", 1))


#: the tensor package's names for the formulas of :mod:`simpar.formulas`
layer_comm_elements = formulas.tp_layer_comm_elements
mlp_comm_elements = formulas.tp_mlp_comm_elements
activation_elements = formulas.tp_activation_elements
recompute_flops = formulas.recompute_flops


def korthikanti_activation_bytes(b: int, s: int, h: int, n_head: int, t: int,
                                 sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2: bytes per layer (16-bit, dropout masks).

    tensor parallel ``sbh(10 + 24/t + 5as/(ht))``; with sequence parallelism
    ``sbh(34 + 5as/h)/t``.
    """
    return formulas.activation_bytes_per_layer(s, b, h, n_head, t, sequence_parallel)
