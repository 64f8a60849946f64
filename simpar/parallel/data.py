"""Data parallelism: every replica holds the same weights and a slice of the batch;
gradients are **summed** over the data-parallel group (Li et al. 2020, "PyTorch
Distributed", §3.2; Megatron-LM's distributed optimizer buffers).

With the loss normalised by the *global* token count ``N`` — each replica's loss is
``Σ_{its tokens} ℓ / N`` — the sum over replicas of their gradients is the gradient
of the global mean, exactly what one device would compute on the whole batch::

    ∇L = ∇ (1/N) Σ_{all tokens} ℓ  =  Σ_r ∇ (1/N) Σ_{tokens of r} ℓ  =  all_reduce_r(∇L_r)

**Buckets.** Summing gradients one tensor at a time pays the all-reduce latency
``2(p−1)α`` per tensor.  :class:`GradientBuckets` lays the gradients out in one
flat buffer, in **backward order** (last layer first), and cuts it into buckets of
``bucket_bytes``: ``⌈total bytes / bucket_bytes⌉`` all-reduces, moving
``2Ψ(p−1)/p`` bytes per rank in the ring model whatever the bucket size.

**Overlap.** A bucket is complete as soon as the backward pass has produced the
last gradient in it; with ``overlap=True`` its all-reduce is launched at that
moment, non-blocking (:meth:`~simpar.comm.Comm.iall_reduce`), and runs on the
communication stream while the backward goes on to earlier layers.
:meth:`GradientBuckets.finish` waits for all of them before the optimizer step.
Only the communication that outlasts the remaining backward is exposed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..comm import Comm, Request

__all__ = ["GradientBuckets", "all_reduce_coalesced", "DEFAULT_BUCKET_BYTES"]

#: PyTorch DDP's default bucket (25 MiB) would hold all of a teaching model: use 1 MiB
DEFAULT_BUCKET_BYTES = 1 << 20


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


def check_bucket_bytes(bucket_bytes) -> int:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)) \
            or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    return int(bucket_bytes)


class GradientBuckets:
    """Sum the gradients ``grads`` (``{name: live array}``, in **backward order**)
    over ``comm``, in buckets of ``bucket_bytes``, optionally overlapped.

    Per step: :meth:`ready` as gradients become final (any order; a bucket is
    launched when all of its gradients are ready, if ``overlap``), then
    :meth:`finish` (launches what is left, waits, writes the sums back).
    """

    def __init__(self, grads: Mapping[str, np.ndarray], comm: Comm,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = False) -> None:
        bucket_bytes = check_bucket_bytes(bucket_bytes)
        dtypes = {g.dtype for g in grads.values()}
        if len(dtypes) > 1:
            raise TypeError(f"GradientBuckets: one dtype per group, got {sorted(map(str, dtypes))}")
        self.comm, self.overlap = comm, bool(overlap)
        self.grads = dict(grads)
        dtype = next(iter(dtypes)) if dtypes else np.dtype(np.float64)
        self.offsets, n = {}, 0
        for name, g in self.grads.items():            # flat layout, backward order
            self.offsets[name] = (n, n + g.size)
            n += g.size
        self.flat = np.zeros(n, dtype)
        per = max(1, bucket_bytes // dtype.itemsize)   # elements per bucket
        self.bounds = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
        self.members = [[name for name, (a, b) in self.offsets.items() if a < hi and b > lo]
                        for lo, hi in self.bounds]
        self._reset()

    def _reset(self) -> None:
        self.pending = [set(m) for m in self.members]
        self.requests: dict[int, Request | None] = {}

    @property
    def n_buckets(self) -> int:
        return len(self.bounds)

    def ready(self, names: Sequence[str]) -> None:
        """These gradients are final for this step; launch the buckets they complete."""
        if not self.overlap:
            return
        for i, pend in enumerate(self.pending):
            if pend and i not in self.requests:
                pend.difference_update(names)
                if not pend:
                    self._launch(i, blocking=False)

    def _launch(self, i: int, blocking: bool) -> None:
        lo, hi = self.bounds[i]
        for name in self.members[i]:                  # copy in the slices this bucket holds
            a, b = self.offsets[name]
            s, e = max(a, lo), min(b, hi)
            self.flat[s:e] = self.grads[name].reshape(-1)[s - a:e - a]
        view = self.flat[lo:hi]
        if blocking:
            self.comm.all_reduce(view, out=view)
            self.requests[i] = None
        else:
            self.requests[i] = self.comm.iall_reduce(view, out=view)

    def finish(self) -> None:
        """Launch the remaining buckets (blocking), wait for all, write back the sums."""
        for i in range(self.n_buckets):
            if i not in self.requests:
                self._launch(i, blocking=True)
        for req in self.requests.values():
            if req is not None:
                req.wait()
        for name, g in self.grads.items():
            a, b = self.offsets[name]
            g.reshape(-1)[...] = self.flat[a:b]
        self._reset()
