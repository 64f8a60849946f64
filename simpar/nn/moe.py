"""The reference Mixture-of-Experts layer (Switch Transformer, GShard), one process.

::

    x (T, h) ──► router: z = x @ W_r ──► p = softmax(z) ──► top-k experts and gates
           │                                                        │
           └──► each kept (token, expert) pair: expert MLP(x) ──► y = Σ gate · MLP(x)

Steps, with the papers' names (T tokens, N = ``n_experts`` experts):

1. **Router** (Fedus et al. 2021, eq. 1): logits ``z = x W_r`` (no bias), router
   probabilities ``p = softmax(z)``.
2. **Top-k**: every token picks its ``k`` most probable experts; ties are broken by
   the **lowest expert index** (a stable sort).  ``k = 1`` is the Switch layer and
   the gate is the probability itself, ``g = p_e`` (eq. 2); ``k >= 2`` is GShard
   style and the gates are renormalised over the chosen experts,
   ``g_j = p_{e_j} / Σ_m p_{e_m}``.
3. **Capacity** (Switch §2.2): each expert takes at most
   ``C = ⌈k · tokens / N · capacity_factor⌉`` assignments of one *group* of tokens
   (``capacity_factor=None``: ``C = tokens``, nothing is ever dropped).  The token
   axis is split into ``groups`` equal groups, as GShard does; each group has its
   own capacity and its own auxiliary losses.  Under expert parallelism a group is
   one rank's batch, so the reference with ``groups = ep`` computes exactly what
   ``ep`` ranks compute (:mod:`simpar.parallel.expert`).
4. **Drop policy**: the assignments of a group queue up for their experts in a
   priority order and the first ``C`` of each queue are kept; the others are
   *dropped*: they contribute nothing, and a token with every choice dropped gets
   a zero MoE output (the residual connection carries it).  The gates of the kept
   choices are **not** renormalised after dropping.
   ``drop_policy="position"`` (default): all first choices in token order, then
   all second choices, ... (GShard).  ``"probability"``: highest router
   probability first, ties by the position order (batch prioritized routing,
   Riquelme et al. 2021).
5. **Auxiliary losses**, per group, averaged over groups:
   load balancing ``α · N · Σᵢ fᵢ Pᵢ`` (Switch eq. 4-6; α = ``balance_coef`` =
   0.01) where ``fᵢ`` is the fraction of the group's ``k·T`` assignments routed
   to expert i *before* capacity (for k = 1 Switch's fraction of tokens) and
   ``Pᵢ`` the mean router probability of expert i; its value is 1 for perfectly
   uniform routing.  Router z-loss ``β · (1/T) Σ_t (logsumexp z_t)²`` (Zoph et
   al. 2022, eq. 5; β = ``z_coef`` = 0.001).

Gradients flow through the combine weights (gates) into the router, and through
both auxiliary losses (``fᵢ`` is piecewise constant: no gradient).  The auxiliary
loss enters the differentiated loss with weight ``aux_scale`` (1 here; an
expert-parallel layer uses ``1/ep``, see :mod:`simpar.parallel.expert`).

Load statistics of every forward (tokens per expert before and after capacity,
dropped fraction, auxiliary losses) are kept in ``layer.stats[key]`` and
recorded by the tracer as ``args["moe"]`` of the ``<name>.router.forward``
compute event.

Parameter names: ``router.W`` ``(h, N)`` and ``experts.{e}.fc1.{W,b}``,
``experts.{e}.fc2.{W,b}`` (each expert is an :class:`~simpar.nn.layers.MLP`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .. import trace
from . import functional as F
from .layers import MLP, Linear, _rng
from .module import Module, frozen

BALANCE_COEF = 0.01      # α of the Switch load-balancing loss (Fedus et al. 2021)
Z_COEF = 0.001           # coefficient of the router z-loss (Zoph et al. 2022)
DROP_POLICIES = ("position", "probability")

__all__ = ["MoE", "MoEStats", "Routing", "BALANCE_COEF", "Z_COEF", "DROP_POLICIES",
           "check_moe_config", "expert_capacity", "top_k", "top_k_backward", "route",
           "load_balance_loss", "router_z_loss", "check_input"]


# ------------------------------------------------------------------ config
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_moe_config(h: int, n_experts: int, k: int, capacity_factor, drop_policy: str) -> None:
    """``ValueError`` naming the bad value (no communication: safe on every rank)."""
    for name, v in (("h", h), ("n_experts", n_experts), ("k", k)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"MoE: {name} must be a positive integer, got {v!r}")
    if k > n_experts:
        raise ValueError(f"MoE: top-k k={k} is larger than the number of experts "
                         f"n_experts={n_experts}")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float,
                                                                                 np.number)):
            raise ValueError(f"MoE: capacity_factor must be a number or None, got "
                             f"{capacity_factor!r}")
        if not capacity_factor > 0 or not math.isfinite(capacity_factor):
            raise ValueError(f"MoE: capacity_factor must be > 0 (or None for no capacity "
                             f"limit), got {capacity_factor!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"MoE: unknown drop_policy {drop_policy!r}; choose one of "
                         f"{DROP_POLICIES}")


def expert_capacity(tokens: int, n_experts: int, k: int, capacity_factor) -> int:
    """``C = ⌈k · tokens / n_experts · capacity_factor⌉`` (Switch §2.2), computed
    exactly with the factor as written in decimal (``1.2`` is 6/5, so
    ``⌈1 · 10 / 4 · 1.2⌉ = 3``); ``capacity_factor=None``: ``C = tokens`` (no
    expert can be asked for more, since a token picks an expert at most once)."""
    if capacity_factor is None:
        return int(tokens)
    return math.ceil(Fraction(k * tokens, n_experts) * Fraction(str(capacity_factor)))


# ----------------------------------------------------------------- top-k
def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable experts of every token and their gates.

    Returns ``experts`` ``(T, k)`` (column j = j-th choice; equal probabilities:
    lowest expert index first) and ``gates`` ``(T, k)``: ``p`` itself for
    ``k = 1`` (Switch), renormalised ``p_{e_j} / Σ_m p_{e_m}`` for ``k >= 2``.
    """
    experts = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(probs, experts, axis=1)
    gates = picked if k == 1 else picked / picked.sum(axis=1, keepdims=True)
    return experts, gates


def top_k_backward(dgates: np.ndarray, probs: np.ndarray, experts: np.ndarray,
                   gates: np.ndarray) -> np.ndarray:
    """Gradient w.r.t. ``probs`` of :func:`top_k`'s gates (experts held fixed).

    ``k = 1``: ``dp_e = dg``.  ``k >= 2``, with ``S = Σ_m p_{e_m}``:
    ``dp_{e_m} = (dg_m − Σ_j dg_j g_j) / S``; unchosen experts get nothing.
    """
    k = experts.shape[1]
    if k == 1:
        dpicked = dgates
    else:
        s = np.take_along_axis(probs, experts, axis=1).sum(axis=1, keepdims=True)
        dpicked = (dgates - (dgates * gates).sum(axis=1, keepdims=True)) / s
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, experts, dpicked, axis=1)     # a token's experts are distinct
    return dprobs


# --------------------------------------------------------------- routing
@dataclass
class Routing:
    """The routing decisions for one group of ``T`` tokens.

    An *assignment* is one (token, choice) pair, numbered choice-major:
    ``a = j · T + t`` is token ``t``'s ``j``-th choice.
    """

    experts: np.ndarray     # (T, k) expert of each choice
    gates: np.ndarray       # (T, k) combine weight of each choice
    kept: np.ndarray        # (T, k) bool: within capacity
    order: np.ndarray       # kept assignments, sorted by (expert, place in its queue)
    capacity: int
    n_experts: int

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    def routed_per_expert(self) -> np.ndarray:
        """Assignments each expert was asked to take (before capacity)."""
        return np.bincount(self.experts.reshape(-1), minlength=self.n_experts)

    def kept_per_expert(self) -> np.ndarray:
        """Assignments each expert really takes (after capacity)."""
        return np.bincount(self.experts[self.kept], minlength=self.n_experts)

    def dispatch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(token, choice)`` of every kept assignment, sorted by expert: the rows
        sent to the experts, in the order they are sent."""
        return self.order % self.tokens, self.order // self.tokens


def route(probs: np.ndarray, k: int, capacity: int, drop_policy: str = "position") -> Routing:
    """Top-k, then capacity: which assignments of this group each expert keeps."""
    T, n_experts = probs.shape
    experts, gates = top_k(probs, k)
    flat_expert = experts.T.reshape(-1)                   # choice-major assignment ids
    if drop_policy == "position":
        priority = np.arange(T * k)
    else:                                                  # highest probability first
        flat_prob = np.take_along_axis(probs, experts, axis=1).T.reshape(-1)
        priority = np.argsort(-flat_prob, kind="stable")
    # place of each assignment in its expert's queue: count earlier ones in priority order
    queue = flat_expert[priority]
    onehot = queue[:, None] == np.arange(n_experts)[None, :]
    place_sorted = np.cumsum(onehot, axis=0)[np.arange(T * k), queue] - 1
    place = np.empty(T * k, dtype=np.int64)
    place[priority] = place_sorted
    kept_flat = place < capacity
    order = np.lexsort((place, flat_expert))              # by expert, then queue place
    order = order[kept_flat[order]]
    return Routing(experts, gates, kept_flat.reshape(k, T).T.copy(), order, capacity, n_experts)


# -------------------------------------------------------- auxiliary losses
def load_balance_loss(probs: np.ndarray, experts: np.ndarray) -> tuple[float, np.ndarray]:
    """Switch load balancing ``N · Σᵢ fᵢ Pᵢ`` (without α) of one group and its
    gradient w.r.t. ``probs``.

    ``fᵢ`` = fraction of the ``k·T`` assignments routed to expert i (before
    capacity), ``Pᵢ = (1/T) Σ_t p_{t,i}``.  ``f`` comes from an argmax and has no
    gradient, so ``∂/∂p_{t,i} = N fᵢ / T``.  Equals 1 when routing is uniform.
    """
    T, n = probs.shape
    f = np.bincount(experts.reshape(-1), minlength=n) / experts.size
    P = probs.mean(axis=0)
    value = float(n * np.dot(f, P))
    dprobs = np.broadcast_to((n * f / T).astype(probs.dtype), probs.shape).copy()
    return value, dprobs


def router_z_loss(logits: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Router z-loss ``(1/T) Σ_t (logsumexp z_t)²`` (without its coefficient) of
    one group and its gradient ``2 lse_t / T · softmax(z_t)`` w.r.t. the logits."""
    m = logits.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    T = logits.shape[0]
    value = float(np.mean(lse[:, 0] ** 2))
    return value, (2.0 / T) * lse * probs


# ------------------------------------------------------------ statistics
@dataclass
class MoEStats:
    """Load statistics of one forward (over all of the layer's groups)."""

    routed_per_expert: np.ndarray    # assignments routed to each expert (before capacity)
    kept_per_expert: np.ndarray      # tokens each expert processed (after capacity)
    capacity: int                    # per expert and group
    balance_loss: float              # N · Σ fᵢ Pᵢ, mean over groups (1 = uniform)
    z_loss: float                    # mean (logsumexp z)², mean over groups
    aux_loss: float                  # balance_coef · balance_loss + z_coef · z_loss

    @property
    def dropped_fraction(self) -> float:
        routed = int(self.routed_per_expert.sum())
        return 1.0 - int(self.kept_per_expert.sum()) / routed if routed else 0.0

    def as_dict(self) -> dict:
        """Plain Python values (for tracer event args and Chrome traces)."""
        return {"routed_per_expert": self.routed_per_expert.tolist(),
                "kept_per_expert": self.kept_per_expert.tolist(),
                "capacity": int(self.capacity), "dropped_fraction": self.dropped_fraction,
                "balance_loss": self.balance_loss, "z_loss": self.z_loss,
                "aux_loss": self.aux_loss}


def router_flops(tokens: int, h: int, n_experts: int) -> float:
    return F.linear_flops(tokens, h, n_experts)


def check_input(x, h: int) -> None:
    """``x`` must be an array of shape ``(..., h)``."""
    if not isinstance(x, np.ndarray) or x.ndim < 1 or x.shape[-1] != h:
        raise ValueError(f"MoE: input must be an array of shape (..., h={h}), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")


# ================================================================= the layer
class MoE(Module):
    """Mixture-of-Experts feed-forward layer (reference); see the module docstring.

    ``forward(x)`` takes ``(..., h)`` and returns the same shape: the MoE output
    only (no residual).  ``backward(dy)`` also back-propagates the auxiliary loss
    (weight ``aux_scale``), whose value is ``self.stats[key].aux_loss``.
    """

    def __init__(self, h: int, n_experts: int, d_ff: int | None = None, k: int = 1,
                 capacity_factor: float | None = 1.25, groups: int = 1,
                 drop_policy: str = "position", balance_coef: float = BALANCE_COEF,
                 z_coef: float = Z_COEF, aux_scale: float = 1.0, rng=None,
                 dtype=np.float64, trace_name: str = "moe") -> None:
        super().__init__()
        check_moe_config(h, n_experts, k, capacity_factor, drop_policy)
        if not _is_int(groups) or groups < 1:
            raise ValueError(f"MoE: groups must be a positive integer, got {groups!r}")
        rng = _rng(rng)
        self.h, self.n_experts, self.k = h, n_experts, k
        self.d_ff = 4 * h if d_ff is None else d_ff
        self.capacity_factor, self.groups, self.drop_policy = capacity_factor, groups, drop_policy
        self.balance_coef, self.z_coef, self.aux_scale = balance_coef, z_coef, aux_scale
        self.trace_name = trace_name
        self.router = self.add_child("router", Linear(h, n_experts, bias=False, rng=rng,
                                                      dtype=dtype))
        self.experts = {e: self.add_child(f"experts.{e}", MLP(h, self.d_ff, rng=rng, dtype=dtype))
                        for e in range(n_experts)}
        self.stats: dict = {}            # key -> MoEStats of the last forward with that key

    # ---------------------------------------------------------- forward
    def forward(self, x, key=0):
        check_input(x, self.h)
        X = x.reshape(-1, self.h)
        z, p, routes = route_groups(self, X, key, self.groups)
        Tg = X.shape[0] // self.groups
        experts = np.concatenate([r.experts for r in routes])
        gates = np.concatenate([r.gates for r in routes])
        # the rows each expert processes: its kept assignments, group by group
        tok, cho = [], []
        for g, r in enumerate(routes):
            t, c = r.dispatch()
            tok.append(t + g * Tg)
            cho.append(c)
        tok, cho = np.concatenate(tok), np.concatenate(cho)
        which = experts[tok, cho]
        per_expert = {e: np.flatnonzero(which == e) for e in range(self.n_experts)}
        outs = {}
        y = np.zeros_like(X)
        n_rows = len(tok)
        with trace.compute(f"{self.trace_name}.experts.forward",
                           flops=expert_flops(self, n_rows)):
            for e, expert in self.experts.items():
                a = per_expert[e]
                outs[e] = expert.forward(frozen(X[tok[a]]), key)
        with trace.compute(f"{self.trace_name}.combine.forward"):
            for e in self.experts:
                a = per_expert[e]                 # distinct tokens: plain += is safe
                y[tok[a]] += gates[tok[a], cho[a], None] * outs[e]
        self._save(key, copy={"X": X}, z=z, p=p, routes=routes, experts=experts, gates=gates,
                   tok=tok, cho=cho, per_expert=per_expert, **{f"out{e}": o for e, o in
                                                                outs.items()})
        return y.reshape(x.shape)

    # --------------------------------------------------------- backward
    def backward_pass(self, dy, key=0, *, weights=True):
        s = self._pop(key)
        X, tok, cho, gates = s["X"], s["tok"], s["cho"], s["gates"]
        dY = dy.reshape(-1, self.h)
        dX = np.zeros_like(X)
        dgates = np.zeros_like(gates)
        with trace.compute(f"{self.trace_name}.combine.backward"):
            douts = {}
            for e in self.experts:
                a = s["per_expert"][e]
                dYa = dY[tok[a]]
                dgates[tok[a], cho[a]] = np.einsum("ij,ij->i", dYa, s[f"out{e}"])
                douts[e] = gates[tok[a], cho[a], None] * dYa
        with experts_backward_region(self, key, len(tok), weights):
            for e, expert in self.experts.items():
                dX[tok[s["per_expert"][e]]] += expert.backward_pass(douts[e], key,
                                                                    weights=weights)
        dXr, dW = router_backward(self, X, s["z"], s["p"], s["routes"], dgates)
        self.router.grads["W"] += dW
        dX += dXr
        return dX.reshape(dy.shape)

    def backward_weights(self, key=0) -> None:
        """The experts' weight gradients left by :meth:`backward_input` (the
        router's small weight gradient is always computed by the backward itself)."""
        experts_backward_weights(self, key)

    def flops(self, batch: int, seq: int) -> float:
        """Router plus ``k`` expert MLPs per token (no token dropped)."""
        T = batch * seq
        return router_flops(T, self.h, self.n_experts) + expert_flops(self, self.k * T)


# --------------------------------- the router (shared with parallel/expert.py)
def route_groups(layer: Module, X: np.ndarray, key, groups: int):
    """Router, softmax, top-k and capacity of ``layer`` for ``groups`` equal groups
    of the tokens ``X`` (compute region ``<name>.router.forward``, whose event also
    carries the load statistics, kept in ``layer.stats[key]``).  Returns
    ``(z, p, routes)``: logits, probabilities, one :class:`Routing` per group."""
    T = X.shape[0]
    if T % groups:
        raise ValueError(f"MoE: {T} tokens cannot be split into groups={groups} equal groups")
    Tg = T // groups
    record: dict = {}           # filled below; the tracer stores it with the event
    with trace.compute(f"{layer.trace_name}.router.forward",
                       flops=router_flops(T, layer.h, layer.n_experts), moe=record):
        z = F.linear_forward(X, layer.router.params["W"])
        p = F.softmax(z)
        C = expert_capacity(Tg, layer.n_experts, layer.k, layer.capacity_factor)
        routes, lb, zl = [], [], []
        for g in range(groups):
            rows = slice(g * Tg, (g + 1) * Tg)
            routes.append(route(p[rows], layer.k, C, layer.drop_policy))
            lb.append(load_balance_loss(p[rows], routes[-1].experts)[0])
            zl.append(router_z_loss(z[rows], p[rows])[0])
        balance, zloss = float(np.mean(lb)), float(np.mean(zl))
        stats = MoEStats(sum(r.routed_per_expert() for r in routes),
                         sum(r.kept_per_expert() for r in routes), C, balance, zloss,
                         layer.balance_coef * balance + layer.z_coef * zloss)
        record.update(stats.as_dict())
    layer.stats[key] = stats
    return z, p, routes


def router_backward(layer: Module, X: np.ndarray, z, p, routes, dgates):
    """The router's part of the backward (region ``<name>.router.backward``):
    through top-k, the auxiliary losses (mean over groups, times
    ``layer.aux_scale``) and the softmax.  Returns ``(dX from the router, dW)``."""
    with trace.compute(f"{layer.trace_name}.router.backward",
                       flops=2 * router_flops(X.shape[0], layer.h, layer.n_experts)):
        experts = np.concatenate([r.experts for r in routes])
        gates = np.concatenate([r.gates for r in routes])
        dprobs = top_k_backward(dgates, p, experts, gates)
        dz = np.zeros_like(z)
        Tg, w = z.shape[0] // len(routes), layer.aux_scale / len(routes)
        for g, r in enumerate(routes):
            rows = slice(g * Tg, (g + 1) * Tg)
            dprobs[rows] += (w * layer.balance_coef) * load_balance_loss(p[rows], r.experts)[1]
            dz[rows] += (w * layer.z_coef) * router_z_loss(z[rows], p[rows])[1]
        dz += F.softmax_backward(dprobs, p)
        dXr, dW, _ = F.linear_backward(dz, X, layer.router.params["W"])
    return dXr, dW


# ----------------------------------------- expert regions (shared with parallel/expert.py)
def expert_flops(layer: Module, rows: int) -> float:
    """Forward FLOPs of ``rows`` token rows through one expert MLP."""
    return next(iter(layer.experts.values())).flops(1, rows)


def experts_backward_region(layer: Module, key, rows: int, weights: bool):
    """The compute region of the experts' backward: ``<name>.experts.backward``
    (2 × forward FLOPs), or, with ``weights=False`` (zero-bubble ``I``),
    ``<name>.experts.backward_input`` (1 ×) with the rest left for
    :func:`experts_backward_weights`."""
    if not weights:
        layer._save(key, slot="W", rows=rows)
        return trace.compute(f"{layer.trace_name}.experts.backward_input",
                             flops=expert_flops(layer, rows))
    return trace.compute(f"{layer.trace_name}.experts.backward",
                         flops=2 * expert_flops(layer, rows))


def experts_backward_weights(layer: Module, key) -> None:
    rows = layer._pop(key, slot="W")["rows"]
    with trace.compute(f"{layer.trace_name}.experts.backward_weights",
                       flops=expert_flops(layer, rows)):
        for expert in layer.experts.values():
            expert.backward_weights(key)
