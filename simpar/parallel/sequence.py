"""The sequence cut: which positions each rank of a group holds, and moving
between a rank's share and the whole sequence (context parallelism over ``cp``;
sequence parallelism cuts contiguously over ``tp``).

With the causal mask the first positions attend to few keys and the last to
all, so a contiguous cut gives the last rank the most attention work.  The
load-balanced cut (Megatron-core context parallelism) splits the sequence into
``2·cp`` chunks and gives rank ``i`` chunks ``i`` and ``2·cp − 1 − i``::

    cp = 2, s = 8:   positions 0 1 | 2 3 | 4 5 | 6 7
                     rank       0  |  1  |  1  |  0

Used by :mod:`simpar.parallel.context` (attention) and by
:class:`~simpar.parallel.expert.ExpertParallelMoE` (an MoE layer routes the
whole sequence of the group, whether cut over ``cp``, ``tp`` or both).
"""
from __future__ import annotations

import numpy as np

from ..comm import Comm

__all__ = ["chunk_positions", "gather_sequence", "all_gather_sequence", "own_chunks"]


def chunk_positions(seq: int, cp: int, rank: int, balanced: bool = True) -> np.ndarray:
    """Sequence positions held by ``rank``: chunks ``rank`` and ``2cp−1−rank`` of
    ``2cp`` (balanced), or the ``rank``-th of ``cp`` contiguous shards."""
    if balanced:
        c = seq // (2 * cp)
        return np.concatenate([np.arange(rank * c, (rank + 1) * c),
                               np.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])
    c = seq // cp
    return np.arange(rank * c, (rank + 1) * c)


def gather_sequence(parts, balanced: bool = True, axis: int = 1) -> np.ndarray:
    """Inverse of :func:`~simpar.parallel.context.shard_sequence`: every rank's
    part (rank order) → the whole."""
    cp = len(parts)
    seq = parts[0].shape[axis] * cp
    shape = list(parts[0].shape)
    shape[axis] = seq
    out = np.empty(shape, dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        idx = [slice(None)] * out.ndim
        idx[axis] = chunk_positions(seq, cp, r, balanced)
        out[tuple(idx)] = p
    return out


def all_gather_sequence(x: np.ndarray, group: Comm, balanced: bool = True) -> np.ndarray:
    """The whole sequence ``(b, s, ...)`` from every rank's share ``(b, s/n, ...)`` of
    ``group`` (``n`` ranks), in sequence order, on every rank (one all-gather)."""
    whole = group.all_gather(x, axis=1)               # the shares in rank order
    if not balanced:                                  # contiguous: that is sequence order
        return whole
    return gather_sequence(np.split(whole, group.size, axis=1), balanced)


def own_chunks(x: np.ndarray, group: Comm, balanced: bool = True) -> np.ndarray:
    """This rank's share of a whole sequence ``(b, s, ...)`` cut over ``group`` (a copy)."""
    return x[:, chunk_positions(x.shape[1], group.size, group.rank, balanced)]
