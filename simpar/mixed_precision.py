"""Mixed-precision training: float32 master weights and optimizer state, 16-bit
model, dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training",
§3.1–§3.2; Rajbhandari et al. 2020, ZeRO §3.1 and §5 for the byte counts).

The model (``dtype=BF16`` or ``FP16``, :mod:`simpar.nn.precision`) holds 16-bit
weights ``w₁₆`` and gradients ``g₁₆``; this optimizer keeps the float32 master copy
``w₃₂`` and the float32 Adam moments, and a step is::

    backward of  S · L              (S: the loss scale; float16 only)
    overflow  =  any(¬isfinite(g₁₆)) on any rank       (one small all-reduce, max)
    overflow:    skip the step;  S ← S / 2
    else:        g₃₂ = float32(g₁₆) / S  (· clip coefficient)
                 w₃₂ ← AdamW(w₃₂, g₃₂);  w₁₆ = round₁₆(w₃₂)
                 after ``growth_interval`` clean steps in a row:  S ← 2 S

Bytes per parameter (the memory ledger's ``params``, ``grads`` and ``optimizer``):
``2 + 2 + 12 = 16`` — K = 12 is ZeRO's mixed-precision Adam: 4 (master) + 4 (m) +
4 (v).  bfloat16 has float32's exponent range and needs no loss scaling
(``LossScaler(dynamic=False, init_scale=1)``); float16's smallest subnormal is
2⁻²⁴ ≈ 6·10⁻⁸, and gradients below it flush to zero unless scaled up
(:func:`count_underflow` counts them).

Composable: :class:`MixedPrecisionOptimizer` takes any dict of 16-bit parameter
arrays (or views: the shards a ZeRO optimizer owns) and any optimizer class of
:mod:`simpar.optim`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from . import trace
from .nn.precision import FP16, HALF, round_to, widen
from .optim import SGD, AdamW, Wrapped

__all__ = ["LossScaler", "MixedPrecisionOptimizer", "count_underflow", "default_scaler",
           "OPTIMIZERS"]

OPTIMIZERS = {"adamw": AdamW, "sgd": SGD}


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018 §3.2; the defaults of
    Megatron-LM's ``DynamicGradScaler``: start at 2¹⁶, halve on overflow, double
    after 1000 clean steps, never below 1).  ``dynamic=False``: a constant scale."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 factor: float = 2.0, min_scale: float = 1.0, dynamic: bool = True) -> None:
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive integer, got {growth_interval!r}")
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        self.scale, self.growth_interval = float(init_scale), growth_interval
        self.factor, self.min_scale, self.dynamic = float(factor), float(min_scale), dynamic
        self.clean_steps = 0          # consecutive steps without overflow
        self.skipped = 0              # steps skipped because of an overflow

    def update(self, overflow: bool) -> None:
        """After a step: lower the scale on overflow, raise it after
        ``growth_interval`` clean steps."""
        if overflow:
            self.skipped += 1
            self.clean_steps = 0
            if self.dynamic:
                self.scale = max(self.scale / self.factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.dynamic and self.clean_steps % self.growth_interval == 0:
            self.scale *= self.factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped": self.skipped}

    def load_state_dict(self, sd: Mapping) -> None:
        self.scale, self.clean_steps, self.skipped = (float(sd["scale"]), int(sd["clean_steps"]),
                                                      int(sd["skipped"]))

    def __repr__(self) -> str:
        return (f"LossScaler(scale={self.scale:g}, dynamic={self.dynamic}, "
                f"clean_steps={self.clean_steps}, skipped={self.skipped})")


def default_scaler(dtype, loss_scaling: bool = True) -> LossScaler:
    """Dynamic scaling for float16 (unless ``loss_scaling=False``: scale 1); a
    constant scale 1 for bfloat16 and float32."""
    if np.dtype(dtype) == FP16 and loss_scaling:
        return LossScaler()
    return LossScaler(init_scale=1.0, dynamic=False)


def count_underflow(grads: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(zeros, total)``: gradient elements that are exactly 0 — for float16
    without loss scaling, mostly values under 2⁻²⁴ flushed to zero."""
    zeros = sum(int(g.size - np.count_nonzero(g)) for g in grads.values())
    return zeros, sum(int(g.size) for g in grads.values())


def _finite(g: np.ndarray) -> bool:
    """No inf or NaN in ``g``: for float16, no exponent field of all ones (read off
    the bits, without converting); else the float32 sum is finite (as an inf or a
    NaN would make it)."""
    if g.dtype == FP16:
        return g.size == 0 or int((g.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(np.sum(g, dtype=np.float32)))


class MixedPrecisionOptimizer(Wrapped):
    """float32 master weights + a float32 optimizer over them, for a 16-bit model.

    ``params``: the model's live 16-bit arrays (updated in place, rounded from the
    masters after every step); ``optimizer``: ``"adamw"``/``"sgd"`` or a class of
    :mod:`simpar.optim`, with its hyper-parameters; ``comm``: the group over
    which the overflow check is agreed (the world of a parallel run; ``None`` on
    one device); ``scaler``: a :class:`LossScaler` (default: dynamic for float16).

    :meth:`step` returns whether it stepped (False: overflow, step skipped).
    The ledger gets the masters (4 bytes per parameter) and the optimizer its
    moments (8 with AdamW), category ``"optimizer"``.
    """

    def __init__(self, params: Mapping[str, np.ndarray], optimizer="adamw", *,
                 comm=None, scaler: LossScaler | None = None, **hyper) -> None:
        dtypes = {np.dtype(p.dtype) for p in params.values()}
        if not dtypes <= set(HALF) or len(dtypes) > 1:
            raise TypeError(f"MixedPrecisionOptimizer needs 16-bit parameters of one dtype "
                            f"(bfloat16 or float16), got {sorted(map(str, dtypes))}")
        cls = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
        self.params = dict(params)
        self.dtype = dtypes.pop() if dtypes else FP16
        self.comm = comm
        self.scaler = scaler if scaler is not None else default_scaler(self.dtype)
        self.master = {k: p.astype(np.float32) for k, p in self.params.items()}
        trace.alloc("optimizer", sum(m.nbytes for m in self.master.values()))
        self.inner = cls(self.master, **hyper)
        self._g32: np.ndarray | None = None

    def state_nbytes(self) -> int:
        """Optimizer bytes: masters + the inner optimizer's state (K·Ψ, K = 12 for AdamW)."""
        return sum(m.nbytes for m in self.master.values()) + self.inner.state_nbytes()

    # ------------------------------------------------------------------ step
    def found_overflow(self, grads: Mapping[str, np.ndarray]) -> bool:
        """inf or NaN in any gradient on any rank of ``comm`` (one all-reduce of one
        number: every rank gets the same answer)."""
        bad = any(not _finite(g) for g in grads.values())
        if self.comm is None:
            return bad
        return bool(self.comm.all_reduce(np.array([float(bad)]), op="max")[0] > 0)

    def step(self, grads: Mapping[str, np.ndarray], *, max_norm: float | None = None,
             norm: Callable[[], float] | float | None = None) -> bool:
        """Unscale, (clip,) update the masters, round them into the model.

        ``max_norm``: clip the unscaled gradient to this global norm; ``norm``: the
        global norm of the (scaled, 16-bit) gradient ``grads`` — a number or a
        callable (e.g. ``model.grad_norm``: counted once over every shard) —
        default: the norm of ``grads`` here.  Returns False when the step was
        skipped (overflow)."""
        used = self.scaler.scale                         # what this backward was scaled by
        overflow = self.found_overflow(grads)
        self.scaler.update(overflow)
        if overflow:
            return False
        coef = 1.0 / used
        if max_norm is not None:
            if norm is None:
                total = sum(float(np.dot(g.ravel().astype(np.float32),
                                         g.ravel().astype(np.float32))) for g in grads.values())
                n = math.sqrt(total)
            else:
                n = norm() if callable(norm) else float(norm)
            n *= coef                                     # the norm of the unscaled gradient
            if n > max_norm:
                coef *= max_norm / (n + 1e-6)
        inner = self.inner
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise KeyError(f"no gradient for parameter(s) {missing}")
        inner.state["t"] += 1
        for k, p in self.params.items():
            w = self.master[k]
            g = self._scratch(w)
            if grads[k].dtype in HALF:
                widen(grads[k], out=g)
                g *= np.float32(coef)
            else:
                np.multiply(grads[k], np.float32(coef), out=g, casting="unsafe")
            inner._update(k, w, g, inner._buffer(w))
            round_to(w, p.dtype, out=p)                   # w₁₆ = round₁₆(w₃₂)
        return True

    @property
    def loss_scale(self) -> float:
        """The scale ``S`` the next backward must multiply the loss by."""
        return self.scaler.scale

    def _scratch(self, w: np.ndarray) -> np.ndarray:
        if self._g32 is None or self._g32.size < w.size:
            self._g32 = np.empty(w.size, np.float32)
        return self._g32[:w.size].reshape(w.shape)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "scaler": self.scaler.state_dict(),
                "master": {k: m.copy() for k, m in self.master.items()}}

    def load_state_dict(self, sd: Mapping) -> None:
        self.inner.load_state_dict(sd["inner"])
        self.scaler.load_state_dict(sd["scaler"])
        for k, m in sd["master"].items():
            self.master[k][...] = m
            np.copyto(self.params[k], self.master[k], casting="unsafe")

    def __repr__(self) -> str:
        return (f"MixedPrecisionOptimizer({len(self.params)} tensors {self.dtype}, "
                f"{self.inner!r}, {self.scaler!r})")
