"""Column- and row-parallel linear layers (Megatron-LM, Shoeybi et al. 2019, §3).

A linear layer ``Y = X A + b`` (``A`` is ``(n_in, n_out)``) can be split two ways:

* **by columns** — ``A = [A_1, …, A_t]``: rank ``i`` computes ``Y_i = X A_i + b_i``,
  its own slice of the output columns, from the whole input ``X``
  (:class:`ColumnParallelLinear`);
* **by rows** — ``A = [A_1; …; A_t]`` and ``X = [X_1, …, X_t]``: rank ``i`` computes
  the partial product ``X_i A_i`` and ``Y = Σ_i X_i A_i + b`` needs a sum over ranks
  (:class:`RowParallelLinear`).

A column-parallel layer followed by a row-parallel one needs no communication in
between (the columns the first produces are the rows the second consumes): that is
the Megatron pairing.  Every parallel module here is cut from a reference module of
:mod:`simpar.nn` with ``from_reference``, and gives the full reference-shaped
parameters and gradients back with :meth:`TensorParallelModule.full_gradients`.

Zero-bubble split (Qi et al. 2023, §2): ``backward_input`` computes ``dX = dY Aᵀ``
(and its communication) only, keeping ``X`` and ``dY``; ``backward_weights``
computes ``dA = Xᵀ dY`` later, with no communication at all — in both layers the
weight gradient is local to the shard.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ... import trace
from ...comm import Comm
from ...nn import Linear, Module
from ...nn import functional as F
from ...nn.precision import acc_dtype, add_
from .mappings import (allreduce_sequence_parallel_grads, copy_to_tp_region,
                       copy_to_tp_region_backward, gather_from_sp_region,
                       gather_from_sp_region_backward, gather_from_tp_region,
                       gather_from_tp_region_backward, reduce_from_tp_region,
                       reduce_from_tp_region_backward, reduce_scatter_to_sp_region,
                       reduce_scatter_to_sp_region_backward, scatter_to_tp_region,
                       scatter_to_tp_region_backward)


def check_divisible(what: str, n: int, k: int, by: str = "tp") -> None:
    """``ValueError`` naming both numbers unless ``k`` divides ``n``."""
    if n % k:
        raise ValueError(f"{what}={n} is not divisible by {by}={k}")


# --------------------------------------------------------------- cutting shards
def shard(a: np.ndarray, axis: int, rank: int, size: int, parts: int = 1) -> np.ndarray:
    """Rank ``rank``'s slice of ``a`` along ``axis``, as a fresh array.

    With ``parts > 1`` the axis holds ``parts`` equal blocks (the ``[q | k | v]``
    columns of a fused QKV weight) and each block is sliced the same way, so the
    shard is ``[q_rank | k_rank | v_rank]``.
    """
    blocks = np.split(a, parts, axis=axis)
    return np.concatenate([np.split(b, size, axis=axis)[rank] for b in blocks], axis=axis)


def unshard(gathered: np.ndarray, axis: int, size: int, parts: int = 1) -> np.ndarray:
    """Inverse of :func:`shard`: ``gathered`` is every rank's shard concatenated."""
    per_rank = [np.split(p, parts, axis=axis) for p in np.split(gathered, size, axis=axis)]
    return np.concatenate([per_rank[r][j] for j in range(parts) for r in range(size)],
                          axis=axis)


def pad_along(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """``a`` with zeros appended along ``axis`` up to length ``n``."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, n - a.shape[axis])
    return np.pad(a, widths)


def padded_size(n: int, tp: int) -> int:
    """``n`` rounded up to a multiple of ``tp`` (a vocabulary padded for sharding)."""
    return -(-n // tp) * tp


# ------------------------------------------------------- agreement over the group
def agree_structure(tp: Comm, what: str, modules: Sequence[Module]) -> None:
    """One small exchange over ``tp`` (:meth:`~simpar.comm.Comm.agree`): every rank
    built ``modules`` with the same settings (configuration, sequence parallelism),
    dtype and shard shapes — else a ``ValueError`` on every rank naming each
    rank's.  Called once per model at construction: the parts a model builds for
    itself are built with ``agree=False``."""
    shapes = tuple((n, p.shape) for m in modules for n, p in m.parameters().items())
    dtypes = sorted({str(p.dtype) for m in modules for p in m.parameters().values()})
    digest = hashlib.blake2b(repr(shapes).encode(), digest_size=4).hexdigest()
    size = sum(int(np.prod(s, dtype=np.int64)) for _, s in shapes)
    tp.agree(f"tensor-parallel {what} (settings, dtype, shard shapes)",
             tuple(m.describe() if isinstance(m, TensorParallelModule) else type(m).__name__
                   for m in modules)
             + (f"dtype {'/'.join(dtypes)}", f"{len(shapes)} shards, {size} elements, "
                                             f"shapes #{digest}"))


# --------------------------------------------------------------- the base class
class TensorParallelModule(Module):
    """A module whose parameters are shards over the tensor-parallel group ``tp``.

    Subclasses say how each parameter was cut by overriding :meth:`full_tensor`
    (the default: replicated, every rank holds all of it).  Under sequence
    parallelism some gradients are partial sums over the tokens of this rank; they
    are listed by :meth:`sequence_parallel_grads` and summed over the group by
    :meth:`finalize_grads` — once per step, after the last backward.
    """

    #: the attributes every rank of ``tp`` must construct equally (:meth:`describe`)
    settings: tuple[str, ...] = ("sequence_parallel",)

    def __init__(self, tp: Comm, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.sequence_parallel = bool(sequence_parallel)
        self._grads_pending = False      # SP gradients not yet summed over tp

    def describe(self) -> str:
        """``Class(setting=value, ...)``: what the ranks of ``tp`` agree on."""
        return f"{type(self).__name__}(" + ", ".join(
            f"{a}={getattr(self, a)!r}" for a in self.settings) + ")"

    def agree(self) -> "TensorParallelModule":
        """:func:`agree_structure` of this module (and everything in it); returns self."""
        agree_structure(self.tp, type(self).__name__, [self])
        return self

    # ---- gathering shards back to reference shapes (a collective: all ranks call it)
    def full_tensor(self, name: str, local: np.ndarray) -> np.ndarray:
        """The reference-shaped tensor of parameter ``name`` from every rank's ``local``."""
        return local.copy()

    def full_parameters(self) -> dict[str, np.ndarray]:
        """Every parameter, gathered to its reference shape, under reference names."""
        return self._gather_all("params")

    def full_gradients(self) -> dict[str, np.ndarray]:
        """Every gradient, gathered to its reference shape, under reference names."""
        pending = [n or type(m).__name__ for n, m in self.named_modules()
                   if getattr(m, "_grads_pending", False)]
        if pending:
            raise RuntimeError(f"sequence-parallel gradients of {pending} are partial sums: "
                               "call finalize_grads() after the last backward of the step")
        return self._gather_all("grads")

    def _gather_all(self, which: str) -> dict[str, np.ndarray]:
        out = {}
        for prefix, m in self.named_modules():
            for name, local in (m.params if which == "params" else m.grads).items():
                full = m.full_tensor(name, local) if isinstance(m, TensorParallelModule) \
                    else local.copy()
                out[f"{prefix}.{name}" if prefix else name] = full
        return out

    # ---- sequence parallelism: gradients that only saw this rank's tokens
    def sequence_parallel_grads(self) -> list[np.ndarray]:
        """Live gradient arrays that hold partial sums under sequence parallelism."""
        out = []
        for child in self.children.values():
            if isinstance(child, TensorParallelModule):
                out += child.sequence_parallel_grads()
        return out

    def finalize_grads(self) -> None:
        """Sum the sequence-parallel gradients over ``tp`` (no-op without SP).
        Call once per step, after the last backward; a second call before
        :meth:`zero_grad` would sum the first partial sums again and raises."""
        if getattr(self, "_finalized", False) and self.sequence_parallel:
            raise RuntimeError("finalize_grads() called twice in one step: the sequence-"
                               "parallel gradients are already summed over tp (call it once, "
                               "after the last backward; zero_grad() starts a new step)")
        allreduce_sequence_parallel_grads(self.sequence_parallel_grads(), self.tp)
        for _, m in self.named_modules():
            if isinstance(m, TensorParallelModule):
                m._grads_pending = False
        self._finalized = True

    def zero_grad(self) -> None:
        super().zero_grad()
        self._finalized = False


class _ParallelLinear(TensorParallelModule):
    """What the column- and row-parallel layers share: the cut from a reference."""

    @classmethod
    def from_reference(cls, linear: Linear, tp: Comm, **options):
        """Cut this rank's shard from a reference :class:`~simpar.nn.Linear`
        (:meth:`load_reference` says which part)."""
        W = linear.params["W"]
        m = cls(linear.n_in, linear.n_out, tp, bias="b" in linear.params, dtype=W.dtype,
                **options)
        return m.load_reference(linear)


# --------------------------------------------------------------- column parallel
class ColumnParallelLinear(_ParallelLinear):
    """``Y_i = X A_i + b_i``: the output columns split over the tp group.

    Input: replicated ``(b, s, n_in)``, entering through **f** (identity forward,
    all-reduce backward) — or, with ``sequence_parallel``, a sequence shard
    ``(b, s/t, n_in)`` all-gathered along the sequence (reduce-scatter backward).
    Output: this rank's columns ``(b, s, n_out/t)``, or all of them with
    ``gather_output`` (all-gather forward, keep my columns backward).

    ``parts`` > 1 splits each of ``parts`` column blocks separately (a fused
    ``[q | k | v]`` weight, so every rank gets whole heads).  ``pad`` rounds
    ``n_out`` up to a multiple of ``tp`` with zero columns (a vocabulary); the
    padding is dropped again by :meth:`full_tensor`.
    """

    settings = ("n_in", "n_out", "parts", "gather_output", "sequence_parallel")

    def __init__(self, n_in: int, n_out: int, tp: Comm, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 parts: int = 1, pad: bool = False, dtype=np.float64,
                 trace_name: str = "column", agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        if gather_output and (sequence_parallel or parts > 1 or pad):
            raise ValueError("gather_output works only without sequence_parallel, parts or pad")
        if pad and parts > 1:
            raise ValueError("pad works only with parts=1")
        self.n_in, self.n_out, self.parts = n_in, n_out, parts
        self.n_out_padded = padded_size(n_out, tp.size) if pad else n_out
        check_divisible("n_out", n_out, parts, by="parts")
        check_divisible("output features per part", self.n_out_padded // parts, tp.size)
        self.gather_output, self.trace_name = gather_output, trace_name
        self.add_param("W", np.zeros((n_in, self.n_out_padded // tp.size), dtype))
        if bias:
            self.add_param("b", np.zeros(self.n_out_padded // tp.size, dtype))
        if agree:
            self.agree()

    def load_reference(self, linear: Linear) -> "ColumnParallelLinear":
        """Copy this rank's columns of ``linear`` into the parameters; returns self."""
        tp = self.tp
        for name, axis in (("W", 1), ("b", 0)):
            if name in self.params:
                full = pad_along(linear.params[name], axis, self.n_out_padded)
                self.params[name][...] = shard(full, axis, tp.rank, tp.size, self.parts)
        return self

    def full_tensor(self, name, local):
        axis = 1 if name == "W" else 0
        full = unshard(self.tp.all_gather(local, axis=axis), axis, self.tp.size, self.parts)
        return full[:, :self.n_out] if axis else full[:self.n_out]

    def _flops(self, x) -> float:
        return F.linear_flops(x.size // self.n_in, self.n_in, self.params["W"].shape[1])

    def forward(self, x, key=0):
        self._check_new_key(key)                       # before the first message
        if self.sequence_parallel:
            x = gather_from_sp_region(x, self.tp)      # (b, s, n_in): our own array
            self._save(key, x=x)
        else:
            x = copy_to_tp_region(x, self.tp)          # f
            self._save(key, copy={"x": x})
        with trace.compute(f"{self.trace_name}.forward", flops=self._flops(x)):
            y = F.linear_forward(x, self.params["W"], self.params.get("b"))
        return gather_from_tp_region(y, self.tp) if self.gather_output else y

    def backward_pass(self, dy, key=0, *, weights=True):
        if self.gather_output:
            dy = gather_from_tp_region_backward(dy, self.tp)
        x = self._pop(key)["x"]
        dx = _linear_backward(self, dy, x, key, weights)
        if self.sequence_parallel:
            return gather_from_sp_region_backward(dx, self.tp)
        return copy_to_tp_region_backward(dx, self.tp)

    def backward_weights(self, key=0) -> None:
        _linear_backward_weights(self, key)

    def flops(self, batch: int, seq: int) -> float:
        return F.linear_flops(batch * seq, self.n_in, self.params["W"].shape[1])


# ------------------------------------------------------------------ row parallel
class RowParallelLinear(_ParallelLinear):
    """``Y = Σ_i X_i A_i + b``: the input rows of ``A`` split over the tp group.

    Input: this rank's columns ``X_i`` ``(b, s, n_in/t)`` (``input_is_parallel``,
    the output of a column-parallel layer), or the whole ``X``, of which this rank
    keeps its columns (all-gather backward).  The partial products are summed by
    **g** (all-reduce forward, identity backward) — or, with
    ``sequence_parallel``, by a reduce-scatter along the sequence (all-gather
    backward), leaving ``(b, s/t, n_out)``.  The bias is added once, after the sum;
    under sequence parallelism its gradient then covers only this rank's tokens
    (see :meth:`sequence_parallel_grads`).
    """

    settings = ("n_in", "n_out", "input_is_parallel", "sequence_parallel")

    def __init__(self, n_in: int, n_out: int, tp: Comm, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 dtype=np.float64, trace_name: str = "row", agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        check_divisible("n_in", n_in, tp.size)
        self.n_in, self.n_out = n_in, n_out
        self.input_is_parallel, self.trace_name = input_is_parallel, trace_name
        self.add_param("W", np.zeros((n_in // tp.size, n_out), dtype))
        if bias:
            self.add_param("b", np.zeros(n_out, dtype))
        if agree:
            self.agree()

    def load_reference(self, linear: Linear) -> "RowParallelLinear":
        """Copy this rank's rows of ``linear`` (and the whole bias); returns self."""
        self.params["W"][...] = shard(linear.params["W"], 0, self.tp.rank, self.tp.size)
        if "b" in self.params:
            self.params["b"][...] = linear.params["b"]      # replicated
        return self

    def full_tensor(self, name, local):
        return self.tp.all_gather(local, axis=0) if name == "W" else local.copy()

    def sequence_parallel_grads(self):
        return [self.grads["b"]] if self.sequence_parallel and "b" in self.grads else []

    def _flops(self, x) -> float:
        W = self.params["W"]
        return F.linear_flops(x.size // W.shape[0], W.shape[0], self.n_out)

    def forward(self, x, key=0):
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp)
        with trace.compute(f"{self.trace_name}.forward", flops=self._flops(x)):
            y = F.linear_forward(x, self.params["W"])
        self._save(key, copy={"x": x})
        if self.sequence_parallel:
            y = reduce_scatter_to_sp_region(y, self.tp)
        else:
            y = reduce_from_tp_region(y, self.tp)      # g
        if "b" in self.params:
            y += self.params["b"]
        return y

    def backward_pass(self, dy, key=0, *, weights=True):
        x = self._pop(key)["x"]         # first: backward without forward fails before a message
        if "b" in self.params:          # the bias is added after the sum: its own db
            self.grads["b"] += dy.reshape(-1, self.n_out).sum(axis=0, dtype=acc_dtype(dy.dtype))
            self._grads_pending |= self.sequence_parallel
        if self.sequence_parallel:
            dy = reduce_scatter_to_sp_region_backward(dy, self.tp)
        else:
            dy = reduce_from_tp_region_backward(dy, self.tp)
        dx = _linear_backward(self, dy, x, key, weights, bias=False)
        if not self.input_is_parallel:
            dx = scatter_to_tp_region_backward(dx, self.tp)
        return dx

    def backward_weights(self, key=0) -> None:
        _linear_backward_weights(self, key, bias=False)

    def flops(self, batch: int, seq: int) -> float:
        return F.linear_flops(batch * seq, self.params["W"].shape[0], self.n_out)


# ------------------------------------- the local GEMMs of both layers' backward
def _linear_backward(m: TensorParallelModule, dy, x, key, weights: bool, bias: bool = True):
    """``dx = dy Aᵀ`` of this shard, and ``dA = xᵀ dy`` (``db = Σ dy``) with it, or —
    ``weights=False`` — later, in :func:`_linear_backward_weights`.  Regions:
    ``<name>.backward`` (2 × forward FLOPs) or ``<name>.backward_input`` (1 ×)."""
    fl = m._flops(x)
    if not weights:
        with trace.compute(f"{m.trace_name}.backward_input", flops=fl):
            dx = F.linear_backward_input(dy, m.params["W"])
        m._save(key, copy={"dy": dy}, slot="W", x=x)          # x: already our record
        return dx
    with trace.compute(f"{m.trace_name}.backward", flops=2 * fl):
        dx, dW, db = F.linear_backward(dy, x, m.params["W"])
        add_(m.grads["W"], dW)                   # grads += dW (16 bits: rounded once)
        if bias and "b" in m.params:
            m.grads["b"] += db
    return dx


def _linear_backward_weights(m: TensorParallelModule, key, bias: bool = True) -> None:
    """Zero-bubble ``W`` of a parallel linear layer: ``dA = xᵀ dy`` (local)."""
    s = m._pop(key, slot="W")
    with trace.compute(f"{m.trace_name}.backward_weights", flops=m._flops(s["x"])):
        dW, db = F.linear_backward_weight(s["dy"], s["x"])
        add_(m.grads["W"], dW)                   # grads += dW (16 bits: rounded once)
        if bias and "b" in m.params:
            m.grads["b"] += db
