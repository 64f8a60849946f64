"""The tensor-parallel MLP, and the naive scheme it improves on.

The two-layer MLP of a transformer is ``Z = GeLU(X A) B`` (``A``: ``h × d_ff``,
``B``: ``d_ff × h``).

**Naive** (the seed article, §3.2): split *both* weights by columns and all-gather
after each layer so that the next layer sees a whole input::

    X ─f─► GeLU(X A_i) ─all-gather─► Y ─f─► Y B_i ─all-gather─► Z

**Megatron** (Shoeybi et al. 2019, §3, Fig. 3a): split ``A`` by columns and ``B``
by rows.  GeLU is element-wise, so ``GeLU(X A_i)`` is exactly the ``i``-th column
block of ``Y`` and it is already the row block that ``B_i`` needs::

    X ─f─► GeLU(X A_i) = Y_i ─► Y_i B_i ─g─► Z = Σ_i Y_i B_i

one all-reduce forward (``g``) and one backward (``f``), each of ``b·s·h``
elements.  The naive scheme moves ``d_ff + h`` gathered elements per token
forward and all-reduces ``d_ff + h`` backward; with ``d_ff = 4h`` that is 15
against 4 ``b·s·h·(t−1)/t`` elements per device in the ring model (see
:func:`simpar.formulas.tp_mlp_comm_elements`).
"""
from __future__ import annotations

import numpy as np

from ... import trace
from ...comm import Comm
from ...nn import MLP
from ...nn import kernels as K
from ...nn.module import frozen
from .layers import ColumnParallelLinear, RowParallelLinear, TensorParallelModule, check_divisible


def _gelu(a, name: str):
    with trace.compute(f"{name}.gelu.forward"):
        return frozen(K.gelu_fast(a))


def _gelu_backward(dg, a, name: str):
    with trace.compute(f"{name}.gelu.backward"):
        return K.gelu_backward_fast(dg, a)


class ParallelMLP(TensorParallelModule):
    """``fc2(GeLU(fc1(x)))`` with ``fc1`` column-parallel and ``fc2`` row-parallel.

    Without sequence parallelism: input and output replicated ``(b, s, h)``; one
    all-reduce forward, one backward.  With it: input and output are sequence
    shards ``(b, s/t, h)``; one all-gather + one reduce-scatter each way.
    """

    settings = ("h", "d_ff", "sequence_parallel")

    def __init__(self, h: int, d_ff: int, tp: Comm, sequence_parallel: bool = False,
                 dtype=np.float64, trace_name: str = "mlp", agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        check_divisible("d_ff", d_ff, tp.size)
        self.h, self.d_ff, self.trace_name = h, d_ff, trace_name
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, agree=False)  # we agree
        self.fc1 = self.add_child("fc1", ColumnParallelLinear(
            h, d_ff, tp, trace_name=f"{trace_name}.fc1", **kw))
        self.fc2 = self.add_child("fc2", RowParallelLinear(
            d_ff, h, tp, trace_name=f"{trace_name}.fc2", **kw))
        if agree:
            self.agree()

    @classmethod
    def from_reference(cls, mlp: MLP, tp: Comm, sequence_parallel: bool = False,
                       trace_name: str = "mlp", agree: bool = True) -> "ParallelMLP":
        """Cut this rank's columns of ``fc1`` and rows of ``fc2`` from a reference MLP."""
        W1 = mlp.fc1.params["W"]
        m = cls(W1.shape[0], W1.shape[1], tp, sequence_parallel, W1.dtype, trace_name, agree)
        m.fc1.load_reference(mlp.fc1)
        m.fc2.load_reference(mlp.fc2)
        return m

    def forward(self, x, key=0):
        self._check_new_key(key)
        a = self.fc1.forward(x, key)                   # (b, s, d_ff/t): my columns of XA
        self._save(key, a=a)
        return self.fc2.forward(_gelu(a, self.trace_name), key)

    def backward_pass(self, dy, key=0, *, weights=True):
        dg = self.fc2.backward_pass(dy, key, weights=weights)
        a = self._pop(key)["a"]
        return self.fc1.backward_pass(_gelu_backward(dg, a, self.trace_name), key,
                                      weights=weights)


class NaiveTensorParallelMLP(TensorParallelModule):
    """The seed article's scheme (§3.2): both layers split by columns, an all-gather
    after each, so every layer starts from a whole (replicated) input.

    Built from two :class:`ColumnParallelLinear` with ``gather_output=True``: each
    all-gathers its output forward, and its input ``f`` all-reduces the input
    gradient backward (``fc2``'s input is the gathered ``(b, s, d_ff)``).  GeLU is
    element-wise, so applying it after the gather (as here) or before gives the same
    ``Y``.  Compare its traced bytes with :class:`ParallelMLP`'s.
    """

    settings = ("h", "d_ff")

    def __init__(self, h: int, d_ff: int, tp: Comm, dtype=np.float64,
                 trace_name: str = "naive_mlp") -> None:
        super().__init__(tp)
        check_divisible("d_ff", d_ff, tp.size)
        check_divisible("h", h, tp.size)
        self.h, self.d_ff, self.trace_name = h, d_ff, trace_name
        self.fc1 = self.add_child("fc1", ColumnParallelLinear(
            h, d_ff, tp, gather_output=True, dtype=dtype, trace_name=f"{trace_name}.fc1",
            agree=False))
        self.fc2 = self.add_child("fc2", ColumnParallelLinear(
            d_ff, h, tp, gather_output=True, dtype=dtype, trace_name=f"{trace_name}.fc2",
            agree=False))
        self.agree()

    @classmethod
    def from_reference(cls, mlp: MLP, tp: Comm,
                       trace_name: str = "naive_mlp") -> "NaiveTensorParallelMLP":
        """Cut this rank's columns of both weights from a reference MLP."""
        W1 = mlp.fc1.params["W"]
        m = cls(W1.shape[0], W1.shape[1], tp, W1.dtype, trace_name)
        m.fc1.load_reference(mlp.fc1)
        m.fc2.load_reference(mlp.fc2)
        return m

    def forward(self, x, key=0):
        a = self.fc1.forward(x, key)                   # (b, s, d_ff): gathered
        self._save(key, a=a)
        return self.fc2.forward(_gelu(a, self.trace_name), key)

    def backward_pass(self, dy, key=0, *, weights=True):
        dg = self.fc2.backward_pass(dy, key, weights=weights)                # all-reduce of (b, s, d_ff)
        a = self._pop(key)["a"]
        return self.fc1.backward_pass(_gelu_backward(dg, a, self.trace_name), key,
                                      weights=weights)
