"""Stateful layers of a GPT, built on the pure pairs of :mod:`simpar.nn.functional`.

What each layer computes (the equations, with their papers, are those of
:mod:`~simpar.nn.functional`)::

    Linear               Y = X W + b                         (Shoeybi et al. 2019 §3 notation)
    LayerNorm            γ ⊙ (x − μ)/√(σ² + ε) + β           (Ba et al. 2016 §3)
    MLP                  GELU(X W₁ + b₁) W₂ + b₂             (Vaswani et al. 2017 §3.3; GELU:
                                                              Hendrycks & Gimpel 2016 §2)
    CausalSelfAttention  [Q|K|V] = X W_qkv;  per head softmax(Q Kᵀ/√d + M) V;
                         concat(heads) W_o                   (Vaswani et al. 2017 §3.2.1-§3.2.3)
    TransformerBlock     x + Attn(LN₁(x)), then + MLP(LN₂(·))   (Radford et al. 2019 §2.3)
    Embedding            y = E[ids]                          (Vaswani et al. 2017 §3.4)

Each class keeps its ``forward`` and ``backward`` side by side.  Inputs from the
caller are saved as copies (see :mod:`simpar.nn.module`); gradients accumulate.

Initialisation (GPT-2 style): weights ``N(0, 0.02²)``, biases 0, LayerNorm
``gamma = 1``, ``beta = 0``.  Random numbers are drawn in float64 and then cast,
so float32 and float64 models built from the same generator state hold the same
weights up to rounding.
"""
from __future__ import annotations

import math

import numpy as np

from .. import trace
from . import functional as F
from . import kernels as K
from .module import Module, frozen
from .precision import add_

INIT_STD = 0.02


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def normal_init(rng: np.random.Generator, shape, dtype, std: float = INIT_STD) -> np.ndarray:
    """``N(0, std²)`` drawn in float64 then cast to ``dtype``."""
    return (rng.standard_normal(shape) * std).astype(dtype)


class Linear(Module):
    """``Y = X @ W + b``; ``W`` is ``(n_in, n_out)``, ``b`` is ``(n_out,)``."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, rng=None,
                 dtype=np.float64, std: float = INIT_STD) -> None:
        super().__init__()
        rng = _rng(rng)
        self.n_in, self.n_out = n_in, n_out
        self.add_param("W", normal_init(rng, (n_in, n_out), dtype, std))
        if bias:
            self.add_param("b", np.zeros(n_out, dtype=dtype))

    def forward(self, x, key=0):
        y = F.linear_forward(x, self.params["W"], self.params.get("b"))
        self._save(key, copy={"x": x})
        return y

    def backward_pass(self, dy, key=0, *, weights=True):
        """``dx = dy Wᵀ``; with ``weights`` also ``dW = xᵀ dy``, ``db = Σ dy``, else
        those wait for :meth:`backward_weights` (zero-bubble ``I`` / ``W``)."""
        x = self._pop(key)["x"]
        if not weights:                         # zero-bubble I: dW, db wait for W
            self._save(key, copy={"dy": dy}, slot="W", x=x)     # x: already our copy
            return F.linear_backward_input(dy, self.params["W"])
        dx, dW, db = F.linear_backward(dy, x, self.params["W"])
        add_(self.grads["W"], dW)                # grads += dW (16 bits: rounded once)
        if "b" in self.params:
            self.grads["b"] += db
        return dx

    def backward_weights(self, key=0) -> None:
        """``dW = xᵀ dy``, ``db = Σ dy`` left by a deferred backward of ``key``."""
        s = self._pop(key, slot="W")
        dW, db = F.linear_backward_weight(s["dy"], s["x"])
        add_(self.grads["W"], dW)                # grads += dW (16 bits: rounded once)
        if "b" in self.params:
            self.grads["b"] += db

    def flops(self, batch: int, seq: int) -> float:
        return F.linear_flops(batch * seq, self.n_in, self.n_out)


class LayerNorm(Module):
    """``y = gamma · (x − mean) / sqrt(var + eps) + beta`` over the last axis."""

    def __init__(self, h: int, eps: float = 1e-5, dtype=np.float64) -> None:
        super().__init__()
        self.h, self.eps = h, eps
        self.add_param("gamma", np.ones(h, dtype=dtype))
        self.add_param("beta", np.zeros(h, dtype=dtype))

    def forward(self, x, key=0):
        y, (xhat, rstd, _) = K.layernorm_forward_fast(x, self.params["gamma"],
                                                 self.params["beta"], self.eps)
        self._save(key, xhat=xhat, rstd=rstd)      # computed here: no copy needed
        return y

    def backward_pass(self, dy, key=0, *, weights=True):
        """``dx``, and always ``dγ``, ``dβ``: they are sums, not GEMMs, and cost
        nothing worth deferring (so ``weights`` changes nothing here)."""
        s = self._pop(key)
        dx, dgamma, dbeta = K.layernorm_backward_fast(
            dy, (s["xhat"], s["rstd"], self.params["gamma"]))
        self.grads["gamma"] += dgamma
        self.grads["beta"] += dbeta
        return dx


class MLP(Module):
    """``fc2(gelu(fc1(x)))`` with ``fc1: h → d_ff`` and ``fc2: d_ff → h``."""

    def __init__(self, h: int, d_ff: int | None = None, rng=None, dtype=np.float64) -> None:
        super().__init__()
        rng = _rng(rng)
        d_ff = 4 * h if d_ff is None else d_ff
        self.fc1 = self.add_child("fc1", Linear(h, d_ff, rng=rng, dtype=dtype))
        self.fc2 = self.add_child("fc2", Linear(d_ff, h, rng=rng, dtype=dtype))

    def forward(self, x, key=0):
        a = self.fc1.forward(x, key)
        self._save(key, a=a)
        return self.fc2.forward(frozen(K.gelu_fast(a)), key)

    def backward_pass(self, dy, key=0, *, weights=True):
        dg = self.fc2.backward_pass(dy, key, weights=weights)
        a = self._pop(key)["a"]
        return self.fc1.backward_pass(K.gelu_backward_fast(dg, a, out=dg), key,  # dg is ours
                                      weights=weights)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention: ``proj(attention(split(qkv(x))))``.

    ``qkv`` is one ``Linear(h, 3h)`` whose output columns are ``[q | k | v]``; head
    ``i`` uses columns ``[i·d, (i+1)·d)`` of each, ``d = h / n_head``.

    ``recompute="selective"`` (Korthikanti et al. 2022, §5): the ``a·b·s²``
    probabilities ``P = softmax(q kᵀ/√d + M)`` are not kept; backward computes
    them again from the kept ``q, k, v`` (region ``<trace_name>.recompute``,
    ``4bs²h`` FLOPs: the attention core's forward).
    """

    def __init__(self, h: int, n_head: int, rng=None, dtype=np.float64,
                 trace_name: str = "attn") -> None:
        super().__init__()
        if h % n_head:
            raise ValueError(f"hidden size h={h} is not divisible by n_head={n_head}")
        rng = _rng(rng)
        self.h, self.n_head, self.trace_name = h, n_head, trace_name
        self.recompute = "none"
        self.qkv = self.add_child("qkv", Linear(h, 3 * h, rng=rng, dtype=dtype))
        self.proj = self.add_child("proj", Linear(h, h, rng=rng, dtype=dtype))

    def forward(self, x, key=0):
        h = self.h
        qkv = self.qkv.forward(x, key)
        q, k, v = qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:]
        y, (qh, kh, vh, att, _) = K.attention_forward_fast(q, k, v, self.n_head)
        if self.recompute == "selective":       # P is computed again in backward
            self._save(key, q=q, k=k, v=v)
        else:
            self._save(key, q=qh, k=kh, v=vh, att=att)  # views of our own qkv buffer
        return self.proj.forward(frozen(y), key)

    def backward_pass(self, dy, key=0, *, weights=True):
        h = self.h
        dy = self.proj.backward_pass(dy, key, weights=weights)
        s = self._pop(key)
        if "att" not in s:                      # selective recomputation
            b, n = dy.shape[0], dy.shape[1]
            with trace.compute(f"{self.trace_name}.recompute",
                               flops=F.attention_flops(b, n, h)):
                _, (s["q"], s["k"], s["v"], s["att"], _) = K.attention_forward_fast(
                    s["q"], s["k"], s["v"], self.n_head)
        scale = 1.0 / math.sqrt(h // self.n_head)
        dqkv = np.empty(dy.shape[:-1] + (3 * h,), dtype=dy.dtype)
        K.attention_backward_fast(
            dy, (s["q"], s["k"], s["v"], s["att"], scale),
            out=(dqkv[..., :h], dqkv[..., h:2 * h], dqkv[..., 2 * h:]))
        return self.qkv.backward_pass(dqkv, key, weights=weights)

    def flops(self, batch: int, seq: int) -> float:
        return super().flops(batch, seq) + F.attention_flops(batch, seq, self.h)


class TransformerBlock(Module):
    """Pre-LayerNorm block: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``.

    ``forward``/``backward`` are recorded as compute regions
    ``f"{trace_name}.forward"`` / ``".backward"`` (backward FLOPs = 2 × forward);
    :class:`~simpar.nn.gpt.GPT` names its blocks ``block0``, ``block1``, ...

    ``recompute="full"`` (Korthikanti et al. 2022, §5, "full activation
    recomputation"): forward keeps only the block's input (``bsh`` elements);
    backward first runs the forward again (region ``f"{trace_name}.recompute"``,
    one forward's FLOPs).  ``"selective"`` is passed to the attention layer.
    """

    def __init__(self, h: int, n_head: int, d_ff: int | None = None, rng=None,
                 dtype=np.float64, trace_name: str = "block") -> None:
        super().__init__()
        rng = _rng(rng)
        self.h = h
        self.trace_name = trace_name
        self.recompute = "none"
        self.ln1 = self.add_child("ln1", LayerNorm(h, dtype=dtype))
        self.attn = self.add_child("attn", CausalSelfAttention(h, n_head, rng=rng, dtype=dtype,
                                                               trace_name=f"{trace_name}.attn"))
        self.ln2 = self.add_child("ln2", LayerNorm(h, dtype=dtype))
        self.mlp = self.add_child("mlp", MLP(h, d_ff, rng=rng, dtype=dtype))

    def forward(self, x, key=0):
        b, s = x.shape[0], x.shape[1]
        with trace.compute(f"{self.trace_name}.forward", flops=self.flops(b, s)):
            return self._forward_recomputable(x, key)

    def _forward(self, x, key):
        x1 = self.attn.forward(frozen(self.ln1.forward(x, key)), key)
        add_(x1, x)                             # the residual x1 += x
        y = self.mlp.forward(frozen(self.ln2.forward(x1, key)), key)
        add_(y, x1)
        return y

    def backward_pass(self, dy, key=0, *, weights=True):
        b, s = dy.shape[0], dy.shape[1]
        if self.recompute == "full":
            self._recompute_forward(key, f"{self.trace_name}.recompute", self.flops(b, s))
        name, flops = f"{self.trace_name}.backward", 2 * self.flops(b, s)
        if not weights:                         # input gradients only (zero-bubble I)
            name, flops = f"{self.trace_name}.backward_input", flops - self.weight_grad_flops(b, s)
            self._save(key, slot="W", shape=(b, s))
        w = weights
        with trace.compute(name, flops=flops):
            dx1 = self.ln2.backward_pass(self.mlp.backward_pass(dy, key, weights=w), key)
            add_(dx1, dy)
            dx = self.ln1.backward_pass(self.attn.backward_pass(dx1, key, weights=w), key)
            add_(dx, dx1)
        return dx

    def backward_weights(self, key=0) -> None:
        """Weight gradients of the linear layers left by :meth:`backward_input`
        (recorded as ``f"{trace_name}.backward_weights"``).  LayerNorm's ``gamma``
        and ``beta`` gradients are cheap and were computed by the backward itself."""
        b, s = self._pop(key, slot="W")["shape"]
        with trace.compute(f"{self.trace_name}.backward_weights",
                           flops=self.weight_grad_flops(b, s)):
            super().backward_weights(key)

    def weight_grad_flops(self, batch: int, seq: int) -> float:
        """FLOPs of the weight gradients ``xᵀ dy`` of the four linear layers: equal
        to their forward FLOPs.  The rest of the backward (``dy Wᵀ`` and the
        attention core, twice its forward) is the input gradient."""
        return sum(m.flops(batch, seq) for _, m in self.named_modules() if isinstance(m, Linear))


class Embedding(Module):
    """Lookup table ``W`` of shape ``(vocab, h)``: ``y = W[ids]``."""

    def __init__(self, vocab: int, h: int, rng=None, dtype=np.float64,
                 std: float = INIT_STD) -> None:
        super().__init__()
        self.vocab, self.h = vocab, h
        self.add_param("W", normal_init(_rng(rng), (vocab, h), dtype, std))

    def forward(self, ids, key=0):
        ids = np.asarray(ids)
        check_ids(ids, self.vocab)
        self._save(key, copy={"ids": ids})
        return F.embedding_forward(ids, self.params["W"])

    def backward_pass(self, dy, key=0, *, weights=True):
        """Scatter-add ``dy`` into ``dW`` (no GEMM: done by ``I`` too); returns ``None``."""
        ids = self._pop(key)["ids"]
        F.embedding_backward(dy, ids, self.vocab, out=self.grads["W"])
        return None


def check_ids(ids: np.ndarray, vocab: int) -> None:
    """Integer ids in ``[0, vocab)``, else a ``TypeError``/``ValueError``."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got range "
                         f"[{ids.min()}, {ids.max()}]")
