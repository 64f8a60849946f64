"""Optimizers with explicit, shardable state: SGD (with momentum) and AdamW.

An optimizer is built over a flat dict ``name -> np.ndarray`` of *live*
parameters and updates them **in place**::

    opt = AdamW(model.parameters(), lr=3e-3)
    model.zero_grad(); model.loss(x, y)
    opt.step(model.gradients())          # same keys as the parameters

All state is plain data in ``opt.state`` -- for AdamW ``{"t": int, "m": {...},
"v": {...}}`` with one array per parameter, of the parameter's dtype -- so
ZeRO can build one optimizer per rank over that rank's *shards* of the
parameters and hold only ``1/N`` of the moments.  ``state_dict()`` /
``load_state_dict()`` copy the state (and the hyper-parameters) out and in.

The bytes of the state are registered in the memory ledger of the current
tracer (category ``"optimizer"``) when the optimizer is created.

Updates are written with ``out=`` NumPy calls and one scratch buffer (the size
of the largest parameter, not counted as optimizer state), so a float32 model
stays float32 and a step over millions of weights allocates nothing.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from . import trace

__all__ = ["Optimizer", "SGD", "AdamW", "Wrapped", "grad_norm", "clip_grad_norm"]


def _check_lr(lr) -> float:
    lr = float(lr)
    if not (lr >= 0.0) or math.isinf(lr):
        raise ValueError(f"learning rate must be a finite number >= 0, got lr={lr!r}")
    return lr


def _check_wd(weight_decay) -> float:
    weight_decay = float(weight_decay)
    if not (weight_decay >= 0.0) or math.isinf(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, "
                         f"got weight_decay={weight_decay!r}")
    return weight_decay


class Optimizer:
    """Base class: parameter bookkeeping, gradient checks, state (de)serialisation.

    Subclasses set ``self.state`` (``"t"`` plus one dict of arrays per kind of
    state, e.g. ``"m"`` and ``"v"``), list the hyper-parameter names in
    ``_hyper`` and implement ``_update(name, p, g, buf)``.
    """

    _hyper: tuple[str, ...] = ()
    _state_kinds: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict name -> np.ndarray, got {type(params).__name__}"
                            " (use model.parameters())")
        for name, p in params.items():
            if not isinstance(p, np.ndarray):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a np.ndarray")
            if p.dtype.kind != "f":
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; expected floating point")
            if not p.flags.writeable:
                raise ValueError(f"parameter {name!r} is read-only; the optimizer updates in place")
        self.params: dict[str, np.ndarray] = dict(params)
        self.state: dict = {"t": 0}
        self._scratch: dict[np.dtype, np.ndarray] = {}

    # ---------------------------------------------------------------- state
    def _new_state(self, kind: str) -> dict[str, np.ndarray]:
        """Zero-filled arrays shaped and typed like the parameters, put in the ledger."""
        arrays = {k: np.zeros_like(p) for k, p in self.params.items()}
        trace.alloc("optimizer", sum(a.nbytes for a in arrays.values()))
        return arrays

    @property
    def t(self) -> int:
        """Number of steps taken."""
        return self.state["t"]

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held (what the memory ledger was told)."""
        return sum(a.nbytes for kind in self._state_kinds for a in self.state[kind].values())

    def hyperparameters(self) -> dict:
        return {h: getattr(self, h) for h in self._hyper}

    def state_dict(self) -> dict:
        """A deep copy: ``{"hyper": {...}, "t": int, <kind>: {name: array}}``."""
        sd = {"hyper": self.hyperparameters(), "t": int(self.state["t"])}
        for kind in self._state_kinds:
            sd[kind] = {k: a.copy() for k, a in self.state[kind].items()}
        return sd

    def load_state_dict(self, sd: Mapping) -> None:
        """Copy ``sd`` (from :meth:`state_dict`) into this optimizer's state arrays."""
        for kind in self._state_kinds:
            if kind not in sd:
                raise KeyError(f"state dict has no {kind!r} entry")
            src = sd[kind]
            missing = sorted(set(self.params) - set(src))
            extra = sorted(set(src) - set(self.params))
            if missing or extra:
                raise KeyError(f"state dict {kind!r} keys do not match the parameters: "
                               f"missing {missing}, unexpected {extra}")
            for k, a in src.items():
                if np.shape(a) != self.state[kind][k].shape:
                    raise ValueError(f"state {kind!r}[{k!r}] has shape {np.shape(a)}, "
                                     f"expected {self.state[kind][k].shape}")
        t = int(sd.get("t", 0))
        if t < 0:
            raise ValueError(f"step count t must be >= 0, got t={t}")
        if "hyper" in sd:
            self._set_hyper(**sd["hyper"])
        for kind in self._state_kinds:
            for k, a in sd[kind].items():
                self.state[kind][k][...] = a
        self.state["t"] = t

    def _set_hyper(self, **hyper) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- step
    def _buffer(self, p: np.ndarray) -> np.ndarray:
        """A scratch view shaped like ``p`` (one flat buffer per dtype, grown as needed)."""
        buf = self._scratch.get(p.dtype)
        if buf is None or buf.size < p.size:
            buf = np.empty(p.size, dtype=p.dtype)
            self._scratch[p.dtype] = buf
        return buf[:p.size].reshape(p.shape)

    def _checked_grads(self, grads: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise KeyError(f"no gradient for parameter(s) {missing}")
        out = []
        for k, p in self.params.items():
            g = grads[k]
            if np.shape(g) != p.shape:
                raise ValueError(f"gradient {k!r} has shape {np.shape(g)}, parameter has {p.shape}")
            out.append((k, p, g))
        return out

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """One update of every parameter from ``grads`` (same keys; extra keys are ignored)."""
        items = self._checked_grads(grads)
        self.state["t"] += 1
        for k, p, g in items:
            self._update(k, p, g, self._buffer(p))

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, buf: np.ndarray) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self.params)} tensors, {hp}, t={self.t})"


class Wrapped:
    """An optimizer around an inner one (``self.inner``: mixed precision's float32
    masters, ZeRO's shards): the learning rate (settable), step count and
    hyper-parameters are the inner optimizer's."""

    inner: Optimizer

    @property
    def lr(self) -> float:
        return self.inner.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.inner.lr = value

    @property
    def t(self) -> int:
        return self.inner.t

    def hyperparameters(self) -> dict:
        return self.inner.hyperparameters()


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and (L2) weight decay.

    With ``d = g + weight_decay * p``::

        buf = momentum * buf + d        (buf starts at 0; only if momentum > 0)
        p  -= lr * buf                  (or lr * d without momentum)

    which is the convention of PyTorch's ``torch.optim.SGD`` (no dampening).
    """

    _hyper = ("lr", "momentum", "weight_decay")

    def __init__(self, params: Mapping[str, np.ndarray], lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params)
        self._set_hyper(lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._state_kinds = ("momentum",) if self.momentum > 0 else ()
        if self.momentum > 0:
            self.state["momentum"] = self._new_state("momentum")

    def _set_hyper(self, lr, momentum, weight_decay) -> None:
        momentum = float(momentum)
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        if (momentum > 0) != (getattr(self, "momentum", momentum) > 0):
            raise ValueError(f"cannot switch momentum on or off after creation "
                             f"(momentum={self.momentum!r} -> {momentum!r})")
        self.lr = _check_lr(lr)
        self.momentum = momentum
        self.weight_decay = _check_wd(weight_decay)

    def _update(self, name, p, g, buf):
        lr, wd, mu = float(self.lr), float(self.weight_decay), float(self.momentum)
        if wd != 0.0:
            np.multiply(p, wd, out=buf)
            buf += g
            d = buf
        else:
            d = g
        if mu > 0.0:
            mom = self.state["momentum"][name]
            mom *= mu
            mom += d
            d = mom
        np.multiply(d, lr, out=buf)
        p -= buf


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    At step ``t`` (starting at 1), for each parameter ``p`` with gradient ``g``::

        p -= lr * weight_decay * p                     # decoupled decay
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t);  v_hat = v / (1 - beta2**t)   # Kingma & Ba
        p -= lr * m_hat / (sqrt(v_hat) + eps)

    as in PyTorch's ``torch.optim.AdamW``.  ``m`` and ``v`` are in
    ``opt.state["m"]`` / ``opt.state["v"]`` (also ``opt.m`` / ``opt.v``).
    """

    _hyper = ("lr", "betas", "eps", "weight_decay")
    _state_kinds = ("m", "v")

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params)
        self._set_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.state["m"] = self._new_state("m")
        self.state["v"] = self._new_state("v")

    def _set_hyper(self, lr, betas, eps, weight_decay) -> None:
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair of floats, got betas={betas!r}") from None
        for i, b in enumerate((b1, b2)):
            if not (0.0 <= b < 1.0):
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r} (betas={betas!r})")
        eps = float(eps)
        if not (eps > 0.0) or math.isinf(eps):
            raise ValueError(f"eps must be a finite number > 0, got eps={eps!r}")
        self.lr = _check_lr(lr)
        self.betas = (b1, b2)
        self.eps = eps
        self.weight_decay = _check_wd(weight_decay)

    @property
    def m(self) -> dict[str, np.ndarray]:
        return self.state["m"]

    @property
    def v(self) -> dict[str, np.ndarray]:
        return self.state["v"]

    def _update(self, name, p, g, buf):
        # Python floats only: a NumPy float64 scalar would upcast float32 arrays.
        lr, eps, wd = float(self.lr), float(self.eps), float(self.weight_decay)
        b1, b2 = self.betas
        t = self.state["t"]
        step_size = lr / (1.0 - b1 ** t)
        inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** t)
        m, v = self.state["m"][name], self.state["v"][name]

        if wd != 0.0:
            p *= 1.0 - lr * wd
        # m <- b1 m + (1 - b1) g, written as m -= (1 - b1)(m - g)
        np.subtract(m, g, out=buf)
        buf *= 1.0 - b1
        m -= buf
        # v <- b2 v + (1 - b2) g^2
        np.multiply(g, g, out=buf)
        buf *= 1.0 - b2
        v *= b2
        v += buf
        # p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        np.sqrt(v, out=buf)
        buf *= inv_sqrt_bc2
        buf += eps
        np.divide(m, buf, out=buf)
        buf *= step_size
        p -= buf


# ------------------------------------------------------------ gradient norms
def grad_norm(grads: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over all gradient arrays (per-array dot products summed as Python floats)."""
    total = 0.0
    for g in grads.values():
        flat = np.ravel(g)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float,
                   norm: float | None = None) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping.  ``norm`` may be given when it was
    computed elsewhere, e.g. summed over the shards of several ranks
    (``sqrt(all_reduce(sum of squares))``), so every rank scales alike.
    """
    max_norm = float(max_norm)
    if not (max_norm > 0.0):
        raise ValueError(f"max_norm must be > 0, got max_norm={max_norm!r}")
    total = grad_norm(grads) if norm is None else float(norm)
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total
