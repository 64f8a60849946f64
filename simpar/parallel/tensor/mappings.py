"""The communication operators of tensor parallelism, as forward/backward pairs.

Megatron-LM (Shoeybi et al. 2019, §3, Fig. 3) names two conjugate operators:

* **f** = :func:`copy_to_tp_region`: identity forward, all-reduce backward.  It sits
  where a *replicated* activation enters work that is split over the group: every
  rank's part of the computation contributes to the input's gradient, so those
  contributions are summed on the way back.
* **g** = :func:`reduce_from_tp_region`: all-reduce forward, identity backward.  It
  sits where *partial sums* (one per rank) leave the split work and become a
  replicated activation again.

Scatter/gather along the hidden axis move between split and replicated layouts
without arithmetic.  Sequence parallelism (Korthikanti et al. 2022, §4.2.2, Fig. 5)
keeps activations outside the split work **sharded along the sequence** instead of
replicated, and trades each all-reduce for a reduce-scatter plus an all-gather:

* **g** (sequence parallel) = :func:`gather_from_sp_region`: all-gather forward,
  reduce-scatter backward;
* **ḡ** = :func:`reduce_scatter_to_sp_region`: reduce-scatter forward, all-gather
  backward.

The rule behind every pair: the backward of a communication is its *adjoint*.
The adjoint of "sum over ranks" (all-reduce) is "copy to every rank", and the
adjoint of "concatenate" (all-gather) is "sum, then keep my slice" (reduce-scatter)
— except when every rank consumes the gathered tensor *identically*
(replicated work), where the gradient of one copy is simply my slice.

Shapes: activations are ``(batch, seq, hidden)``; the hidden axis is ``-1`` and the
sequence axis is ``1``.  Each function takes the tensor-parallel communicator
``tp`` and returns a new array (or, for an identity, the same one).
"""
from __future__ import annotations

import numpy as np

from ...comm import Comm
from ..data import all_reduce_coalesced

HIDDEN = -1     # the axis split by tensor parallelism
SEQ = 1         # the axis split by sequence parallelism


def split_along(x: np.ndarray, axis: int, tp: Comm) -> np.ndarray:
    """This rank's contiguous ``1/tp.size`` slice of ``x`` along ``axis``."""
    n = x.shape[axis]
    if n % tp.size:
        raise ValueError(f"cannot split dimension {axis} of shape {x.shape} (size {n}) "
                         f"into tp={tp.size} equal parts")
    k = n // tp.size
    index = [slice(None)] * x.ndim
    index[axis] = slice(tp.rank * k, (tp.rank + 1) * k)
    return np.ascontiguousarray(x[tuple(index)])


# ---------------------------------------------------------------- f and g
# f: entering column-parallel work (Megatron-LM Fig. 3a)
def copy_to_tp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return x                                        # forward: identity


def copy_to_tp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_reduce(dy)                        # backward: sum the ranks' contributions


# g: leaving row-parallel work (Megatron-LM Fig. 3a)
def reduce_from_tp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_reduce(x)                         # forward: sum the partial results


def reduce_from_tp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return dy                                       # backward: identity


# ------------------------------------------------ split / join the hidden axis
def scatter_to_tp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return split_along(x, HIDDEN, tp)               # forward: keep my columns


def scatter_to_tp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_gather(dy, axis=HIDDEN)           # backward: everyone's columns


def gather_from_tp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_gather(x, axis=HIDDEN)            # forward: concatenate the columns


def gather_from_tp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return split_along(dy, HIDDEN, tp)              # backward: keep my columns (the
    #                                                 output is used identically everywhere)


# ------------------------------------------- sequence parallelism (Korthikanti §4.2.2)
def scatter_to_sp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return split_along(x, SEQ, tp)                  # forward: keep my tokens


def scatter_to_sp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_gather(dy, axis=SEQ)              # backward: everyone's tokens


# g under sequence parallelism: before column-parallel work
def gather_from_sp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_gather(x, axis=SEQ)               # forward: the whole sequence


def gather_from_sp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.reduce_scatter(dy, axis=SEQ)          # backward: sum partial grads, keep my tokens


# ḡ: after row-parallel work
def reduce_scatter_to_sp_region(x: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.reduce_scatter(x, axis=SEQ)           # forward: sum partial results, keep my tokens


def reduce_scatter_to_sp_region_backward(dy: np.ndarray, tp: Comm) -> np.ndarray:
    return tp.all_gather(dy, axis=SEQ)              # backward: the whole sequence


# ------------------------------------------- gradients of sequence-sharded params
def allreduce_sequence_parallel_grads(grads: list[np.ndarray], tp: Comm) -> None:
    """Sum, in place, gradients that each rank computed from its own tokens only.

    Under sequence parallelism LayerNorm, the biases added after a reduce-scatter
    and the position embedding see only this rank's ``s/t`` tokens, so their
    gradients are partial sums (Korthikanti et al. 2022 §4.2.2).  One all-reduce of
    one flat bucket makes them whole.  Call it **once per step**, after the last
    backward (Megatron-LM does the same when it finalises gradients): a second call
    would add the already-summed gradients again.
    """
    all_reduce_coalesced(grads, tp)
