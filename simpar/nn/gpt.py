"""The reference GPT: the single-process model every parallel version is checked against.

::

    idx (b, s) ──► wte[idx] + wpe[:s] ──► blocks.0 … blocks.{L-1}
               ──► ln_f ──► lm_head ──► logits (b, s, vocab)

GPT-2's model (Radford et al. 2019, §2.3: LayerNorm at the input of each
sub-block and once more after the last block; the blocks of Vaswani et al. 2017,
§3), with ``N`` tokens and learned positions::

    h₀ = W_e[idx] + W_p[0:s]
    h'ₗ = hₗ₋₁ + Attn(LN₁(hₗ₋₁)),   hₗ = h'ₗ + MLP(LN₂(h'ₗ))        l = 1 … L
    logits = LN_f(h_L) · W_head          (tied: W_head = W_eᵀ)
    loss = (1/N) Σₜ (log Σ_v exp logitsₜ,ᵥ − logitsₜ,targetₜ)

Parameter names (``state_dict()`` keys): ``wte``, ``wpe``,
``blocks.{i}.ln1.{gamma,beta}``, ``blocks.{i}.attn.qkv.{W,b}`` (columns ``[q | k | v]``),
``blocks.{i}.attn.proj.{W,b}``, ``blocks.{i}.ln2.{gamma,beta}``,
``blocks.{i}.mlp.fc1.{W,b}``, ``blocks.{i}.mlp.fc2.{W,b}``, ``ln_f.{gamma,beta}`` and
``lm_head.W`` — absent with ``tie_weights``, when ``logits = x @ wteᵀ`` and the
gradient of ``wte`` sums its two uses.

The pieces are public so that parallel versions can be cut from them: ``blocks``
(a list of :class:`TransformerBlock`), ``ln_f``, ``lm_head``, and the two ends of
the network as methods, :meth:`GPT.embed_forward` / :meth:`GPT.embed_backward` and
:meth:`GPT.head_forward` / :meth:`GPT.head_backward`.  Each end and each block is
recorded as a compute region (``embedding.forward``, ``block0.forward``, ...,
``head.backward``) of the current tracer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import trace
from . import functional as F
from .layers import LayerNorm, Linear, TransformerBlock, check_ids, normal_init
from .module import Module, frozen
from .precision import acc_dtype


@dataclass
class GPTConfig:
    """Shape of a GPT.  ``d_ff`` defaults to ``4 · d_model``."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by "
                             f"n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class GPTPasses:
    """The whole-model passes of a GPT from its two ends and its ``blocks`` (the
    reference :class:`GPT` and the tensor-parallel
    :class:`~simpar.parallel.tensor.ParallelGPT` alike): token ids → embedding →
    blocks → head, and back."""

    def _token_ids(self, idx) -> np.ndarray:
        """``idx`` as an array of ids ``(batch, seq ≤ seq_len)`` in the vocabulary,
        else a clear ``ValueError``/``TypeError``."""
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] > self.config.seq_len:
            raise ValueError(f"idx must be (batch, seq) with seq <= seq_len="
                             f"{self.config.seq_len}, got shape {idx.shape}")
        check_ids(idx, self.config.vocab_size)
        return idx

    def forward(self, idx, key=0):
        """Token ids ``(b, s)`` → logits ``(b, s, vocab)`` (under tp: this rank's columns)."""
        self._check_new_key(key)                  # before any message
        x = self.embed_forward(idx, key)
        for block in self.blocks:
            x = block.forward(x, key)
        return self.head_forward(x, key)

    def backward_pass(self, dlogits, key=0, *, weights=True) -> None:
        """Accumulate the parameter gradients from ``dlogits`` (returns ``None``);
        ``weights=False``: the linear layers' wait for :meth:`backward_weights`."""
        dx = self.head_backward(dlogits, key, weights=weights)
        for block in reversed(self.blocks):
            dx = block.backward_pass(dx, key, weights=weights)
        self.embed_backward(dx, key)

    def backward_weights(self, key=0) -> None:
        """All weight gradients left by :meth:`backward_input` of ``key``."""
        self.head_backward_weights(key)
        for block in reversed(self.blocks):
            block.backward_weights(key)


class GPT(GPTPasses, Module):
    """Decoder-only transformer, pre-LayerNorm, causal, GELU (tanh), no dropout.

    ``recompute``: activation recomputation of every block, ``"none"``,
    ``"selective"`` or ``"full"`` (see :mod:`simpar.nn.module`; change it later
    with :meth:`~simpar.nn.module.Module.set_recompute`)."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float64,
                 recompute: str = "none") -> None:
        super().__init__()
        self.config = c = config
        rng = np.random.default_rng(seed)
        self.add_param("wte", normal_init(rng, (c.vocab_size, c.d_model), dtype))
        self.add_param("wpe", normal_init(rng, (c.seq_len, c.d_model), dtype))
        self.blocks = [self.add_child(f"blocks.{i}", TransformerBlock(
            c.d_model, c.n_head, c.d_ff, rng=rng, dtype=dtype, trace_name=f"block{i}"))
            for i in range(c.n_layer)]
        self.ln_f = self.add_child("ln_f", LayerNorm(c.d_model, dtype=dtype))
        self.lm_head = None if c.tie_weights else self.add_child(
            "lm_head", Linear(c.d_model, c.vocab_size, bias=False, rng=rng, dtype=dtype))
        self.set_recompute(recompute)

    # ------------------------------------------------------ embedding end
    def embed_forward(self, idx, key=0):
        """``x = wte[idx] + wpe[:s]`` for token ids ``idx`` of shape ``(b, s)``."""
        idx = self._token_ids(idx)
        with trace.compute("embedding.forward", flops=0.0):
            x = F.embedding_forward(idx, self.params["wte"])
            x += self.params["wpe"][:idx.shape[1]]
            self._save(key, copy={"idx": idx}, slot="embed")
        return x

    def embed_backward(self, dx, key=0) -> None:
        """Scatter-add ``dx`` into the gradients of ``wte`` and ``wpe``."""
        with trace.compute("embedding.backward", flops=0.0):
            idx = self._pop(key, slot="embed")["idx"]
            F.embedding_backward(dx, idx, self.config.vocab_size, out=self.grads["wte"])
            self.grads["wpe"][:idx.shape[1]] += dx.sum(axis=0, dtype=acc_dtype(dx.dtype))

    # ----------------------------------------------------------- head end
    def head_flops(self, batch: int, seq: int) -> float:
        return F.linear_flops(batch * seq, self.config.d_model, self.config.vocab_size)

    def head_forward(self, x, key=0):
        """``logits = ln_f(x) @ lm_head.W`` (or ``@ wteᵀ`` when tied)."""
        b, s = x.shape[0], x.shape[1]
        with trace.compute("head.forward", flops=self.head_flops(b, s)):
            xn = frozen(self.ln_f.forward(x, key))
            if self.lm_head is not None:
                return self.lm_head.forward(xn, key)
            self._save(key, slot="head", xn=xn)        # ln_f output: our own array
            return F.linear_forward(xn, self.params["wte"].T)

    def head_backward(self, dlogits, key=0, *, weights=True):
        """``ln_f`` and LM-head backward; ``weights=False`` (zero-bubble ``I``) leaves
        the head's weight gradient for :meth:`head_backward_weights`."""
        b, s = dlogits.shape[0], dlogits.shape[1]
        deferred = not weights                  # zero-bubble I: the weight grad waits
        name = "head.backward_input" if deferred else "head.backward"
        with trace.compute(name, flops=(1 if deferred else 2) * self.head_flops(b, s)):
            if self.lm_head is not None:
                if deferred:
                    self._save(key, slot="head_W", shape=(b, s))
                dxn = self.lm_head.backward_pass(dlogits, key, weights=weights)
            else:
                xn = self._pop(key, slot="head")["xn"]
                if deferred:
                    self._save(key, copy={"dlogits": dlogits}, slot="head_W", xn=xn,
                               shape=(b, s))
                    dxn = F.linear_backward_input(dlogits, self.params["wte"].T)
                else:
                    dxn, dWt, _ = F.linear_backward(dlogits, xn, self.params["wte"].T)
                    self.grads["wte"] += dWt.T
            return self.ln_f.backward(dxn, key)

    def head_backward_weights(self, key=0) -> None:
        """The LM head's weight gradient left by ``head_backward(weights=False)``."""
        saved = self._pop(key, slot="head_W")
        with trace.compute("head.backward_weights", flops=self.head_flops(*saved["shape"])):
            if self.lm_head is not None:
                self.lm_head.backward_weights(key)
            else:
                dWt, _ = F.linear_backward_weight(saved["dlogits"], saved["xn"])
                self.grads["wte"] += dWt.T

    # -------------------------------------------------------- whole model
    def loss(self, idx, targets, key=0) -> float:
        """Forward, mean cross-entropy, full backward (gradients accumulate); the loss."""
        logits = self.forward(idx, key)
        loss, cache = F.cross_entropy(logits, np.asarray(targets))
        del logits
        self.backward(F.cross_entropy_backward(cache), key)
        return loss

    def eval_loss(self, idx, targets) -> float:
        """Mean cross-entropy without backward (nothing is left saved)."""
        key = ("eval", id(self))
        try:
            logits = self.forward(idx, key)
            return F.cross_entropy(logits, np.asarray(targets))[0]
        finally:
            self.clear_saved(key)

    def flops(self, batch: int, seq: int) -> float:
        """``n_layer · (2bs(4h² + 2h·d_ff) + 4bs²h) + 2bsh·vocab``; with ``d_ff = 4h``
        that is ``n_layer · (24bsh² + 4bs²h) + 2bsh·vocab``."""
        return sum(blk.flops(batch, seq) for blk in self.blocks) + self.head_flops(batch, seq)
