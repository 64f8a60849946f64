"""Mixed precision: 16-bit storage, float32 arithmetic (Micikevicius et al. 2018,
"Mixed Precision Training", §3; Kalamkar et al. 2019 for bfloat16).

A model built with ``dtype=BF16`` (``ml_dtypes.bfloat16``: 8 exponent bits, 7
mantissa bits) or ``dtype=FP16`` (``numpy.float16``: 5 and 10) holds its
parameters, gradients and activations in 16 bits.  Every kernel that computes
runs on float32 copies of its 16-bit inputs and rounds its result to 16 bits::

    y₁₆ = round₁₆( f(float32(x₁₆)) )

* **matmuls emulate tensor cores**: ``Y₁₆ = round₁₆(Σₖ float32(A₁₆[i,k])·float32(B₁₆[k,j]))``
  — the products of 16-bit numbers are exact in float32 and the sum accumulates in
  float32 (NVIDIA's "FP16/BF16 inputs, FP32 accumulate"); the bias is added before
  the rounding, as a fused GEMM epilogue does;
* **reductions in float32**: LayerNorm's mean and variance, softmax, the
  cross-entropy (its probabilities stay float32 until the backward) — the
  operations Micikevicius et al. §3.3 keep in single precision;
* element-wise residual adds ``x += y`` of two 16-bit arrays round once, as
  16-bit hardware does.

:func:`mixed` is the decorator that gives a float32 kernel this behaviour; the
kernels of :mod:`simpar.nn.functional`, :mod:`simpar.nn.kernels` and the
vocab-parallel loss carry it, and with float32/float64 arguments it calls the
kernel unchanged.  The float32 master weights, the loss scale and the optimizer
wrapper are in :mod:`simpar.mixed_precision`
(:class:`~simpar.mixed_precision.MixedPrecisionOptimizer`).
"""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
HALF = (BF16, FP16)
#: ``--precision`` names and the dtype of parameters, gradients and activations
PRECISIONS = {"fp32": np.dtype(np.float32), "bf16": BF16, "fp16": FP16}

__all__ = ["BF16", "FP16", "HALF", "PRECISIONS", "is_half", "mixed", "acc_dtype",
           "precision_dtype"]


def is_half(dtype) -> bool:
    """True for bfloat16 and float16."""
    return np.dtype(dtype) in HALF


def acc_dtype(dtype):
    """The dtype to accumulate a sum of ``dtype`` values in: float32 for 16-bit
    arrays, else ``dtype`` itself (``a.sum(axis=0, dtype=acc_dtype(a.dtype))``)."""
    return np.float32 if np.dtype(dtype) in HALF else dtype


def precision_dtype(name: str) -> np.dtype:
    """``"fp32" | "bf16" | "fp16"`` → dtype, else ``ValueError`` naming the choices."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


# ------------------------------------------------------------ the decorator
def _half_of(args):
    for a in args:
        if isinstance(a, np.ndarray):
            if a.dtype in HALF:
                return a.dtype
        elif isinstance(a, (tuple, list)):
            d = _half_of(a)
            if d is not None:
                return d
    return None


# float16 → float32 by table lookup over the 65536 bit patterns: exact, and ~25 %
# faster than NumPy's element-by-element float16 conversion on this machine
_FP16_TO_FP32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _widen(a: np.ndarray) -> np.ndarray:
    if a.dtype == FP16 and a.flags.c_contiguous:
        return np.take(_FP16_TO_FP32, a.view(np.uint16))
    return a.astype(np.float32)


def _up(a):
    if isinstance(a, np.ndarray):
        return _widen(a) if a.dtype in HALF else a
    if isinstance(a, tuple):
        return tuple(_up(x) for x in a)
    return a


def _down(r, dt, keep, path=()):
    if path in keep:
        return r
    if isinstance(r, np.ndarray):
        return r.astype(dt) if r.dtype == np.float32 else r
    if isinstance(r, tuple):
        return tuple(_down(x, dt, keep, path + (i,)) for i, x in enumerate(r))
    return r


def _empty_like(a):
    if isinstance(a, np.ndarray):
        return np.empty(a.shape, np.float32) if a.dtype in HALF else a
    return tuple(_empty_like(x) for x in a)


def _write_back(dst, src) -> None:
    if isinstance(dst, np.ndarray):
        if dst is not src:          # round contiguously, then copy (dst may be a strided view)
            np.copyto(dst, src.astype(dst.dtype) if src.dtype != dst.dtype else src)
    else:
        for d, s in zip(dst, src):
            _write_back(d, s)


def mixed(fn=None, *, keep=(), inplace=(), accumulates=False):
    """Decorator: with any 16-bit array among the arguments (also inside tuples,
    such as caches), call ``fn`` on float32 copies and round its float32 results
    to that 16-bit dtype — except the results at the index paths in ``keep``
    (``(1, 1)`` = ``result[1][1]``), which stay float32.  ``inplace``: positions of
    arguments ``fn`` adds into (a gradient accumulator), and the ``out`` keyword:
    ``fn`` writes into float32 arrays (copies of the caller's with
    ``accumulates``, else fresh), rounded back into the caller's arrays.
    Without 16-bit arguments ``fn`` runs as it is."""
    def wrap(f):
        @functools.wraps(f)
        def run(*args, **kw):
            dt = _half_of(args) or _half_of(tuple(kw.values()))
            if dt is None:
                return f(*args, **kw)
            outs = [(i, args[i]) for i in inplace if i < len(args)]
            wide = [_up(a) for a in args]
            wkw = {k: (_up(v) if k != "out" or accumulates or v is None else _empty_like(v))
                   for k, v in kw.items()}
            r = f(*wide, **wkw)
            for i, orig in outs:
                _write_back(orig, wide[i])
            if kw.get("out") is not None:
                _write_back(kw["out"], wkw["out"])
                if r is wkw["out"] or (isinstance(r, tuple) and isinstance(wkw["out"], tuple)
                                       and all(a is b for a, b in zip(r, wkw["out"]))):
                    return kw["out"]
            return _down(r, dt, keep)
        run.mixed_precision = True
        return run
    return wrap if fn is None else wrap(fn)
