"""Expert parallelism: the experts of an MoE layer split over ``ep`` ranks
(GShard, Lepikhin et al. 2020 §2.2-3.1; Switch Transformer, Fedus et al. 2021 §2.2).

Every rank of the expert-parallel group holds the whole (replicated) router and
``N / ep`` experts: rank ``r`` holds experts ``[r·N/ep, (r+1)·N/ep)``.  Each rank
routes **its own** tokens; one MoE layer then runs::

    forward                                       backward
    1. router, top-k, capacity (local)            4'. combine⁻¹: dY·gate rows go to the experts
    2. all_gather   kept counts per expert        3'. experts backward (local)
       dispatch:    all_to_all  token rows  ──►   2'. dispatch⁻¹: dx rows come back
    3. experts (local)                            1'. router backward; all_reduce router grad
    4. combine:     all_to_all  output rows ◄──

so two all-to-alls forward and two backward, each moving exactly the rows that
routing kept (uneven: ``comm.all_to_all`` exchanges the per-rank counts
first).  The counts *per expert* are exchanged once, by the small
``all_gather`` of step 2, so that a rank knows which of the rows it receives
belong to which of its experts.  The backward all-to-alls mirror the forward
ones: the gradient of the combine travels like the dispatch, and the gradient
of the dispatch travels like the combine.

**Capacity under expert parallelism.** Capacity is counted per *source rank's*
batch, as GShard counts it per group: a rank with ``T`` tokens lets each expert
take at most ``C = ⌈k·T/N·capacity_factor⌉`` of its assignments, with its own
priority order, so an expert receives at most ``ep·C`` rows.  The reference
:class:`~simpar.nn.moe.MoE` with ``groups = ep``, run on the union of the ranks'
batches (rank order), makes exactly the same decisions.

**Losses and gradients.** The layer computes gradients of the *global* loss
``L = (1/ep) Σ_r L_r``, the mean over the group of the ranks' losses (for equal
batches: the loss of the union of tokens, as the reference sees it).  So

* the caller passes ``dy = ∂L/∂y`` (e.g. a rank's mean cross-entropy with
  ``dloss = 1/ep``), and the layer adds its auxiliary loss with weight
  ``aux_scale = 1/ep`` (the reference averages its groups' auxiliary losses);
  ``stats[key].aux_loss`` is this rank's own (group's) auxiliary loss;
* an expert's gradient collects the contributions of every rank's tokens (the
  all-to-alls brought them), and is complete as it stands;
* the router is replicated, so its gradient is **summed over the group** (an
  ``all_reduce`` in backward), the conjugate of using the same weights on
  every rank.  Every other replicated parameter of a model (attention,
  embeddings, LayerNorms) needs the same sum over the data-parallel group, and
  each expert one over the ranks holding the same experts (``edp``); a whole
  MoE GPT is laid out by :func:`simpar.parallel.hybrid.build_model`.

Pitfalls this layout avoids: an auxiliary loss whose gradient is silently
dropped (tested: it reaches the router), or scaled by the wrong group size
(``1/ep`` here, matching the reference's mean over groups).

**Under sequence or context parallelism** (:meth:`ExpertParallelMoE.cut_sequence`)
a rank holds a share of each sequence (over ``tp``, over ``cp``, or both), but a
routing group is the whole sequence of the micro-batch, as in the reference: the
layer all-gathers its input (sequence order), runs on the whole group — the same
router, capacity queue and auxiliary losses on every rank of the cut — and keeps
this rank's share of the output.  Its backward all-gathers ``dy`` (each
position's gradient lives on one rank) and keeps this rank's share of ``dx``; the
layer's own gradients are then complete and equal on every rank of the cut, so
they are not summed over it.  The price: ``tp·cp``× the MoE compute and
activations.  (Production frameworks route each rank's tokens separately, with
their own capacity: cheaper, but not the reference's model.)

Load statistics (this rank's tokens per expert, dropped fraction, auxiliary
losses) are recorded as ``args["moe"]`` of the ``<name>.router.forward`` compute
event, as in the reference.
"""
from __future__ import annotations

import math

import numpy as np

from .. import trace
from ..comm import Comm
from ..nn.layers import MLP, Linear
from ..nn.module import Module, frozen
from ..nn.moe import (MoE, check_input, check_moe_config, expert_flops,
                      experts_backward_region, experts_backward_weights, route_groups,
                      router_backward, router_flops)
from .sequence import all_gather_sequence, own_chunks

__all__ = ["ExpertParallelMoE", "check_expert_parallel"]


def check_expert_parallel(n_experts: int, ep: int) -> None:
    """``ValueError`` unless the experts split evenly over ``ep`` ranks."""
    if n_experts % ep:
        raise ValueError(f"expert parallelism: n_experts={n_experts} is not divisible by "
                         f"ep={ep} (each rank must hold the same number of experts)")


class ExpertParallelMoE(Module):
    """An :class:`~simpar.nn.moe.MoE` layer whose experts are split over ``comm``.

    Build it with :meth:`from_reference`.  Holds ``router.W`` (replicated) and
    ``experts.{e}.*`` for its own experts only, under the reference's names.
    """

    def __init__(self, comm: Comm, h: int, n_experts: int, d_ff: int, k: int,
                 capacity_factor: float | None, drop_policy: str, balance_coef: float,
                 z_coef: float, aux_scale: float | None = None, dtype=np.float64,
                 trace_name: str = "moe") -> None:
        super().__init__()
        check_moe_config(h, n_experts, k, capacity_factor, drop_policy)
        check_expert_parallel(n_experts, comm.size)
        self.comm = comm
        comm.agree("expert-parallel MoE layer (h, n_experts, d_ff, top_k, capacity factor, "
                   "drop policy, balance and z coefficients)",
                   (h, n_experts, d_ff, k, capacity_factor, drop_policy, balance_coef, z_coef))
        self.h, self.n_experts, self.k, self.d_ff = h, n_experts, k, d_ff
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.aux_scale = 1.0 / comm.size if aux_scale is None else aux_scale
        self.trace_name = trace_name
        self.n_local = n_experts // comm.size
        self.first = comm.rank * self.n_local          # my experts: [first, first + n_local)
        # placeholder weights (fixed seed); from_reference copies the real ones
        self.router = self.add_child("router", Linear(h, n_experts, bias=False, rng=0,
                                                      dtype=dtype))
        self.experts = {e: self.add_child(f"experts.{e}", MLP(h, d_ff, rng=e, dtype=dtype))
                        for e in range(self.first, self.first + self.n_local)}
        self.stats: dict = {}
        self.cuts: list[tuple[Comm, bool]] = []      # cut_sequence adds them

    def cut_sequence(self, comm: Comm, balanced: bool = False) -> None:
        """The input is this rank's share of a sequence cut over ``comm`` —
        contiguous over ``tp`` (sequence parallelism), load-balanced or contiguous
        over ``cp`` (context parallelism); the layer routes the whole sequence as
        one group (module docstring).  Innermost cut first: ``tp``, then ``cp``."""
        self.cuts.append((comm, bool(balanced)))

    @classmethod
    def from_reference(cls, ref: MoE, comm: Comm, aux_scale: float | None = None
                       ) -> "ExpertParallelMoE":
        """Cut from a reference layer: copy the router and this rank's experts.
        Raises (before any communication) if the experts do not split over ``comm``."""
        layer = cls(comm, ref.h, ref.n_experts, ref.d_ff, ref.k, ref.capacity_factor,
                    ref.drop_policy, ref.balance_coef, ref.z_coef, aux_scale,
                    dtype=ref.router.params["W"].dtype, trace_name=ref.trace_name)
        sd = ref.state_dict()
        layer.load_state_dict({name: sd[name] for name in layer.parameters()})
        return layer

    def _receive_layout(self, kept_table: np.ndarray) -> dict:
        """Rows of the dispatch receive buffer that belong to each of my experts.

        ``kept_table[s, e]``: rows rank ``s`` sends to expert ``e``.  From each
        source the rows arrive sorted by expert, sources in rank order."""
        mine = kept_table[:, self.first:self.first + self.n_local]     # (ep, n_local)
        starts = np.cumsum(np.concatenate([[0], mine.reshape(-1)]))[:-1].reshape(mine.shape)
        return {self.first + j: np.concatenate(
                    [np.arange(starts[s, j], starts[s, j] + mine[s, j]) for s in range(len(mine))]
                ).astype(np.int64) for j in range(self.n_local)}

    # ----------------------------------------------------------- forward
    def forward(self, x, key=0):
        for comm, balanced in self.cuts:                 # the whole sequence
            x = all_gather_sequence(x, comm, balanced)
        y = self._forward(x, key)
        for comm, balanced in reversed(self.cuts):       # this rank's share of it
            y = own_chunks(y, comm, balanced)
        return y

    def _forward(self, x, key):
        check_input(x, self.h)
        X = x.reshape(-1, self.h)
        z, p, (r,) = route_groups(self, X, key, 1)     # my tokens: one GShard group
        tok, cho = r.dispatch()                          # rows to send, sorted by expert
        kept = r.kept_per_expert()
        send_counts = kept.reshape(self.comm.size, self.n_local).sum(axis=1)
        # counts per expert: every rank learns what every rank sends to every expert
        kept_table = self.comm.all_gather(kept[None, :].astype(np.int64), axis=0)
        layout = self._receive_layout(kept_table)
        # dispatch: token rows travel to the ranks holding their experts
        x_recv, recv_counts = self.comm.all_to_all(X[tok], send_counts)
        out_recv = np.empty_like(x_recv)
        with trace.compute(f"{self.trace_name}.experts.forward",
                           flops=expert_flops(self, len(x_recv))):
            for e, expert in self.experts.items():
                out_recv[layout[e]] = expert.forward(frozen(x_recv[layout[e]]), key)
        # combine: expert outputs travel back, in the order the rows were sent
        out_sent, _ = self.comm.all_to_all(out_recv, recv_counts)
        gate_sent = r.gates[tok, cho]
        y = np.zeros_like(X)
        with trace.compute(f"{self.trace_name}.combine.forward"):
            np.add.at(y, tok, gate_sent[:, None] * out_sent)    # a token may get k rows
        self._save(key, copy={"X": X}, z=z, p=p, routing=r, tok=tok, cho=cho,
                   gate_sent=gate_sent, out_sent=out_sent, layout=layout,
                   send_counts=send_counts, recv_counts=recv_counts)
        return y.reshape(x.shape)

    # ---------------------------------------------------------- backward
    def backward_pass(self, dy, key=0, *, weights=True):
        for comm, balanced in self.cuts:                 # dy of the whole sequence
            dy = all_gather_sequence(dy, comm, balanced)
        dx = self._backward(dy, key, weights)
        for comm, balanced in reversed(self.cuts):
            dx = own_chunks(dx, comm, balanced)
        return dx

    def _backward(self, dy, key, weights):
        s = self._pop(key)
        X, tok, cho, r = s["X"], s["tok"], s["cho"], s["routing"]
        dY = dy.reshape(-1, self.h)
        with trace.compute(f"{self.trace_name}.combine.backward"):
            dY_sent = dY[tok]
            dgate_sent = np.einsum("ij,ij->i", dY_sent, s["out_sent"])
            dout_sent = s["gate_sent"][:, None] * dY_sent
        # gradient of the combine: travels like the dispatch
        dout_recv, _ = self.comm.all_to_all(dout_sent, s["send_counts"])
        dx_recv = np.empty_like(dout_recv)
        layout = s["layout"]
        with experts_backward_region(self, key, len(dx_recv), weights):
            for e, expert in self.experts.items():
                dx_recv[layout[e]] = expert.backward_pass(dout_recv[layout[e]], key,
                                                          weights=weights)
        # gradient of the dispatch: travels like the combine
        dx_sent, _ = self.comm.all_to_all(dx_recv, s["recv_counts"])
        dX = np.zeros_like(X)
        np.add.at(dX, tok, dx_sent)                     # the experts' input gradients
        dgates = np.zeros_like(r.gates)
        dgates[tok, cho] = dgate_sent
        dXr, dW = router_backward(self, X, s["z"], s["p"], [r], dgates)
        dX += dXr
        # the router is replicated: sum its gradient over the group
        self.comm.all_reduce(dW, out=dW)
        self.router.grads["W"] += dW
        return dX.reshape(dy.shape)

    def backward_weights(self, key=0) -> None:
        """My experts' weight gradients left by :meth:`backward_input` (zero-bubble);
        the router's was computed, and summed over the group, by ``backward``."""
        experts_backward_weights(self, key)

    def flops(self, batch: int, seq: int) -> float:
        """This rank's work with perfectly balanced routing and no dropping: its
        experts then process ``k·T`` rows, as many as its own tokens make (for a
        cut sequence ``T`` is the whole sequence's, e.g. ``cp·batch·seq``)."""
        T = batch * seq * math.prod(comm.size for comm, _ in self.cuts)   # the whole sequence
        return router_flops(T, self.h, self.n_experts) + expert_flops(self, self.k * T)
