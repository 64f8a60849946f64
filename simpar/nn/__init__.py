"""The reference neural network: pure forward/backward pairs, modules, and the GPT.

The model is GPT-2's (Radford et al. 2019, §2.3), every sub-layer Vaswani et al.
2017's (§3)::

    h'ₗ = hₗ₋₁ + Attn(LN₁(hₗ₋₁)),   hₗ = h'ₗ + MLP(LN₂(h'ₗ)),
    Attn: per head softmax(Q Kᵀ/√d + M) V (§3.2.1 eq. (1));  MLP: GELU(X W₁ + b₁) W₂ + b₂

* :mod:`simpar.nn.functional` — stateless ``*_forward`` / ``*_backward`` pairs and
  FLOP counters;
* :mod:`simpar.nn.module` — :class:`Module` (parameters, accumulating gradients,
  per-micro-batch saved activations, state dicts);
* :mod:`simpar.nn.layers` — ``Linear``, ``LayerNorm``, ``MLP``,
  ``CausalSelfAttention``, ``TransformerBlock``, ``Embedding``;
* :mod:`simpar.nn.gpt` — :class:`GPTConfig` and :class:`GPT`.
"""
from . import functional
from .functional import (attention_flops, causal_attention_backward, causal_attention_forward,
                         cross_entropy, cross_entropy_backward, embedding_backward,
                         embedding_forward, gelu, gelu_backward, layernorm_backward,
                         layernorm_forward, linear_backward, linear_flops, linear_forward,
                         softmax, softmax_backward)
from .gpt import GPT, GPTConfig
from .layers import MLP, CausalSelfAttention, Embedding, LayerNorm, Linear, TransformerBlock
from .module import Module

__all__ = [
    "functional", "Module",
    "Linear", "LayerNorm", "MLP", "CausalSelfAttention", "TransformerBlock", "Embedding",
    "GPT", "GPTConfig",
    "linear_forward", "linear_backward", "gelu", "gelu_backward",
    "layernorm_forward", "layernorm_backward", "softmax", "softmax_backward",
    "causal_attention_forward", "causal_attention_backward",
    "embedding_forward", "embedding_backward", "cross_entropy", "cross_entropy_backward",
    "linear_flops", "attention_flops",
]
