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

__all__ = ["BF16", "FP16", "HALF", "PRECISIONS", "add_", "is_half", "mixed", "acc_dtype",
           "precision_dtype", "round_fp16", "round_to", "widen"]


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


# ------------------------------------------------------- float16 conversions
# NumPy rounds float32 → float16 one element at a time (~3 ns an element here, ~1
# for ml_dtypes' bfloat16).  round_fp16 gives the same bits with a dozen
# vectorised passes over blocks that stay in the CPU cache, letting the float32
# adder do the rounding: for |x| in [2^e, 2^(e+1)) the number C = 2^(e+13) has the
# float32 spacing 2^(e-10), float16's spacing there, so the float32 sum
#     S = |x| + C  =  C + m·2^(e-10)
# holds m = |x|/2^(e-10) rounded to nearest, ties to even (1024 ≤ m ≤ 2048: the
# float16 significand, 2048 when it carries into the next binade).  Below 2^-14
# float16's spacing stays 2^-24 (subnormals): C = 2^-1.  The float16 bits
# (e + 15)·2^10 + m − 2^10 are then (S + S >> 13) mod 2^16 when C carries 2048 in
# its low bits (even, so the ties still go to even m).  |x| ≥ 65520 (→ ±inf),
# inf and NaN are left to NumPy's own cast: same bits, same overflow warning.
# Blocks of 2^18 elements (1 MiB per uint32 buffer, in L2/L3): each of the dozen
# NumPy calls per block costs ~1.5 µs, which at 2^14 elements was ~1 ns an element
# (measured on the development VM: 2.5-2.9 ns an element at 2^14, 1.7-2.2 at 2^18).
_BLOCK16 = 1 << 18
_U32 = np.uint32
_ABS, _EXP, _SIGN16 = _U32(0x7FFFFFFF), _U32(0x7F800000), _U32(0x8000)
_C_MIN = _U32(113 << 23)                  # 2^-14: float16's smallest normal
_C_ADD = _U32((13 << 23) | 2048)          # C = 2^(e+13), plus 2048 units in its last place
_TO_INF = 0x477FF000                      # the bits of 65520: |x| from here rounds to inf


def _round_block(u: np.ndarray, o: np.ndarray, a: np.ndarray, c: np.ndarray) -> None:
    """float16 bits ``o`` of the float32 bits ``u`` (scratch ``a``, ``c``)."""
    np.bitwise_and(u, _ABS, out=a)                        # |x|
    special = a.max() >= _TO_INF
    if special:
        big = a >= _TO_INF
        a[big] = 0
    np.bitwise_and(u, _EXP, out=c)                        # C = 2^(max(e, -14) + 13) + 2048 ulp
    np.maximum(c, _C_MIN, out=c)
    c += _C_ADD
    if special:
        c[big] = _C_MIN + _C_ADD
    np.add(a.view(np.float32), c.view(np.float32), out=a.view(np.float32))   # S = |x| + C
    np.right_shift(a, _U32(13), out=c)
    a += c                                                # S + S >> 13
    np.right_shift(u, _U32(16), out=c)
    c &= _SIGN16
    a |= c                                                # the sign
    np.copyto(o, a, casting="unsafe")                     # mod 2^16
    if special:
        o[big] = u[big].view(np.float32).astype(np.float16).view(np.uint16)


def round_fp16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x.astype(np.float16)``, bit for bit, for a float32 array (round to nearest
    even, subnormals, ±0, overflow to ±inf with NumPy's warning, inf, NaN), ~1.5×
    faster; into ``out`` (float16, shape of ``x``) when given.  NumPy's underflow
    flag (ignored by default) is not raised."""
    if out is None:
        out = np.empty(x.shape, FP16)
    if x.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
        np.copyto(out, x, casting="unsafe")               # NumPy's own cast
        return out
    _in_blocks(_round_block, x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16),
               np.uint32, np.uint32)
    return out


def _in_blocks(block_fn, src: np.ndarray, dst: np.ndarray, *scratch) -> None:
    """``block_fn(src, dst, *scratch buffers)`` over blocks of ``_BLOCK16`` elements
    of the flat arrays ``src``, ``dst`` (one scratch buffer per dtype in ``scratch``)."""
    bufs = [np.empty(min(_BLOCK16, src.size), dt) for dt in scratch]
    for i in range(0, src.size, _BLOCK16):
        j = min(i + _BLOCK16, src.size)
        block_fn(src[i:j], dst[i:j], *(b[:j - i] for b in bufs))


# float16 → float32 is exact, and four integer/float passes do it (~0.5 ns an
# element here, against ~1.9 for NumPy's element-by-element cast): the float16 bits
# h, sign-extended to 32 bits and shifted left by 13, hold the exponent and the
# significand where float32 keeps them and the sign in bit 31 (bits 28-30 are
# copies of it: cleared).  Read as float32 that is the number times 2^-112 (bias
# 127 instead of 15; float16 subnormals k·2^-24 land on float32 subnormals
# k·2^-136), so one exact multiplication by 2^112 finishes.  Exponent 31 (inf,
# NaN) is left to NumPy's cast.
_SCALE_UP = np.float32(2.0 ** 112)
_CLEAR_28_30 = np.int32(~0x70000000)
_EXP16 = np.uint16(0x7C00)


def _widen_block(h: np.ndarray, w: np.ndarray, t: np.ndarray) -> None:
    """float32 bits ``w`` of the float16 bits ``h`` (scratch ``t``)."""
    wi, wf = w.view(np.int32), w.view(np.float32)
    np.copyto(wi, h.view(np.int16))                       # sign-extended
    wi <<= 13
    wi &= _CLEAR_28_30
    wf *= _SCALE_UP
    np.bitwise_and(h, _EXP16, out=t)
    if t.max() == _EXP16:                                 # inf or NaN: NumPy's cast
        bad = t == _EXP16
        wf[bad] = h[bad].view(FP16).astype(np.float32)


def widen(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 copy of a 16-bit array (exact: NumPy's / ``ml_dtypes``' cast bit for
    bit), into ``out`` (float32, shape of ``a``) when given."""
    if out is None:
        out = np.empty(a.shape, np.float32)
    if a.dtype != FP16 or not out.flags.c_contiguous:
        np.copyto(out, a)                                 # NumPy's (ml_dtypes') cast
        return out
    h = (a if a.flags.c_contiguous else a.copy()).reshape(-1).view(np.uint16)
    _in_blocks(_widen_block, h, out.reshape(-1).view(np.uint32), np.uint16)
    return out


def add_(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc += x`` in place, bit for bit (a gradient accumulation, a residual add;
    a NaN stays a NaN, its payload bits may differ).

    For 16-bit arrays NumPy and ``ml_dtypes`` add element by element (~11 ns an
    element here for float16): each sum is ``round₁₆(float32(a) + float32(b))``.
    This computes the same with whole-array passes — widen both, add in float32,
    round once — which is the correctly rounded sum: float32's 24 bits are at
    least 2p + 2 for float16's p = 11 and bfloat16's p = 8, so rounding twice does
    no harm (Figueroa 1995).  An ``acc`` of all +0 (a gradient after
    ``zero_grad``) takes ``x`` itself, with −0 made +0 as ``0 + (−0) = +0``.
    Other dtypes, layouts or shapes: ``acc += x``."""
    if not (acc.dtype in HALF and x.dtype == acc.dtype and acc.shape == x.shape
            and acc.flags.c_contiguous and x.flags.c_contiguous):
        acc += x
        return acc
    bits = acc.view(np.uint16)
    if not bits.any():                                    # 0 + x = x, −0 → +0
        np.copyto(acc, x)
        bits[bits == 0x8000] = 0
        return acc
    s = widen(acc)
    s += widen(x)
    return round_to(s, acc.dtype, out=acc)


def round_to(x: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """round₁₆: the float32 array ``x`` rounded to ``dtype`` (into ``out`` when
    given), exactly ``x.astype(dtype)``."""
    if np.dtype(dtype) == FP16 and x.dtype == np.float32:
        return round_fp16(x, out)
    if out is None:
        return x.astype(dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def _up(a):
    if isinstance(a, np.ndarray):
        return widen(a) if a.dtype in HALF else a
    if isinstance(a, tuple):
        return tuple(_up(x) for x in a)
    return a


def _down(r, dt, keep, path=()):
    if path in keep:
        return r
    if isinstance(r, np.ndarray):
        return round_to(r, dt) if r.dtype == np.float32 else r
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
            np.copyto(dst, round_to(src, dst.dtype) if src.dtype != dst.dtype else src)
    else:
        for d, s in zip(dst, src):
            _write_back(d, s)


def _is_buffer(r, w) -> bool:
    """``r`` is the float32 output buffer ``w``, or a view of all of it with its shape
    (``out.reshape(-1)...reshape(shape)``); elementwise for tuples."""
    if isinstance(r, tuple) and isinstance(w, tuple):
        return len(r) == len(w) and all(_is_buffer(a, b) for a, b in zip(r, w))
    return r is w or (isinstance(r, np.ndarray) and isinstance(w, np.ndarray)
                      and r.shape == w.shape and r.strides == w.strides
                      and r.__array_interface__["data"] == w.__array_interface__["data"])


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
                if _is_buffer(r, wkw["out"]):           # already rounded into the caller's
                    return kw["out"]
            return _down(r, dt, keep)
        run.mixed_precision = True
        return run
    return wrap if fn is None else wrap(fn)
