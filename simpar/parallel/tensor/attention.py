"""Tensor-parallel self-attention (Megatron-LM, Shoeybi et al. 2019, §3, Fig. 3b).

Attention heads are independent, so the heads are split over the tp group: rank
``i`` owns heads ``[i·a/t, (i+1)·a/t)``.  The fused QKV projection is
column-parallel with its ``[q | k | v]`` blocks split separately (``parts=3``), so
each rank computes the queries, keys and values of *its* heads from the whole
input and runs attention on them without any communication.  The output
projection is row-parallel: its rows are the hidden channels of this rank's heads.
As in the MLP: ``f`` before QKV, ``g`` after the projection — one all-reduce
forward, one backward.

Selective recomputation (Korthikanti et al. 2022, §5): with
``recompute="selective"`` the ``a·b·s²/t`` probabilities of this rank's heads are
not kept; backward recomputes ``softmax(q kᵀ/√d + M)`` from the kept ``q, k, v``
(region ``<name>.core.recompute``, the core's forward FLOPs, no communication).
"""
from __future__ import annotations

import math

import numpy as np

from ... import trace
from ...comm import Comm
from ...nn import CausalSelfAttention
from ...nn import functional as F
from ...nn import kernels as K
from ...nn.module import frozen
from .layers import ColumnParallelLinear, RowParallelLinear, TensorParallelModule, check_divisible


class ParallelAttention(TensorParallelModule):
    """Causal multi-head self-attention with the heads split over ``tp``.

    Input/output: replicated ``(b, s, h)``, or sequence shards ``(b, s/t, h)`` with
    ``sequence_parallel`` (the QKV layer all-gathers the sequence: attention needs
    every token).
    """

    settings = ("h", "n_head", "sequence_parallel")

    def __init__(self, h: int, n_head: int, tp: Comm, sequence_parallel: bool = False,
                 dtype=np.float64, trace_name: str = "attn", agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        check_divisible("hidden size h", h, tp.size)
        check_divisible("n_head", n_head, tp.size)
        if h % n_head:
            raise ValueError(f"hidden size h={h} is not divisible by n_head={n_head}")
        self.h, self.n_head, self.trace_name = h, n_head, trace_name
        self.recompute = "none"
        self.h_local, self.n_head_local = h // tp.size, n_head // tp.size
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, agree=False)  # we agree
        self.qkv = self.add_child("qkv", ColumnParallelLinear(
            h, 3 * h, tp, parts=3, trace_name=f"{trace_name}.qkv", **kw))    # whole heads
        self.proj = self.add_child("proj", RowParallelLinear(
            h, h, tp, trace_name=f"{trace_name}.proj", **kw))
        if agree:
            self.agree()

    @classmethod
    def from_reference(cls, attn: CausalSelfAttention, tp: Comm,
                       sequence_parallel: bool = False, trace_name: str = "attn",
                       agree: bool = True) -> "ParallelAttention":
        """Cut this rank's heads from a reference :class:`~simpar.nn.CausalSelfAttention`."""
        m = cls(attn.h, attn.n_head, tp, sequence_parallel, attn.qkv.params["W"].dtype,
                trace_name, agree)
        m.qkv.load_reference(attn.qkv)
        m.proj.load_reference(attn.proj)
        m.recompute = getattr(attn, "recompute", "none")
        return m

    def _core_flops(self, b: int, s: int) -> float:
        return F.attention_flops(b, s, self.h_local)

    def forward(self, x, key=0):
        self._check_new_key(key)
        hl = self.h_local
        qkv = self.qkv.forward(x, key)                 # (b, s, 3h/t) = [q_i | k_i | v_i]
        b, s = qkv.shape[0], qkv.shape[1]
        q, k, v = qkv[..., :hl], qkv[..., hl:2 * hl], qkv[..., 2 * hl:]
        with trace.compute(f"{self.trace_name}.core.forward", flops=self._core_flops(b, s)):
            y, (qh, kh, vh, att, _) = K.attention_forward_fast(q, k, v, self.n_head_local)
        if self.recompute == "selective":              # P is computed again in backward
            self._save(key, q=q, k=k, v=v)
        else:
            self._save(key, q=qh, k=kh, v=vh, att=att)  # views of qkv, and P
        return self.proj.forward(frozen(y), key)

    def backward_pass(self, dy, key=0, *, weights=True):
        hl = self.h_local
        dy = self.proj.backward_pass(dy, key, weights=weights)               # (b, s, h/t)
        sv = self._pop(key)
        b, s = dy.shape[0], dy.shape[1]
        if "att" not in sv:                            # selective recomputation
            with trace.compute(f"{self.trace_name}.core.recompute",
                               flops=self._core_flops(b, s)):
                _, (sv["q"], sv["k"], sv["v"], sv["att"], _) = K.attention_forward_fast(
                    sv["q"], sv["k"], sv["v"], self.n_head_local)
        scale = 1.0 / math.sqrt(self.h // self.n_head)
        dqkv = np.empty((b, s, 3 * hl), dtype=dy.dtype)
        with trace.compute(f"{self.trace_name}.core.backward", flops=2 * self._core_flops(b, s)):
            K.attention_backward_fast(
                dy, (sv["q"], sv["k"], sv["v"], sv["att"], scale),
                out=(dqkv[..., :hl], dqkv[..., hl:2 * hl], dqkv[..., 2 * hl:]))
        return self.qkv.backward_pass(dqkv, key, weights=weights)

    def flops(self, batch: int, seq: int) -> float:
        return super().flops(batch, seq) + self._core_flops(batch, seq)
