"""A tensor-parallel transformer block and GPT, optionally sequence-parallel.

**Tensor parallelism** (Shoeybi et al. 2019, Fig. 4): inside a block the residual
stream and LayerNorms are replicated; attention and MLP each start with ``f`` and
end with ``g``, so a layer does **2 all-reduces forward and 2 backward**, each of
the ``(b, s, h)`` activation.

**Sequence parallelism** (Korthikanti et al. 2022, §4.2.2, Fig. 5): the replicated
parts (LayerNorm, residual adds, the position embedding) work on sequence shards
``(b, s/t, h)`` instead; each all-reduce becomes a reduce-scatter (leaving the
split work) and an all-gather (entering it): **4 all-gathers and 4 reduce-scatters
per layer**, forward + backward, moving the same bytes as the 4 all-reduces in the
ring model.  Parameters used on sequence shards — LayerNorm ``gamma``/``beta``, the
row-parallel biases, ``wpe``, ``ln_f`` — get gradients from this rank's tokens
only; :meth:`~.layers.TensorParallelModule.finalize_grads` sums them over the
group (one small all-reduce per step).

**What is saved for backward** (elements per layer per device, read off the
``_save`` calls; ``a`` heads, ``d_ff`` MLP width, ``t`` = tp size):

=========================  =====================  =========================
saved                      tensor parallel        + sequence parallel
=========================  =====================  =========================
ln1, ln2: x̂ and 1/σ        2·(bsh + bs)            2·(bsh + bs)/t
qkv input (ln1 output)     bsh                    bsh (all-gathered)
q, k, v of my heads        3·bsh/t                3·bsh/t
attention probabilities    a·b·s²/t               a·b·s²/t
proj input                 bsh/t                  bsh/t
fc1 output (GeLU input)    b·s·d_ff/t             b·s·d_ff/t
fc2 input (GeLU output)    b·s·d_ff/t             b·s·d_ff/t
fc1 input (ln2 output)     bsh                    bsh (all-gathered)
=========================  =====================  =========================

Summed (:func:`simpar.formulas.tp_activation_elements`), with ``d_ff = 4h``:
TP ``bsh·(4 + 12/t) + 2bs + abs²/t``; TP+SP ``bsh·(2 + 14/t) + 2bs/t + abs²/t``.
The structure is Korthikanti et al.'s Table 2 (bytes, 16-bit, with dropout):
TP ``sbh(10 + 24/t + 5as/(ht))``, TP+SP ``sbh(34 + 5as/h)/t``.  Differences:
simpar has no dropout (no masks), keeps only the softmax output ``P`` (not 5
bytes per score), keeps LayerNorm's ``1/σ``, and under SP keeps the all-gathered
inputs of QKV and fc1 (the paper keeps only the shard and all-gathers it again in
backward — one more all-gather per linear pair, which simpar does not do).
"""
from __future__ import annotations

import numpy as np

from ... import trace
from ...comm import Comm
from ...nn import GPT, LayerNorm, Module
from ...nn.gpt import GPTPasses
from ...nn.layers import check_ids
from ...nn import functional as F
from ...nn.module import frozen
from ...nn.precision import acc_dtype
from ...nn.moe_gpt import MoETransformerBlock
from ..expert import ExpertParallelMoE
from .attention import ParallelAttention
from .layers import ColumnParallelLinear, TensorParallelModule, check_divisible
from .mappings import (copy_to_tp_region, copy_to_tp_region_backward, gather_from_sp_region,
                       gather_from_sp_region_backward, reduce_from_tp_region,
                       reduce_from_tp_region_backward, reduce_scatter_to_sp_region,
                       reduce_scatter_to_sp_region_backward)
from .mlp import ParallelMLP
from .vocab import (embedding_shard_backward, embedding_shard_forward, shard_vocab,
                    vocab_parallel_cross_entropy, vocab_parallel_cross_entropy_backward,
                    vocab_range)


def _layernorm(ln: LayerNorm, x, key, name: str):
    with trace.compute(f"{name}.forward"):
        return frozen(ln.forward(x, key))


def _layernorm_backward(ln: LayerNorm, dy, key, name: str):    # dγ, dβ: done by I too
    with trace.compute(f"{name}.backward"):
        return ln.backward(dy, key)


class ParallelTransformerBlock(TensorParallelModule):
    """Pre-LayerNorm block ``x + attn(ln1(x))``, then ``+ mlp(ln2(·))``, with
    tensor-parallel attention and MLP; input/output ``(b, s, h)`` replicated, or
    ``(b, s/t, h)`` sequence shards with ``sequence_parallel``."""

    settings = ("h", "n_head", "d_ff", "sequence_parallel")

    def __init__(self, h: int, n_head: int, d_ff: int, tp: Comm,
                 sequence_parallel: bool = False, dtype=np.float64,
                 trace_name: str = "block", moe: Module | None = None,
                 agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        check_divisible("hidden size h", h, tp.size)
        check_divisible("n_head", n_head, tp.size)
        check_divisible("d_ff", d_ff, tp.size)
        self.h, self.n_head, self.d_ff, self.trace_name = h, n_head, d_ff, trace_name
        self.recompute = "none"         # "full": keep the input only, forward again in backward
        sp = sequence_parallel
        self.ln1 = self.add_child("ln1", LayerNorm(h, dtype=dtype))
        self.attn = self.add_child("attn", ParallelAttention(
            h, n_head, tp, sp, dtype, trace_name=f"{trace_name}.attn", agree=False))
        self.ln2 = self.add_child("ln2", LayerNorm(h, dtype=dtype))
        if moe is None:                 # the feed-forward: a tensor-parallel MLP ...
            self.ffn = self.mlp = self.add_child("mlp", ParallelMLP(
                h, d_ff, tp, sp, dtype, trace_name=f"{trace_name}.mlp", agree=False))
        else:                           # ... or an MoE layer, replicated over tp
            self.ffn = self.moe = self.add_child("moe", moe)
            if sp:                      # it routes the whole sequence, as the reference
                moe.cut_sequence(tp, balanced=False)
        if agree:
            self.agree()

    @classmethod
    def from_reference(cls, block, tp: Comm, sequence_parallel: bool = False,
                       trace_name: str | None = None, ep: Comm | None = None,
                       aux_scale: float = 1.0, agree: bool = True) -> "ParallelTransformerBlock":
        """Cut this rank's shards from a reference :class:`~simpar.nn.TransformerBlock`
        — or from an :class:`~simpar.nn.MoETransformerBlock`, whose MoE layer
        becomes an :class:`~simpar.parallel.expert.ExpertParallelMoE` over ``ep``
        (replicated over ``tp``: every tp rank routes the same tokens — under
        sequence parallelism it all-gathers the sequence first), with its
        auxiliary loss weighted by ``aux_scale``."""
        attn = block.attn
        moe = None
        if isinstance(block, MoETransformerBlock):
            if ep is None:
                raise ValueError("an MoE block needs an expert-parallel group ep")
            moe = ExpertParallelMoE.from_reference(block.moe, ep, aux_scale)
            d_ff = block.moe.d_ff
        else:
            d_ff = block.mlp.fc1.n_out
        m = cls(block.h, attn.n_head, d_ff, tp, sequence_parallel,
                attn.qkv.params["W"].dtype, trace_name or block.trace_name, moe=moe, agree=agree)
        m.set_recompute(getattr(block, "recompute", "none"))
        return m.load_reference(block)

    def load_reference(self, block) -> "ParallelTransformerBlock":
        """Copy this rank's shards of ``block`` into the parameters; returns self.
        (An MoE layer was cut by :meth:`from_reference`.)"""
        self.ln1.load_state_dict(block.ln1.state_dict())
        self.ln2.load_state_dict(block.ln2.state_dict())
        self.attn.qkv.load_reference(block.attn.qkv)
        self.attn.proj.load_reference(block.attn.proj)
        if "mlp" in self.children:
            self.mlp.fc1.load_reference(block.mlp.fc1)
            self.mlp.fc2.load_reference(block.mlp.fc2)
        return self

    def sequence_parallel_grads(self):
        own = [ln.grads[n] for ln in (self.ln1, self.ln2) for n in ("gamma", "beta")]
        return (own if self.sequence_parallel else []) + super().sequence_parallel_grads()

    def forward(self, x, key=0):
        self._check_new_key(key)        # before the first message
        return self._forward_recomputable(x, key)

    def _forward(self, x, key):
        name = self.trace_name
        x1 = self.attn.forward(_layernorm(self.ln1, x, key, f"{name}.ln1"), key)
        x1 += x
        y = self.ffn.forward(_layernorm(self.ln2, x1, key, f"{name}.ln2"), key)
        y += x1
        return y

    def backward_pass(self, dy, key=0, *, weights=True):
        name, w = self.trace_name, weights
        if self.recompute == "full":    # the forward again: its regions and collectives
            self._recompute_forward(key, f"{name}.recompute", 0.0)
        dx1 = _layernorm_backward(self.ln2, self.ffn.backward_pass(dy, key, weights=w), key,
                                  f"{name}.ln2")
        dx1 += dy
        dx = _layernorm_backward(self.ln1, self.attn.backward_pass(dx1, key, weights=w), key,
                                 f"{name}.ln1")
        dx += dx1
        self._grads_pending |= self.sequence_parallel
        return dx


class ParallelGPT(GPTPasses, TensorParallelModule):
    """The reference :class:`~simpar.nn.GPT`, tensor-parallel (and optionally
    sequence-parallel), with the vocabulary split over ``tp`` at both ends.

    ``forward(idx)`` returns this rank's logit columns ``(b, s, V_pad/t)``;
    :meth:`loss` runs forward, :func:`~.vocab.vocab_parallel_cross_entropy` and
    backward.  Parameter names are the reference's (``wte`` is this rank's rows of
    the padded table; ``lm_head.W`` its columns).  With ``tie_weights`` the head
    uses ``wteᵀ``, so both uses of ``wte`` stay on the same shard.

    Communication per step, besides the blocks' (see the module docstring):
    embedding ``g`` (1 all-reduce; reduce-scatter with SP), head ``f`` backward
    (1 all-reduce; with SP an all-gather forward and a reduce-scatter backward),
    3 all-reduces of ``b·s`` numbers in the loss.
    """

    settings = ("config", "layers", "sequence_parallel")

    def __init__(self, config, tp: Comm, sequence_parallel: bool = False,
                 dtype=np.float64, layers=None, blocks=None, agree: bool = True) -> None:
        super().__init__(tp, sequence_parallel)
        c = self.config = config
        check_divisible("d_model", c.d_model, tp.size)
        check_divisible("n_head", c.n_head, tp.size)
        check_divisible("d_ff", c.d_ff, tp.size)
        if sequence_parallel:
            check_divisible("seq_len", c.seq_len, tp.size)
        self.vocab_start, _, n_local = vocab_range(c.vocab_size, tp)
        self.add_param("wte", np.zeros((n_local, c.d_model), dtype))
        self.add_param("wpe", np.zeros((c.seq_len, c.d_model), dtype))
        self.layers = range(c.n_layer) if layers is None else layers
        if blocks is None:
            blocks = [ParallelTransformerBlock(c.d_model, c.n_head, c.d_ff, tp,
                                               sequence_parallel, dtype, f"block{i}", agree=False)
                      for i in self.layers]
        self.blocks = [self.add_child(f"blocks.{i}", b) for i, b in zip(self.layers, blocks)]
        self.ln_f = self.add_child("ln_f", LayerNorm(c.d_model, dtype=dtype))
        self.lm_head = None if c.tie_weights else self.add_child(
            "lm_head", ColumnParallelLinear(c.d_model, c.vocab_size, tp, bias=False,
                                            sequence_parallel=sequence_parallel, pad=True,
                                            dtype=dtype, trace_name="head.lm_head", agree=False))
        if agree:                       # one exchange for the whole model
            self.agree()

    @classmethod
    def from_reference(cls, gpt: GPT, tp: Comm, sequence_parallel: bool = False,
                       layers=None, ep: Comm | None = None, aux_scale: float = 1.0,
                       agree: bool = True) -> "ParallelGPT":
        """Cut this rank's shards from a reference :class:`~simpar.nn.GPT` (or
        :class:`~simpar.nn.MoEGPT`: MoE layers over ``ep``, see
        :meth:`ParallelTransformerBlock.from_reference`).  ``layers``: the blocks
        to hold (default all; ``()`` for the two ends only, as a pipeline stage
        uses them)."""
        layers = range(gpt.config.n_layer) if layers is None else layers
        blocks = [ParallelTransformerBlock.from_reference(gpt.blocks[i], tp, sequence_parallel,
                                                          ep=ep, aux_scale=aux_scale, agree=False)
                  for i in layers]
        m = cls(gpt.config, tp, sequence_parallel, gpt.params["wte"].dtype, layers, blocks,
                agree)
        m.params["wte"][...] = shard_vocab(gpt.params["wte"], tp)
        m.params["wpe"][...] = gpt.params["wpe"]
        m.ln_f.load_state_dict(gpt.ln_f.state_dict())
        if m.lm_head is not None:
            m.lm_head.load_reference(gpt.lm_head)
        return m

    def full_tensor(self, name, local):
        if name == "wte":
            return self.tp.all_gather(local, axis=0)[:self.config.vocab_size]
        return local.copy()

    def sequence_parallel_grads(self):
        own = [self.grads["wpe"], self.ln_f.grads["gamma"], self.ln_f.grads["beta"]]
        return (own if self.sequence_parallel else []) + super().sequence_parallel_grads()

    # ------------------------------------------------------ embedding end
    #: context parallelism: this rank's local length -> its sequence positions
    #: (set by :func:`~simpar.parallel.hybrid.build_model` when ``cp > 1``)
    cp_positions = None

    def _my_positions(self, s: int) -> slice:
        if self.cp_positions is not None:              # context parallel: my chunks
            pos = self.cp_positions(s)
            k = s // self.tp.size if self.sequence_parallel else s
            return pos[self.tp.rank * k:(self.tp.rank + 1) * k] if self.sequence_parallel else pos
        if not self.sequence_parallel:
            return slice(0, s)
        k = s // self.tp.size
        return slice(self.tp.rank * k, (self.tp.rank + 1) * k)

    def embed_forward(self, idx, key=0):
        """``wte[idx] + wpe`` → ``(b, s, h)``, or this rank's ``(b, s/t, h)`` with SP."""
        idx = self._token_ids(idx)
        if self.sequence_parallel:
            check_divisible("sequence length", idx.shape[1], self.tp.size)
        with trace.compute("embedding.forward"):
            y, local, mine = embedding_shard_forward(idx, self.params["wte"], self.vocab_start)
        self._save(key, slot="embed", local=local, mine=mine)
        if self.sequence_parallel:
            x = reduce_scatter_to_sp_region(y, self.tp)
        else:
            x = reduce_from_tp_region(y, self.tp)
        x += self.params["wpe"][self._my_positions(idx.shape[1])]
        return x

    def embed_backward(self, dx, key=0) -> None:
        """Accumulate the gradients of ``wpe`` (my positions) and of my rows of ``wte``."""
        saved = self._pop(key, slot="embed")
        self.grads["wpe"][self._my_positions(saved["local"].shape[1])] += \
            dx.sum(axis=0, dtype=acc_dtype(dx.dtype))
        if self.sequence_parallel:
            dx = reduce_scatter_to_sp_region_backward(dx, self.tp)
        else:
            dx = reduce_from_tp_region_backward(dx, self.tp)
        with trace.compute("embedding.backward"):
            embedding_shard_backward(dx, saved["local"], saved["mine"], self.grads["wte"])

    # ----------------------------------------------------------- head end
    def head_forward(self, x, key=0):
        """``ln_f`` then this rank's logit columns ``(b, s, V_pad/t)`` (whole sequence)."""
        xn = _layernorm(self.ln_f, x, key, "head.ln_f")
        if self.lm_head is not None:
            return self.lm_head.forward(xn, key)
        if self.sequence_parallel:
            xn = gather_from_sp_region(xn, self.tp)
            self._save(key, slot="head", xn=xn)
        else:
            xn = copy_to_tp_region(xn, self.tp)
            self._save(key, slot="head", copy={"xn": xn})
        W = self.params["wte"]
        with trace.compute("head.forward", flops=F.linear_flops(xn.size // W.shape[1], *W.shape)):
            return F.linear_forward(xn, W.T)

    def head_backward(self, dlogits, key=0, *, weights=True):
        """``ln_f`` and LM-head backward; ``weights=False`` (zero-bubble ``I``) leaves
        the head's weight gradient for :meth:`head_backward_weights`."""
        if self.lm_head is not None:
            dxn = self.lm_head.backward_pass(dlogits, key, weights=weights)
        else:
            xn = self._pop(key, slot="head")["xn"]
            W = self.params["wte"]
            flops = F.linear_flops(xn.size // W.shape[1], *W.shape)
            if weights:
                with trace.compute("head.backward", flops=2 * flops):
                    dxn, dWt, _ = F.linear_backward(dlogits, xn, W.T)
                    self.grads["wte"] += dWt.T
            else:
                with trace.compute("head.backward_input", flops=flops):
                    dxn = F.linear_backward_input(dlogits, W.T)
                self._save(key, copy={"dlogits": dlogits}, slot="head_W", xn=xn)
            if self.sequence_parallel:
                dxn = gather_from_sp_region_backward(dxn, self.tp)
            else:
                dxn = copy_to_tp_region_backward(dxn, self.tp)
        return _layernorm_backward(self.ln_f, dxn, key, "head.ln_f")

    def head_backward_weights(self, key=0) -> None:
        """The LM head's weight gradient left by ``head_backward(weights=False)``."""
        if self.lm_head is not None:
            self.lm_head.backward_weights(key)
            return
        s = self._pop(key, slot="head_W")
        W = self.params["wte"]
        with trace.compute("head.backward_weights",
                           flops=F.linear_flops(s["xn"].size // W.shape[1], *W.shape)):
            dWt, _ = F.linear_backward_weight(s["dlogits"], s["xn"])
            self.grads["wte"] += dWt.T

    # -------------------------------------------------------- whole model
    # forward and backward_weights: GPTPasses' (embedding, blocks, head)
    def backward_pass(self, dlogits, key=0, *, weights=True) -> None:
        """:meth:`GPTPasses.backward_pass` from this rank's logit columns' gradient;
        under SP the replicated parameters' gradients are then partial sums."""
        GPTPasses.backward_pass(self, dlogits, key, weights=weights)
        self._grads_pending |= self.sequence_parallel

    def _check_targets(self, idx, targets) -> np.ndarray:
        """Targets are checked on every rank *before* the forward communicates."""
        targets = np.asarray(targets)
        if targets.size != np.size(idx):
            raise ValueError(f"{targets.size} targets for {np.size(idx)} tokens "
                             f"(idx shape {np.shape(idx)}, targets shape {targets.shape})")
        check_ids(targets, self.config.vocab_size)
        self.tp.agree("token batch (shapes of idx and targets)", (np.shape(idx), targets.shape))
        return targets

    def loss(self, idx, targets, key=0) -> float:
        """Forward, vocab-parallel cross-entropy (mean over all tokens), backward.
        Gradients accumulate; under SP call :meth:`finalize_grads` once per step."""
        targets = self._check_targets(idx, targets)
        logits = self.forward(idx, key)
        loss, cache = vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size,
                                                   self.tp)
        del logits
        self.backward(vocab_parallel_cross_entropy_backward(cache), key)
        return loss

    def eval_loss(self, idx, targets) -> float:
        """Mean cross-entropy without backward (nothing is left saved)."""
        key = ("eval", id(self))
        targets = self._check_targets(idx, targets)
        try:
            logits = self.forward(idx, key)
            return vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size,
                                                self.tp)[0]
        finally:
            self.clear_saved(key)
