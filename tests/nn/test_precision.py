"""The float16 conversions of :mod:`simpar.nn.precision` are NumPy's, bit for bit:
``round_fp16(x) == x.astype(float16)`` and ``widen(h) == h.astype(float32)`` —
on every float32 class (zeros, float32 subnormals, every float16 rounding
boundary and tie, float16 subnormals, overflow, inf, NaN payloads), with a
negative control showing that the test set catches a converter that breaks ties
the wrong way.  The conversions feed every 16-bit kernel, the decorator and the
optimizer; their fast paths must change no bit of a result.

``python -m tests.nn.test_precision`` checks ``round_fp16`` against NumPy on all
2³² float32 bit patterns (minutes; not part of the suite).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from simpar.mixed_precision import MixedPrecisionOptimizer, _finite
from simpar.nn import kernels as K
from simpar.nn import precision as P
from simpar.nn.functional import split_heads
from simpar.optim import AdamW

NAMED = [0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * (1 + 2.0 ** -23), 2.0 ** -26,
         3 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11), 1.0, 1 + 2.0 ** -11,
         1 + 3 * 2.0 ** -11, 2048.5, 65504.0, 65519.99, 65520.0, 65536.0, 1e30, 3.4e38,
         np.inf, np.nan, 1e-45, 1e-40, 1.17e-38]


def float32_cases(seed: int = 0) -> np.ndarray:
    """Every sign, exponent and top 11 significand bits (2²⁰ patterns: the float16
    kept bits, its rounding bit and the parity, for every exponent) with low bits
    0, 1, 0x7FF, 0x800, 0xFFF (exact ties, just above, just below, sticky bits),
    2¹⁸ random bit patterns, NaNs with payloads, and named values of both signs."""
    high = np.arange(1 << 20, dtype=np.uint32) << 12
    low = np.array([0, 1, 0x7FF, 0x800, 0xFFF], np.uint32)
    grid = (high[:, None] | low[None, :]).ravel()
    rnd = np.random.default_rng(seed).integers(0, 1 << 32, 1 << 18, dtype=np.uint64)
    nans = np.array([0x7F800001, 0x7FC00000, 0x7FBFFFFF, 0x7F802000, 0x7FFFFFFF],
                    np.uint32)
    named = np.array(NAMED, np.float32).view(np.uint32)
    bits = np.concatenate([grid, rnd.astype(np.uint32), nans, nans | 0x80000000,
                           named, named ^ 0x80000000])
    return bits.view(np.float32)


def mismatches(convert, x: np.ndarray) -> int:
    """Elements where ``convert(x)`` and NumPy's cast differ in any bit."""
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
        got = convert(x).view(np.uint16)
    assert got.shape == want.shape
    return int(np.count_nonzero(got != want))


def ties_away_from_zero(x: np.ndarray) -> np.ndarray:
    """A wrong rounding for the negative control: half-way cases go up in magnitude."""
    with np.errstate(invalid="ignore"):
        return np.nextafter(x, np.copysign(np.float32(np.inf), x)).astype(np.float16)


@pytest.mark.parametrize("block", [None, 7, 1000])
def test_round_fp16_is_numpys_cast_bit_for_bit(block, monkeypatch):
    if block is not None:                       # several blocks and a partial one
        monkeypatch.setattr(P, "_BLOCK16", block)
    x = float32_cases()
    if block is not None:
        x = np.concatenate([x[:40_000], x[-200:]])
    assert mismatches(P.round_fp16, x) == 0
    assert mismatches(P.round_fp16, x[::-1].copy()) == 0     # specials in other blocks


def test_negative_control_the_cases_catch_wrong_ties_and_truncation():
    x = float32_cases()
    assert mismatches(ties_away_from_zero, x) > 1000
    trunc = lambda a: ((a.view(np.uint32) >> 16).astype(np.uint16) & 0x8000   # noqa: E731
                       | ((np.abs(a).view(np.uint32) >> 13) - (112 << 10)).astype(np.uint16)
                       ).view(np.float16)
    assert mismatches(trunc, x) > 1000


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 16385)])
def test_round_fp16_shapes_layouts_and_out(shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3e3).astype(np.float32)
    r = P.round_fp16(x)
    assert r.dtype == np.float16 and r.shape == x.shape
    assert np.array_equal(r.view(np.uint16), x.astype(np.float16).view(np.uint16))
    out = np.full(shape, 7, np.float16)
    assert P.round_fp16(x, out) is out and np.array_equal(out, r)
    if x.ndim == 2:                             # strided input and output: NumPy's cast
        assert np.array_equal(P.round_fp16(x.T), x.T.astype(np.float16))
        o = np.zeros((x.shape[1], x.shape[0]), np.float16).T
        P.round_fp16(x, o)
        assert np.array_equal(o, r)
        x64 = x.astype(np.float64)              # another dtype: NumPy's cast
        assert np.array_equal(P.round_to(x64, P.FP16), x64.astype(np.float16))


def test_round_fp16_warns_on_overflow_like_numpy_and_only_then():
    with pytest.warns(RuntimeWarning, match="overflow encountered in cast"):
        r = P.round_fp16(np.array([1.0, 7e4, -1e6], np.float32))
    assert list(r) == [1.0, np.inf, -np.inf]
    with pytest.warns(RuntimeWarning, match="overflow encountered in cast"):
        assert P.round_fp16(np.array([65520.0], np.float32))[0] == np.inf  # the threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.round_fp16(np.array([65519.0, -0.0, 1e-30, np.inf, np.nan], np.float32))


@pytest.mark.parametrize("block", [None, 7, 1000])
def test_widen_is_numpys_cast_for_all_65536_float16_patterns(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(P, "_BLOCK16", block)
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    want = h.astype(np.float32).view(np.uint32)
    assert np.array_equal(P.widen(h).view(np.uint32), want)
    out = np.empty(h.shape, np.float32)
    assert P.widen(h, out) is out and np.array_equal(out.view(np.uint32), want)
    h2 = h.reshape(256, 256)
    assert np.array_equal(P.widen(h2.T).view(np.uint32), want.reshape(256, 256).T)
    assert P.widen(h[5:6].reshape(())).shape == ()
    o = np.zeros((256, 256), np.float32).T                  # strided out: NumPy's cast
    assert P.widen(h2, o) is o and np.array_equal(o.view(np.uint32), want.reshape(256, 256))
    b = np.array([1.5, -3.0], P.BF16)
    assert np.array_equal(P.widen(b), b.astype(np.float32))


def test_negative_control_widen_without_clearing_the_sign_copies_fails():
    """The same passes without ``&= ~0x70000000``: every negative number is wrong,
    and the test above would see it."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    with np.errstate(all="ignore"):
        w = (h.view(np.int16).astype(np.int32) << 13).view(np.float32) * P._SCALE_UP
    wrong = w.view(np.uint32) != h.astype(np.float32).view(np.uint32)
    assert wrong[np.signbit(h) & np.isfinite(h)].all() and not wrong[~np.signbit(h)
                                                                      & np.isfinite(h)].any()


def test_gelu_backward_with_out_returns_the_callers_buffer_rounded_once():
    rng = np.random.default_rng(2)
    x, dy = (rng.standard_normal((2, 3, 40)).astype(np.float16) for _ in range(2))
    want = K.gelu_backward_fast(dy, x)                      # a fresh result
    buf = dy.copy()
    got = K.gelu_backward_fast(buf, x, out=buf)
    assert got is buf and np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_attention_cache_holds_views_of_the_callers_16_bit_q_k_v():
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 8, 96)).astype(np.float16)
    q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
    y, (qh, kh, vh, att, scale) = K.attention_forward_fast(q, k, v, 4)
    for a, ah in ((q, qh), (k, kh), (v, vh)):
        assert ah.dtype == np.float16 and np.shares_memory(ah, qkv)
        assert np.array_equal(ah, split_heads(a, 4))
    y32, (_, _, _, att32, _) = K.attention_forward_fast(q.astype(np.float32),
                                                        k.astype(np.float32),
                                                        v.astype(np.float32), 4)
    assert np.array_equal(y, y32.astype(np.float16)) and np.array_equal(att, att32.astype(np.float16))
    assert scale == 1 / np.sqrt(8)


def test_finite_check_reads_float16_bits():
    g = np.array([0.0, -65504.0, 6e-8, 1.0], np.float16)
    assert _finite(g) and _finite(g[::2]) and _finite(g[:0])
    for bad in (np.inf, -np.inf, np.nan):
        h = g.copy()
        h[2] = bad
        assert not _finite(h)                   # negative control
        assert _finite(h) == bool(np.isfinite(np.sum(h, dtype=np.float32)))


def test_optimizer_step_equals_numpys_casts_bit_for_bit():
    """Master update and the rounding into the model: as ``np.multiply(g₁₆, 1/S)``
    in float32, AdamW, ``copyto(w₁₆, w₃₂)`` with NumPy's casts."""
    rng = np.random.default_rng(4)
    params = {"a": (rng.standard_normal((30, 7)) * 0.02).astype(np.float16),
              "b": rng.standard_normal(5).astype(np.float16)}
    ref_master = {k: p.astype(np.float32) for k, p in params.items()}
    ref = AdamW(ref_master, lr=1e-2)
    opt = MixedPrecisionOptimizer(params, lr=1e-2)
    for step in range(3):
        grads = {k: (rng.standard_normal(p.shape) * 2.0 ** 10).astype(np.float16)
                 for k, p in params.items()}
        assert opt.step(grads)
        ref.step({k: np.multiply(g, np.float32(1 / 2.0 ** 16)) for k, g in grads.items()})
        for k, p in params.items():
            assert np.array_equal(opt.master[k].view(np.uint32), ref_master[k].view(np.uint32))
            assert np.array_equal(p.view(np.uint16),
                                  ref_master[k].astype(np.float16).view(np.uint16))


def exhaustive() -> None:
    """``round_fp16`` against NumPy on every float32 bit pattern, in chunks."""
    t0, n, bad = time.time(), 1 << 24, 0
    for k in range(1 << 8):
        x = np.arange(k * n, (k + 1) * n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        bad += mismatches(P.round_fp16, x)
        if k % 32 == 31:
            print(f"{(k + 1) * n:,} float32 patterns, {bad} mismatches, {time.time() - t0:.0f} s",
                  flush=True)
    print("round_fp16 == astype(float16) on all 2^32 float32:", "yes" if bad == 0 else "NO")


if __name__ == "__main__":
    exhaustive()


def _sixteen_bit_pairs(dtype, seed: int = 0):
    """Every 16-bit pattern as ``acc`` against a shuffled copy as ``x`` (both
    signs of zero, subnormals, the largest finite values, inf, NaNs), plus
    random pairs."""
    rng = np.random.default_rng(seed)
    every = np.arange(1 << 16, dtype=np.uint16)
    a = np.concatenate([every, rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint16)])
    b = np.concatenate([rng.permutation(every), every])
    return a.view(dtype), b.view(dtype)


@pytest.mark.parametrize("dtype", [P.FP16, P.BF16], ids=["fp16", "bf16"])
def test_add_is_numpys_16_bit_add_bit_for_bit(dtype):
    """Every bit but NaN payloads (NumPy's float16 add picks another NaN's)."""
    a, b = _sixteen_bit_pairs(dtype)
    with np.errstate(all="ignore"):
        want = (a + b).view(np.uint16)
        got = P.add_(a.copy(), b)
    nan = np.isnan(want.view(dtype))
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint16)[~nan], want[~nan])
    acc = a.copy()
    with np.errstate(all="ignore"):
        assert P.add_(acc, b) is acc                    # in place
    assert np.array_equal(acc.view(np.uint16)[~nan], want[~nan])


@pytest.mark.parametrize("dtype", [P.FP16, P.BF16], ids=["fp16", "bf16"])
def test_add_into_zeros_takes_x_with_minus_zero_made_plus_zero(dtype):
    _, b = _sixteen_bit_pairs(dtype)
    with np.errstate(all="ignore"):
        want = (np.zeros_like(b) + b).view(np.uint16)
    nan = np.isnan(b)
    with np.errstate(all="ignore"):
        got = P.add_(np.zeros_like(b), b).view(np.uint16)
    assert np.array_equal(got[~nan], want[~nan]) and np.isnan(got.view(dtype)[nan]).all()
    # negative control: copying x alone keeps -0, which NumPy's 0 + (-0) does not
    assert not np.array_equal(b.copy().view(np.uint16)[~nan], want[~nan])
    acc = np.zeros_like(b)
    acc[5] = 1                                          # not all zeros: the general path
    with np.errstate(all="ignore"):
        want = (acc + b).view(np.uint16)
        got = P.add_(acc, b).view(np.uint16)
    assert np.array_equal(got[~nan], want[~nan])


def test_add_falls_back_to_numpy_for_other_dtypes_and_layouts():
    x = np.arange(12.0).reshape(3, 4)
    acc = np.ones((3, 4))
    assert P.add_(acc, x) is acc and np.array_equal(acc, 1 + x)
    h = np.arange(24, dtype=np.float16).reshape(4, 6)
    t = np.ones((6, 4), np.float16).T                   # a strided view: NumPy's own add
    assert P.add_(t, h) is t and np.array_equal(t, h + np.float16(1))
    z = np.zeros(4, np.float16)
    assert np.array_equal(P.add_(z, np.float32([1, 2, 3, 4])), [1, 2, 3, 4])    # mixed dtypes
