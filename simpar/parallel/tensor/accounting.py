"""Closed-form communication volume and activation memory of tensor parallelism.

The papers' formulas live in :mod:`simpar.formulas`; this module keeps the
simpar-specific counts (the naive MLP's traffic, the exact saved-tensor table)
and the names the tensor-parallel package has always exported.

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
from ...nn.module import check_recompute
from ...trace import Event


def ring_bytes(event: Event) -> float:
    """Bytes one device sends for a traced collective, in the ring model."""
    return formulas.ring_elements(event.name, event.nbytes, event.args.get("size", 1))


def layer_comm_elements(b: int, s: int, h: int, t: int) -> float:
    """Elements one device sends per transformer layer (forward + backward),
    with or without sequence parallelism: ``8·b·s·h·(t−1)/t``
    (:func:`simpar.formulas.tp_layer_comm_elements`)."""
    return formulas.tp_layer_comm_elements(b, s, h, t)


def mlp_comm_elements(b: int, s: int, h: int, d_ff: int, t: int, naive: bool = False) -> float:
    """Elements one device sends for one MLP, forward + backward.

    Megatron (:class:`~.mlp.ParallelMLP`): one all-reduce of ``bsh`` each way,
    ``4·bsh·(t−1)/t``.  Naive (:class:`~.mlp.NaiveTensorParallelMLP`): forward
    all-gathers of ``bs·d_ff`` and ``bsh``, backward all-reduces of the same,
    ``3·bs·(d_ff + h)·(t−1)/t`` (= ``15·bsh·(t−1)/t`` with ``d_ff = 4h``).
    """
    per_rank = (t - 1) / t
    if naive:
        return 3.0 * b * s * (d_ff + h) * per_rank
    return 4.0 * b * s * h * per_rank


def activation_elements(b: int, s: int, h: int, n_head: int, t: int, d_ff: int | None = None,
                        sequence_parallel: bool = False, recompute: str = "none") -> int:
    """Elements one device saves for backward per transformer layer (exact).

    The table in :mod:`.transformer` lists every saved tensor.  With ``d_ff = 4h``,
    next to Korthikanti et al. 2022, Table 2 (bytes, 16-bit, with dropout masks):

    ======================  =================================  ==========================
    recompute               simpar (elements)                  Korthikanti Table 2 (bytes)
    ======================  =================================  ==========================
    none, no parallelism    ``16bsh + 2bs + a·b·s²``           ``sbh(34 + 5as/h)``
    none, TP                ``bsh(4 + 12/t) + 2bs + abs²/t``   ``sbh(10 + 24/t + 5as/(ht))``
    none, TP + SP           ``bsh(2 + 14/t) + 2bs/t + abs²/t`` ``sbh(34 + 5as/h)/t``
    selective, TP + SP      ``bsh(2 + 14/t) + 2bs/t``          ``34sbh/t``
    full                    ``bsh`` (``bsh/t`` with SP)        ``2sbh``
    ======================  =================================  ==========================

    Selective recomputation removes exactly the ``a·b·s²/t`` term (the paper's
    ``5as/h``: scores, softmax output and its dropout mask); selective without SP
    is ``bsh(4 + 12/t) + 2bs``.  Full recomputation keeps only the layer's input,
    which under SP is this rank's sequence shard (the paper's ``2sbh`` counts the
    replicated input without SP).  ``t = 1`` gives the reference block either way.
    """
    check_recompute(recompute)
    d_ff = 4 * h if d_ff is None else d_ff
    bsh = b * s * h
    if recompute == "full":
        return bsh // t if sequence_parallel else bsh
    probs = 0 if recompute == "selective" else n_head * b * s * s // t
    split = 3 * bsh // t + bsh // t + 2 * b * s * d_ff // t + probs
    gathered = 2 * bsh                                     # qkv and fc1 inputs
    layernorms = 2 * (bsh + b * s)                         # x̂ and 1/σ, twice
    if sequence_parallel:
        layernorms //= t
    return gathered + layernorms + split


def recompute_flops(b: int, s: int, h: int, t: int, recompute: str,
                    d_ff: int | None = None) -> float:
    """FLOPs one device adds per layer and micro-batch by recomputing: ``"full"``
    one more forward, ``(24bsh² + 4bs²h)/t`` with ``d_ff = 4h`` (Narayanan et al.
    2021, appendix; so a step costs 4 forwards instead of 3); ``"selective"`` the
    attention core ``QKᵀ`` and ``PV`` of this rank's heads, ``4bs²h/t``
    (Korthikanti et al. 2022, §5: a few percent for large ``h``); ``"none"`` 0."""
    check_recompute(recompute)
    if recompute == "full":
        return formulas.layer_forward_flops(b, s, h, d_ff) / t
    if recompute == "selective":
        return formulas.attention_flops(b, s, h) / t
    return 0.0


def korthikanti_activation_bytes(b: int, s: int, h: int, n_head: int, t: int,
                                 sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2: bytes per layer (16-bit, dropout masks).

    tensor parallel ``sbh(10 + 24/t + 5as/(ht))``; with sequence parallelism
    ``sbh(34 + 5as/h)/t``.
    """
    return formulas.activation_bytes_per_layer(s, b, h, n_head, t, sequence_parallel)
