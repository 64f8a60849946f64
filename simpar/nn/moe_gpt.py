"""A GPT whose chosen layers use a Mixture-of-Experts instead of the dense MLP.

::

    MoETransformerBlock:  x = x + attn(ln1(x));  x = x + moe(ln2(x))
    moe(x) = Σ_{i ∈ top-k} gᵢ(x) Eᵢ(x),   g from p = softmax(x W_r)
                                         (Fedus et al. 2021, Switch, §2.1 eq. (1)-(2))
    loss   = cross-entropy + Σ_{MoE layers} (α·N·Σᵢ fᵢPᵢ + β·z-loss)
                                         (ibid. §2.2 eq. (4); Zoph et al. 2022 eq. (5))

``MoEGPTConfig`` is a :class:`~simpar.nn.gpt.GPTConfig` with the MoE settings;
``moe_layers`` picks the blocks that get an MoE (``None``: every block; ``()``:
none, and the model is exactly the dense :class:`~simpar.nn.gpt.GPT` of the same
seed).  The training loss is the cross-entropy **plus every MoE layer's
auxiliary loss** (load balancing and z-loss, :mod:`simpar.nn.moe`), and
:meth:`MoEGPT.loss` back-propagates both.

Parameter names: those of the GPT, except that an MoE block ``i`` holds
``blocks.{i}.moe.router.W`` and ``blocks.{i}.moe.experts.{e}.fc1.{W,b}``,
``blocks.{i}.moe.experts.{e}.fc2.{W,b}`` in place of ``blocks.{i}.mlp.*``.  Dense
blocks draw the same weights as in the dense GPT; MoE block ``i`` draws its
weights from its own generator ``default_rng([seed, 1, i])``.

Tracing: an MoE block records ``block{i}.attn.forward`` (LayerNorms and
attention) and the MoE layer's own regions (``block{i}.moe.router.forward``, ...),
so that the all-to-alls of an expert-parallel layer show up between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import trace
from . import functional as F
from .gpt import GPT, GPTConfig
from .layers import CausalSelfAttention, LayerNorm, Linear
from .module import Module, frozen
from .moe import BALANCE_COEF, Z_COEF, MoE, check_moe_config

__all__ = ["MoEGPTConfig", "MoETransformerBlock", "MoEGPT"]


@dataclass
class MoEGPTConfig(GPTConfig):
    """A :class:`GPTConfig` plus the MoE layers' settings (see :class:`~simpar.nn.moe.MoE`)."""

    n_experts: int = 4
    top_k: int = 1
    capacity_factor: float | None = 1.25
    moe_layers: tuple | None = None          # block indices; None = every block
    groups: int = 1
    drop_policy: str = "position"
    balance_coef: float = BALANCE_COEF
    z_coef: float = Z_COEF

    def __post_init__(self) -> None:
        super().__post_init__()
        check_moe_config(self.d_model, self.n_experts, self.top_k, self.capacity_factor,
                         self.drop_policy)
        layers = range(self.n_layer) if self.moe_layers is None else self.moe_layers
        layers = tuple(sorted({int(i) for i in layers}))
        bad = [i for i in layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"MoEGPTConfig: moe_layers {bad} out of range for "
                             f"n_layer={self.n_layer}")
        self.moe_layers = layers


class MoETransformerBlock(Module):
    """Pre-LayerNorm block with an MoE feed-forward: ``x + attn(ln1(x))``, then
    ``+ moe(ln2(·))``.  ``moe`` is any layer with the :class:`MoE` interface
    (the reference, or an expert-parallel one: :meth:`replace_moe`)."""

    def __init__(self, h: int, n_head: int, moe: MoE, rng=None, dtype=np.float64,
                 trace_name: str = "block") -> None:
        super().__init__()
        self.h, self.trace_name = h, trace_name
        self.recompute = "none"         # "full": keep the input only (see TransformerBlock)
        self.ln1 = self.add_child("ln1", LayerNorm(h, dtype=dtype))
        self.attn = self.add_child("attn", CausalSelfAttention(h, n_head, rng=rng, dtype=dtype,
                                                               trace_name=f"{trace_name}.attn"))
        self.ln2 = self.add_child("ln2", LayerNorm(h, dtype=dtype))
        self.moe = self.add_child("moe", moe)

    def replace_moe(self, layer: Module) -> None:
        """Put ``layer`` (same parameter names) in place of the MoE layer."""
        self.moe = self.children["moe"] = layer

    def _attn_flops(self, b: int, s: int) -> float:
        return self.attn.flops(b, s)

    def forward(self, x, key=0):
        return self._forward_recomputable(x, key)

    def _forward(self, x, key):
        b, s = x.shape[0], x.shape[1]
        with trace.compute(f"{self.trace_name}.attn.forward", flops=self._attn_flops(b, s)):
            x1 = self.attn.forward(frozen(self.ln1.forward(x, key)), key)
            x1 += x
            xn = frozen(self.ln2.forward(x1, key))
        y = self.moe.forward(xn, key)
        y += x1
        return y

    def _attn_weight_grad_flops(self, b: int, s: int) -> float:
        return sum(m.flops(b, s) for _, m in self.attn.named_modules() if isinstance(m, Linear))

    def backward_pass(self, dy, key=0, *, weights=True):
        b, s = dy.shape[0], dy.shape[1]
        if self.recompute == "full":            # the regions inside count their own FLOPs
            self._recompute_forward(key, f"{self.trace_name}.recompute", 0.0)
        dxn = self.moe.backward_pass(dy, key, weights=weights)
        name, flops = f"{self.trace_name}.attn.backward", 2 * self._attn_flops(b, s)
        if not weights:            # input gradients only (zero-bubble I)
            name = f"{self.trace_name}.attn.backward_input"
            flops -= self._attn_weight_grad_flops(b, s)
            self._save(key, slot="W", shape=(b, s))
        with trace.compute(name, flops=flops):
            dx1 = self.ln2.backward(dxn, key)
            dx1 += dy
            dx = self.ln1.backward(self.attn.backward_pass(dx1, key, weights=weights), key)
            dx += dx1
        return dx

    def backward_weights(self, key=0) -> None:
        """Weight gradients left by :meth:`backward_input`: the MoE layer's experts,
        then attention's linear layers."""
        self.moe.backward_weights(key)
        b, s = self._pop(key, slot="W")["shape"]
        with trace.compute(f"{self.trace_name}.attn.backward_weights",
                           flops=self._attn_weight_grad_flops(b, s)):
            self.attn.backward_weights(key)


class MoEGPT(GPT):
    """The reference GPT with MoE feed-forward layers in ``config.moe_layers``."""

    def __init__(self, config: MoEGPTConfig, seed: int = 0, dtype=np.float64,
                 recompute: str = "none") -> None:
        if not isinstance(config, MoEGPTConfig):
            raise TypeError(f"MoEGPT needs a MoEGPTConfig, got {type(config).__name__}")
        super().__init__(config, seed, dtype, recompute)
        c = config
        for i in c.moe_layers:
            rng = np.random.default_rng([seed, 1, i])
            moe = MoE(c.d_model, c.n_experts, c.d_ff, k=c.top_k,
                      capacity_factor=c.capacity_factor, groups=c.groups,
                      drop_policy=c.drop_policy, balance_coef=c.balance_coef,
                      z_coef=c.z_coef, rng=rng, dtype=dtype, trace_name=f"block{i}.moe")
            block = MoETransformerBlock(c.d_model, c.n_head, moe, rng=rng, dtype=dtype,
                                        trace_name=f"block{i}")
            self.blocks[i] = block
            self.children[f"blocks.{i}"] = block       # same key: same place in the tree
        self.set_recompute(recompute)

    def moe_layers(self) -> list:
        """The MoE layers, in block order."""
        return [b.moe for b in self.blocks if isinstance(b, MoETransformerBlock)]

    def aux_loss(self, key=0) -> float:
        """Sum of the MoE layers' auxiliary losses in the last forward of ``key``."""
        return float(sum(m.stats[key].aux_loss for m in self.moe_layers()))

    def loss(self, idx, targets, key=0, dloss: float = 1.0) -> float:
        """Forward, cross-entropy + auxiliary losses, full backward (gradients
        accumulate; the cross-entropy gradient is scaled by ``dloss``, the
        auxiliary losses by each layer's ``aux_scale``).  Returns the total loss."""
        logits = self.forward(idx, key)
        ce, cache = F.cross_entropy(logits, np.asarray(targets))
        del logits
        aux = self.aux_loss(key)
        self.backward(F.cross_entropy_backward(cache, dloss), key)
        return ce + aux
