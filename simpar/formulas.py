"""Every closed-form result simpar checks itself against, with its source.

One home for the papers' formulas (DESIGN.md §6): the tests assert that the
simulated clock, the tracer's bytes and the memory ledger equal these numbers;
the demos and notebooks print and plot them next to the measured ones.

* pipeline bubble, GPipe / 1F1B: ``(p−1)/m`` of ideal, ``(p−1)/(m+p−1)`` of the
  step (Narayanan et al. 2021 §2.2.1; Huang et al. 2019);
* interleaved 1F1B: ``(p−1)/(v·m)`` of ideal (Narayanan et al. 2021 §2.2.2);
* zero bubble, idle time per rank: 1F1B ``(p−1)(T_F+T_B+T_W)``, ZB-H1
  ``(p−1)(T_F+T_B−T_W)`` (Qi et al. 2023, Table 2);
* micro-batches in flight on rank r: GPipe ``m``, 1F1B ``min(p−r, m)``
  (Narayanan et al. 2021 §2.2.1);
* Megatron TP elements per layer per device: ``8·b·s·h·(t−1)/t`` (Shoeybi et al.
  2019 §3; Narayanan et al. 2021 §3.2); per MLP ``4·bsh·(t−1)/t``, naive
  ``3·bs(d_ff + h)·(t−1)/t``; the vocab-parallel ends ``2bsh(t−1)/t`` and
  ``2(bsh + 3bs)(t−1)/t``; simpar's exact saved elements per layer
  (``tp_activation_elements``) and recomputation FLOPs;
* expert parallelism per MoE layer and micro-batch: 4 all-to-alls of the rows
  sent / received, the router's gradient all-reduce, the count table
  (Lepikhin et al. 2020 §2.2-3.1; Fedus et al. 2021 §2.2);
* activation bytes per layer (16-bit): ``sbh(34 + 5as/h)``; TP
  ``sbh(10 + 24/t + 5as/(ht))``; TP+SP ``sbh(34 + 5as/h)/t``; full recompute
  ``2sbh``; selective + TP + SP ``34sbh/t`` (Korthikanti et al. 2022, Table 2, §5);
* FLOPs per layer: ``24bsh² + 4bs²h`` forward, backward twice that (Narayanan et
  al. 2021, appendix);
* ZeRO memory (mixed-precision Adam, K = 12): ``16Ψ``; ``4Ψ + 12Ψ/N``;
  ``2Ψ + 14Ψ/N``; ``16Ψ/N`` (Rajbhandari et al. 2020 §5, Table 1);
* ZeRO communication per rank: ``2Ψ(N−1)/N`` (DP, ZeRO-1/2), ``3Ψ(N−1)/N``
  (ZeRO-3) (Rajbhandari et al. 2020 §7); data-parallel ring all-reduce
  ``2Ψ(dp−1)/dp``;
* α-β collective times: all-reduce ``2(p−1)α + 2n(p−1)/p·β``, all-gather /
  reduce-scatter / all-to-all ``(p−1)α + n(p−1)/p·β`` (ring / pairwise
  algorithms; MPICH's cost comments, NCCL-tests bus bandwidth).
* context parallelism: ring attention ``cp−1`` K/V transfers per forward,
  ``cp−1`` K/V + ``cp`` dK/dV per backward; load-balanced causal tiles per rank
  ``(2cp−1)n² + n(n+1)``; Ulysses 4 + 4 all-to-alls of ``(cp−1)/cp`` of
  ``b·(s/cp)·h``; attention activations ``b·(s/cp)·(h + 5h/t + a/t)`` (Liu et
  al. 2023 §3; Jacobs et al. 2023 §3.1; :mod:`simpar.parallel.context`).

Units are in each name: ``*_elements`` counts array elements, ``*_bytes``
bytes, ``*_time`` seconds (or whatever unit the stage times are given in).
Integer inputs give exact integer (or exact rational-valued float) results
where the formula allows, so tests can compare with ``==``.
"""
from __future__ import annotations

import math

#: activation recomputation (Korthikanti et al. 2022, §5): none, selective, full
RECOMPUTE_MODES = ("none", "selective", "full")

__all__ = [
    "RECOMPUTE_MODES", "check_recompute",
    "bubble_over_ideal", "bubble_fraction", "one_f_one_b_idle", "zb_h1_idle",
    "micro_batches_in_flight",
    "ring_elements", "tp_layer_comm_elements", "tp_mlp_comm_elements",
    "tp_embedding_comm_elements", "tp_head_loss_comm_elements", "ep_moe_comm_bytes",
    "tp_activation_elements", "recompute_flops",
    "activation_bytes_per_layer", "recompute_activation_bytes_per_layer",
    "layer_forward_flops", "layer_backward_flops", "linear_flops", "attention_flops",
    "ZERO_STAGES", "zero_memory_bytes", "zero_comm_elements", "dp_comm_elements",
    "p2p_time", "collective_time", "compute_time",
    "ring_attention_tiles", "ring_attention_step_tiles", "ring_attention_messages",
    "ring_attention_comm_elements", "ulysses_comm_elements",
    "context_attention_activation_elements", "ring_attention_time", "ulysses_attention_time",
]


def check_recompute(mode) -> str:
    """``mode`` if it is one of :data:`RECOMPUTE_MODES`, else ``ValueError``."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    return mode


# ======================================================================= pipelines
def bubble_over_ideal(p: int, m: int, v: int = 1) -> float:
    """Bubble time over ideal compute time for GPipe and 1F1B, ``(p−1)/m``
    (Narayanan et al. 2021 §2.2.1, eq. for ``t_pb/t_id``); interleaved with ``v``
    chunks per rank ``(p−1)/(v·m)`` (§2.2.2)."""
    return (p - 1) / (v * m)


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1, times: dict | None = None) -> float:
    """The bubble as a fraction of the whole step, ``bubble / (ideal + bubble)``.

    * ``naive`` (one micro-batch at a time): ``(p−1)/p``;
    * ``gpipe``, ``1f1b``: ``(p−1)/(m + p − 1)`` (Narayanan et al. 2021 §2.2.1);
    * ``interleaved``: ``(p−1)/(v·m + p − 1)`` (§2.2.2);
    * ``zb-h1``: ``(p−1)(T_F + T_B − T_W) / (m(T_F + T_B + T_W) + bubble)``
      (Qi et al. 2023, Table 2); needs ``times = {"F", "I", "W"}`` (``I`` is
      the paper's B, the input-gradient pass).
    """
    if schedule == "naive":
        return (p - 1) / p
    if schedule in ("gpipe", "1f1b", "interleaved"):
        v = v if schedule == "interleaved" else 1
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb-h1":
        tf, tb, tw = times["F"], times["I"], times["W"]
        bubble = zb_h1_idle(p, tf, tb, tw)
        return bubble / (m * (tf + tb + tw) + bubble)
    raise ValueError(f"no bubble formula for schedule {schedule!r}")


def one_f_one_b_idle(p: int, t_f, t_b, t_w=0):
    """Idle time of every rank in a 1F1B step: ``(p−1)(T_F + T_B + T_W)``
    (Qi et al. 2023, Table 2; ``T_W = 0`` when the backward is not split)."""
    return (p - 1) * (t_f + t_b + t_w)


def zb_h1_idle(p: int, t_f, t_b, t_w):
    """Idle time of every rank in a ZB-H1 step, ``(p−1)(T_F + T_B − T_W)``
    (Qi et al. 2023, Table 2); exact when ``m ≥ p`` and ``T_W ≤ min(T_F, T_B)``."""
    return (p - 1) * (t_f + t_b - t_w)


def micro_batches_in_flight(schedule: str, p: int, m: int, rank: int = 0) -> int:
    """Micro-batches whose activations rank ``rank`` holds at once: GPipe ``m``;
    1F1B ``min(p − rank, m)`` (warm-up ``p − rank − 1`` forwards plus one;
    Narayanan et al. 2021 §2.2.1)."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    raise ValueError(f"no in-flight formula for schedule {schedule!r}")


# ================================================================ tensor parallelism
def ring_elements(kind: str, n, p: int) -> float:
    """Elements (or bytes) one rank sends for a collective of the full buffer ``n``
    in the ring model: all-reduce ``2n(p−1)/p`` (reduce-scatter + all-gather);
    all-gather (``n`` = output), reduce-scatter (``n`` = input) ``n(p−1)/p``;
    all-to-all (``n`` = the send buffer, pairwise exchange) ``n(p−1)/p``."""
    if kind == "all_reduce":
        return 2.0 * n * (p - 1) / p
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return 1.0 * n * (p - 1) / p
    raise ValueError(f"no ring model for {kind!r}")


def tp_layer_comm_elements(b: int, s: int, h: int, t: int, mlp: bool = True) -> float:
    """Elements one device sends per transformer layer (forward + backward) with
    Megatron tensor parallelism: 4 all-reduces of the ``(b, s, h)`` activation,
    ``8·b·s·h·(t−1)/t`` (Shoeybi et al. 2019 §3; Narayanan et al. 2021 §3.2).
    Sequence parallelism's 4 all-gathers + 4 reduce-scatters move as much.
    ``mlp=False``: the attention's 2 only, ``4·b·s·h·(t−1)/t`` (a block whose
    feed-forward is an MoE layer replicated over tp)."""
    return (8.0 if mlp else 4.0) * b * s * h * (t - 1) / t


def tp_embedding_comm_elements(b: int, s: int, h: int, t: int) -> float:
    """The vocab-parallel embedding: its ``g`` all-reduce of the ``(b, s, h)``
    lookup in forward (identity backward), ``2·b·s·h·(t−1)/t`` (Shoeybi et al.
    2019 §3)."""
    return 2.0 * b * s * h * (t - 1) / t


def tp_head_loss_comm_elements(b: int, s: int, h: int, t: int) -> float:
    """The vocab-parallel head and loss: the head's ``f`` all-reduce of the
    ``(b, s, h)`` input gradient in backward, and the cross-entropy's 3
    all-reduces of ``b·s`` numbers (max, target logit, Σ exp) — the logits are
    never gathered (Shoeybi et al. 2019 §3): ``2·(b·s·h + 3·b·s)·(t−1)/t``."""
    return 2.0 * (b * s * h + 3 * b * s) * (t - 1) / t


def ep_moe_comm_bytes(sent_rows: int, received_rows: int, h: int, n_experts: int, ep: int,
                      itemsize: int = 8) -> float:
    """Bytes one rank moves per expert-parallel MoE layer and micro-batch
    (GShard, Lepikhin et al. 2020 §2.2-3.1; Switch, Fedus et al. 2021 §2.2), in the
    model above (each all-to-all's buffer leaves the rank but for its own
    ``1/ep``; a collective lasts for its largest member, so ``sent_rows`` and
    ``received_rows`` are the largest over the ep group):

    * the dispatch and the gradient of the combine carry the rows sent,
      the combine and the gradient of the dispatch the rows received:
      ``2·(sent + received)·h·(ep−1)/ep`` elements;
    * the router, replicated over ep: an all-reduce of its ``h × E`` gradient,
      ``2·h·E·(ep−1)/ep`` elements;
    * the kept counts, an all-gather of the ``ep × E`` int64 table: ``8·E·(ep−1)`` bytes.

    With nothing dropped and uniform routing, ``sent = received = k·b·s``."""
    rows = 2.0 * (sent_rows + received_rows) * h + 2.0 * h * n_experts
    return itemsize * rows * (ep - 1) / ep + 8.0 * n_experts * (ep - 1)


def tp_mlp_comm_elements(b: int, s: int, h: int, d_ff: int, t: int, naive: bool = False) -> float:
    """Elements one device sends for one tensor-parallel MLP, forward + backward
    (Shoeybi et al. 2019, §3, Fig. 3a).

    Megatron (:class:`~simpar.parallel.tensor.mlp.ParallelMLP`): one all-reduce of ``bsh`` each way,
    ``4·bsh·(t−1)/t``.  Naive (:class:`~simpar.parallel.tensor.mlp.NaiveTensorParallelMLP`): forward
    all-gathers of ``bs·d_ff`` and ``bsh``, backward all-reduces of the same,
    ``3·bs·(d_ff + h)·(t−1)/t`` (= ``15·bsh·(t−1)/t`` with ``d_ff = 4h``).
    """
    per_rank = (t - 1) / t
    if naive:
        return 3.0 * b * s * (d_ff + h) * per_rank
    return 4.0 * b * s * h * per_rank


def tp_activation_elements(b: int, s: int, h: int, n_head: int, t: int,
                           d_ff: int | None = None, sequence_parallel: bool = False,
                           recompute: str = "none") -> int:
    """Elements one device saves for backward per transformer layer (exact).

    The table in :mod:`simpar.parallel.tensor.transformer` lists every saved tensor.  With ``d_ff = 4h``,
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
        return layer_forward_flops(b, s, h, d_ff) / t
    if recompute == "selective":
        return attention_flops(b, s, h) / t
    return 0.0


# ============================================================== activation memory
def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int = 1,
                               sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2: activation bytes per transformer layer
    (16-bit activations, 1-byte dropout masks), ``a`` heads:

    * no parallelism: ``sbh(34 + 5as/h)``;
    * tensor parallel: ``sbh(10 + 24/t + 5as/(ht))``;
    * tensor + sequence parallel: ``sbh(34 + 5as/h)/t``.
    """
    if sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h) / t
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def recompute_activation_bytes_per_layer(s: int, b: int, h: int, t: int = 1,
                                         selective: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2 and §5: full recomputation keeps only the
    layer input, ``2sbh``; selective recomputation with TP + SP drops the
    ``5as/h`` attention term, ``34sbh/t``."""
    return 34 * s * b * h / t if selective else 2 * s * b * h


# ========================================================================== FLOPs
# Matmul FLOPs only (a multiply-add is 2 FLOPs); element-wise work is ignored.
def linear_flops(tokens: int, n_in: int, n_out: int) -> float:
    """``Y = X A`` with ``X`` of shape ``(tokens, n_in)``: ``2·tokens·n_in·n_out``."""
    return 2.0 * tokens * n_in * n_out


def attention_flops(b: int, s: int, h: int) -> float:
    """The two attention matmuls ``QKᵀ`` and ``softmax(·)V``, ``4bs²h`` (the full
    ``s × s`` products are computed; the causal mask does not halve them)."""
    return 4.0 * b * s * s * h


def layer_forward_flops(b: int, s: int, h: int, d_ff: int | None = None) -> float:
    """Forward FLOPs of one transformer layer, ``2bs(4h² + 2h·d_ff) + 4bs²h``;
    with ``d_ff = 4h``: ``24bsh² + 4bs²h`` (Narayanan et al. 2021, appendix)."""
    d_ff = 4 * h if d_ff is None else d_ff
    return linear_flops(b * s, h, 4 * h + 2 * d_ff) + attention_flops(b, s, h)


def layer_backward_flops(b: int, s: int, h: int, d_ff: int | None = None) -> float:
    """Backward = twice forward (an input and a weight gradient per matmul)."""
    return 2 * layer_forward_flops(b, s, h, d_ff)


# =========================================================================== ZeRO
ZERO_STAGES = (0, 1, 2, 3)


def zero_memory_bytes(psi: float, n: int, stage: int, k: int = 12, param_bytes: int = 2,
                      grad_bytes: int = 2) -> float:
    """Model-state bytes per device with mixed-precision Adam (2Ψ fp16 weights,
    2Ψ fp16 grads, KΨ optimizer state, K = 12), Rajbhandari et al. 2020 §5,
    Figure 1:

    * stage 0 (plain DP): ``(2 + 2 + K)Ψ = 16Ψ``;
    * ZeRO-1 (P_os): ``4Ψ + KΨ/N``;
    * ZeRO-2 (P_os+g): ``2Ψ + (2 + K)Ψ/N``;
    * ZeRO-3 (P_os+g+p): ``(4 + K)Ψ/N``.

    Table 1's example, Ψ = 7.5e9 and N = 64: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB.
    ``param_bytes`` / ``grad_bytes`` replace the two 2s for other dtypes (simpar's
    single-dtype runs: ``e`` bytes each, ``k = 2e`` for AdamW's two moments).
    """
    p, g = param_bytes, grad_bytes
    if stage == 0:
        return (p + g + k) * psi
    if stage == 1:
        return (p + g) * psi + k * psi / n
    if stage == 2:
        return p * psi + (g + k) * psi / n
    if stage == 3:
        return (p + g + k) * psi / n
    raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")


def dp_comm_elements(psi: float, dp: int) -> float:
    """Elements one rank sends per step to all-reduce ``Ψ`` gradients over a ring
    of ``dp`` ranks: ``2Ψ(dp−1)/dp``."""
    return ring_elements("all_reduce", psi, dp)


def zero_comm_elements(psi: float, n: int, stage: int) -> float:
    """Elements per rank per step (Rajbhandari et al. 2020 §7): DP, ZeRO-1 and -2
    ``2Ψ(N−1)/N`` (reduce-scatter + all-gather, or one all-reduce); ZeRO-3
    ``3Ψ(N−1)/N`` (an extra all-gather of the parameters, 1.5×)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    return (3 if stage == 3 else 2) * psi * (n - 1) / n


# ================================================================ α-β cost model
def p2p_time(nbytes: int, link) -> float:
    """One message over ``link`` (``alpha`` s, ``beta`` s/byte): ``α + n·β``."""
    return link.alpha + nbytes * link.beta


def collective_time(kind: str, nbytes: int, p: int, link) -> float:
    """Duration of a collective over ``p`` ranks, ``n`` = bytes of the full buffer
    (all-reduce: the array; all-gather: the output; reduce-scatter: the input;
    all-to-all: the bytes one rank holds).  Ring / pairwise algorithms (MPICH's
    cost comments; NCCL-tests bus-bandwidth factors):

    =================  =====================================================
    all-reduce         ``2 (p-1) α + 2 n (p-1)/p β``
    all-gather         ``(p-1) α + n (p-1)/p β``
    reduce-scatter     ``(p-1) α + n (p-1)/p β``
    all-to-all         ``(p-1) α + n (p-1)/p β``
    broadcast          ``ceil(log2 p) (α + n β)``   (binomial tree; simpar's choice)
    barrier            ``ceil(log2 p) α``           (dissemination; simpar's choice)
    =================  =====================================================
    """
    if p <= 1:
        return 0.0
    a, b = link.alpha, link.beta
    if kind == "all_reduce":
        return 2 * (p - 1) * a + 2 * nbytes * (p - 1) / p * b
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (p - 1) * a + nbytes * (p - 1) / p * b
    if kind == "broadcast":
        return math.ceil(math.log2(p)) * (a + nbytes * b)
    if kind == "barrier":
        return math.ceil(math.log2(p)) * a
    raise ValueError(f"no cost model for collective {kind!r}")


def compute_time(flops: float, device) -> float:
    """Compute advances the simulated clock by ``flops / device.flops``."""
    return flops / device.flops


# ============================================================ context parallelism
def _tiles_per_chunk(s: int, chunks: int, block: int) -> int:
    if s % chunks or (s // chunks) % block:
        raise ValueError(f"closed form needs the tile size {block} to divide the chunk "
                         f"s/{chunks} = {s / chunks:g}")
    return s // chunks // block


def ring_attention_step_tiles(s: int, cp: int, rank: int, step: int, block: int,
                              balanced: bool = True) -> int:
    """Tiles (``block × block``) rank ``rank`` computes at ring step ``step`` (the
    K/V of rank ``rank − step``) under the causal mask.  A chunk pair strictly
    below the diagonal is ``n²`` tiles, a diagonal pair ``n(n+1)/2``, one above
    it none (``n`` tiles per chunk).  Balanced (chunks ``i`` and ``2cp−1−i`` on
    rank ``i``): step 0 is ``n² + n(n+1)``, every other step ``2n²`` — the same on
    every rank."""
    src = (rank - step) % cp
    if balanced:
        n = _tiles_per_chunk(s, 2 * cp, block)
        mine, theirs = (rank, 2 * cp - 1 - rank), (src, 2 * cp - 1 - src)
    else:
        n = _tiles_per_chunk(s, cp, block)
        mine, theirs = (rank,), (src,)
    return sum(n * n if c < a else n * (n + 1) // 2 if c == a else 0
               for a in mine for c in theirs)


def ring_attention_tiles(s: int, cp: int, rank: int, block: int, balanced: bool = True) -> int:
    """Causal tiles rank ``rank`` computes in one ring-attention forward: balanced
    ``(2cp−1)n² + n(n+1)`` on every rank (``n = s/(2cp·block)``); the naive
    contiguous split ``rank·n² + n(n+1)/2`` (``n = s/(cp·block)``), so the last
    rank does ``2cp − 1 + 1/n``-ish times the first's work.  Forward FLOPs are
    ``4·b·h·block²`` per tile (``h`` = the heads' hidden width on this rank)."""
    if balanced:
        n = _tiles_per_chunk(s, 2 * cp, block)
        return (2 * cp - 1) * n * n + n * (n + 1)
    n = _tiles_per_chunk(s, cp, block)
    return rank * n * n + n * (n + 1) // 2


def ring_attention_messages(cp: int) -> dict:
    """Point-to-point messages per rank per attention layer (Liu et al. 2023 §3):
    forward ``cp−1`` K/V blocks; backward ``cp−1`` K/V blocks and ``cp`` dK/dV
    blocks (each block's gradient follows it round the ring and comes home)."""
    if cp == 1:
        return {"forward": 0, "backward_kv": 0, "backward_dkv": 0}
    return {"forward": cp - 1, "backward_kv": cp - 1, "backward_dkv": cp}


def ring_attention_comm_elements(b: int, s: int, h: int, cp: int) -> tuple[float, float]:
    """Elements one rank sends per attention layer, ``(forward, backward)``: each
    message is K and V of ``s/cp`` tokens, ``2·b·(s/cp)·h``; so forward
    ``(cp−1)·2b(s/cp)h`` and backward ``(2cp−1)·2b(s/cp)h``."""
    m = ring_attention_messages(cp)
    one = 2 * b * (s // cp) * h
    return m["forward"] * one, (m["backward_kv"] + m["backward_dkv"]) * one


def ulysses_comm_elements(b: int, s: int, h: int, cp: int) -> float:
    """Elements one rank sends to the others in one Ulysses all-to-all: it holds
    ``b·(s/cp)·h`` and keeps ``1/cp`` of it, ``b·(s/cp)·h·(cp−1)/cp``; 4 such
    all-to-alls forward (q, k, v, output) and 4 backward (Jacobs et al. 2023 §3.1)."""
    return b * (s // cp) * h * (cp - 1) / cp


def context_attention_activation_elements(b: int, s: int, h: int, a: int, cp: int,
                                          t: int = 1) -> float:
    """Elements an attention layer keeps for backward per rank under context
    parallelism (ring or Ulysses; :class:`~simpar.parallel.context.ContextParallelAttention`):
    QKV input ``b·sl·h``, ``q, k, v`` ``3b·sl·h/t``, output ``O`` ``b·sl·h/t``,
    log-sum-exp ``b·sl·a/t``, projection input ``b·sl·h/t`` with ``sl = s/cp``:
    ``b·(s/cp)·(h + 5h/t + a/t)`` — ``1/cp`` of the ``cp = 1`` value, and no
    ``a·b·s²`` term (plain attention keeps ``b·s·(h + 5h/t) + a·b·s²/t``)."""
    return b * (s / cp) * (h + 5 * h / t + a / t)


def ring_attention_time(b: int, s: int, h: int, cp: int, block: int, device_flops: float,
                        link, itemsize: int = 2, balanced: bool = True) -> tuple[float, float]:
    """Simulated ``(forward, backward)`` seconds of the ring-attention core on one
    rank of a balanced ring, all ranks in lock step.  Step ``t`` computes
    ``C_t`` (:func:`ring_attention_step_tiles` × ``4·b·h·block²`` FLOPs) while the
    next K/V block, ``τ = α + 2·b·(s/cp)·h·itemsize·β``, travels::

        forward   T = Σ_{t<cp−1} max(C_t, τ) + C_{cp−1}
        backward  E_t = max(T_t + 2C_t, E_{t−1} + τ)  (dK/dV of the block in hand
                  leaves at E_t), T_{t+1} = max(E_t, T_t + τ); done at E_{cp−1} + τ

    — every transfer hidden as long as a block's compute outlasts ``τ``."""
    if not balanced:
        raise ValueError("the lock-step closed form holds for the balanced ring only")
    tau = link.alpha + 2 * b * (s // cp) * h * itemsize * link.beta
    C = [4.0 * b * h * block * block * ring_attention_step_tiles(s, cp, 0, t, block) /
         device_flops for t in range(cp)]
    fwd = sum(max(c, tau) for c in C[:-1]) + C[-1]
    if cp == 1:
        return fwd, 2 * C[0]
    T, E = 0.0, -math.inf
    for t in range(cp):
        E = max(T + 2 * C[t], E + tau) if t else T + 2 * C[t]
        if t < cp - 1:
            T = max(E, T + tau)
    return fwd, E + tau


def ulysses_attention_time(b: int, s: int, h: int, cp: int, block: int, device_flops: float,
                           link, itemsize: int = 2) -> tuple[float, float]:
    """Simulated ``(forward, backward)`` seconds of the Ulysses core on one rank:
    4 all-to-alls of ``b·(s/cp)·h·itemsize`` bytes each way (none overlapped),
    around causal attention of the whole sequence on ``h/cp`` of the hidden
    width, ``4·b·(h/cp)·block²·N(N+1)/2`` FLOPs forward (``N = s/block``)."""
    n = _tiles_per_chunk(s, 1, block)
    C = 4.0 * b * (h / cp) * block * block * (n * (n + 1) // 2) / device_flops
    a2a = collective_time("all_to_all", b * (s // cp) * h * itemsize, cp, link)
    return 4 * a2a + C, 4 * a2a + 2 * C
