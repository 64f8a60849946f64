"""The reference neural network: pure forward/backward pairs, modules, and the GPT.

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
