"""Data parallelism: every device holds the whole model and a slice of the batch;
gradients are summed over the data-parallel group.

Summing many small gradients one by one pays the all-reduce latency once per
tensor; frameworks (PyTorch DDP, Megatron-LM) instead copy them into flat
*buckets* and reduce each bucket with one call.  :func:`all_reduce_coalesced`
is that step for one bucket.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..comm import Comm


def all_reduce_coalesced(arrays: Sequence[np.ndarray], comm: Comm, op: str = "sum") -> None:
    """Reduce every array over ``comm`` **in place**, with one all-reduce of one
    flat bucket (the arrays must share a dtype)."""
    if not arrays:
        return
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise TypeError(f"all_reduce_coalesced: one dtype per bucket, got {sorted(map(str, dtypes))}")
    bucket = np.concatenate([a.ravel() for a in arrays])
    comm.all_reduce(bucket, op=op, out=bucket)
    offset = 0
    for a in arrays:
        a[...] = bucket[offset:offset + a.size].reshape(a.shape)
        offset += a.size
