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
  2019 §3; Narayanan et al. 2021 §3.2);
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

Units are in each name: ``*_elements`` counts array elements, ``*_bytes``
bytes, ``*_time`` seconds (or whatever unit the stage times are given in).
Integer inputs give exact integer (or exact rational-valued float) results
where the formula allows, so tests can compare with ``==``.
"""
from __future__ import annotations

import math

__all__ = [
    "bubble_over_ideal", "bubble_fraction", "one_f_one_b_idle", "zb_h1_idle",
    "micro_batches_in_flight",
    "ring_elements", "tp_layer_comm_elements",
    "activation_bytes_per_layer", "recompute_activation_bytes_per_layer",
    "layer_forward_flops", "layer_backward_flops", "linear_flops", "attention_flops",
    "ZERO_STAGES", "zero_memory_bytes", "zero_comm_elements", "dp_comm_elements",
    "p2p_time", "collective_time", "compute_time",
]


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
    all-gather (``n`` = output), reduce-scatter (``n`` = input) ``n(p−1)/p``."""
    if kind == "all_reduce":
        return 2.0 * n * (p - 1) / p
    if kind in ("all_gather", "reduce_scatter"):
        return 1.0 * n * (p - 1) / p
    raise ValueError(f"no ring model for {kind!r}")


def tp_layer_comm_elements(b: int, s: int, h: int, t: int) -> float:
    """Elements one device sends per transformer layer (forward + backward) with
    Megatron tensor parallelism: 4 all-reduces of the ``(b, s, h)`` activation,
    ``8·b·s·h·(t−1)/t`` (Shoeybi et al. 2019 §3; Narayanan et al. 2021 §3.2).
    Sequence parallelism's 4 all-gathers + 4 reduce-scatters move as much."""
    return 8.0 * b * s * h * (t - 1) / t


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
