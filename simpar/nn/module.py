"""The ``Module`` base class: parameters, gradients, children, saved activations.

A module computes ``y = m.forward(x, key=mb)`` and ``dx = m.backward(dy, key=mb)``.
``key`` names a micro-batch: several forwards may be in flight at once (a pipeline
stage holds up to ``p`` of them), each with its own saved activations, and each
backward consumes (pops) exactly the activations of its key.

Rules every module follows:

* What backward needs is stored with :meth:`Module._save` and taken back with
  :meth:`Module._pop`.  Arrays that came from the caller are stored as **copies**
  (a pipeline's receive buffer is reused for the next micro-batch; a cached
  reference to it would silently corrupt the backward pass).  Arrays the module
  created itself are stored as they are.  Both calls report the bytes to the memory
  ledger of :mod:`simpar.trace` (category ``"activations"``).
* One exception saves a copy that cannot matter: an input that is **read-only**
  and not a view of writeable memory (see :func:`frozen`) can never be overwritten,
  so it is kept by reference.  Composite modules freeze the intermediate arrays
  they hand to their children (``ln1``'s output going into ``qkv``, say); a
  receive buffer is writeable and is always copied.
* Gradients **accumulate**: ``backward`` adds into ``m.grads[name]``; call
  :meth:`zero_grad` between steps.
* **The backward pass in two calls** (zero-bubble pipelines, Qi et al. 2023, §2;
  PyTorch's ``stage_backward_input`` / ``stage_backward_weight``).  For a linear
  layer ``Y = X W`` the backward is two independent GEMMs:
  ``I: dX = dY Wᵀ`` (needed by the previous layer at once) and
  ``W: dW = Xᵀ dY`` (needed only by the optimizer).  So every module offers

  - ``dx = m.backward_input(dy, key)`` — ``I`` only; what ``W`` needs (``X`` and
    ``dY`` of each linear layer) stays saved under ``key``;
  - ``m.backward_weights(key)`` — ``W``: the deferred weight gradients of ``key``;
  - ``dx = m.backward(dy, key)`` — both, in one pass (no ``dY`` is kept).

  A module writes its backward once, as :meth:`Module.backward_pass` with an
  explicit ``weights`` argument (``True``: both, ``False``: ``I`` only) that it
  passes on to its children; no hidden state decides what a call computes.
  Cheap weight gradients that need no GEMM (LayerNorm's ``γ``, ``β``, an
  embedding's scatter-add) are computed by ``I`` as well.
* **Activation recomputation** (Korthikanti et al. 2022, §5; Chen et al. 2016):
  ``m.set_recompute(mode)`` sets every transformer block and attention layer
  inside ``m``.  ``"full"``: a block keeps only its input and runs its forward
  again at the start of its backward (region ``<block>.recompute``);
  ``"selective"``: attention keeps ``q, k, v`` but not the ``a·s²`` softmax
  probabilities, and recomputes ``softmax(q kᵀ/√d)`` in backward (region
  ``<attn>.core.recompute`` or ``<attn>.recompute``).  The recomputed values are
  the very same floating-point numbers, so gradients are bit for bit those of
  ``"none"``.
* ``m.params`` holds the module's own parameters, ``m.children`` its sub-modules,
  in registration order; :meth:`parameters` flattens the tree into dotted names
  (``blocks.0.attn.qkv.W``) whose values are the live arrays.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .. import trace
from ..formulas import RECOMPUTE_MODES, check_recompute  # noqa: F401 (re-exported)


def frozen(a: np.ndarray) -> np.ndarray:
    """Make ``a`` (and the array it is a view of) read-only and return it.

    For arrays a module has just created and passes on to a child: the child may
    then keep a reference instead of a copy (see :func:`is_immutable`).
    """
    a.flags.writeable = False
    if isinstance(a.base, np.ndarray):
        a.base.flags.writeable = False
    return a


def is_immutable(a) -> bool:
    """True if ``a`` is a read-only ndarray whose memory nobody can write through
    another array: every array up its ``base`` chain is read-only and the chain
    ends at an array owning its memory (not at a foreign buffer)."""
    if not isinstance(a, np.ndarray):
        return False
    while True:
        if a.flags.writeable:
            return False
        if a.base is None:
            return True
        if not isinstance(a.base, np.ndarray):
            return False
        a = a.base


class Module:
    """Base class of every layer; see the module docstring for the contract."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.children: dict[str, Module] = {}
        self._saved: dict = {}          # (slot, key) -> (dict of arrays, nbytes)

    # ------------------------------------------------------------ structure
    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        """Register a parameter and its zero gradient; returns the parameter."""
        if "." in name:
            raise ValueError(f"parameter name {name!r} must not contain '.'")
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def add_child(self, name: str, module: "Module") -> "Module":
        """Register a sub-module under ``name``; returns it."""
        if not isinstance(module, Module):
            raise TypeError(f"child {name!r} is not a Module: {type(module).__name__}")
        self.children[name] = module
        return module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """``(dotted name, module)`` for this module and every descendant."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _walk(self, prefix: str = "") -> Iterator[tuple[str, "Module", str]]:
        for name in self.params:
            yield prefix + name, self, name
        for cname, child in self.children.items():
            yield from child._walk(f"{prefix}{cname}.")

    # ------------------------------------------------------------- parameters
    def parameters(self) -> dict[str, np.ndarray]:
        """Flat ``{dotted name: live parameter array}`` (update in place)."""
        return {full: m.params[n] for full, m, n in self._walk()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Flat ``{dotted name: live gradient array}``, same keys as :meth:`parameters`."""
        return {full: m.grads[n] for full, m, n in self._walk()}

    def zero_grad(self) -> None:
        for g in self.gradients().values():
            g.fill(0)

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters().values()))

    def param_bytes(self) -> int:
        return int(sum(p.nbytes for p in self.parameters().values()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of all parameters under their dotted names."""
        return {k: v.copy() for k, v in self.parameters().items()}

    def load_state_dict(self, sd: dict) -> None:
        """Copy ``sd`` into the parameters in place, casting to their dtype.

        The names must be exactly those of :meth:`state_dict` (``KeyError`` naming
        the missing and unexpected ones) and the shapes must match (``ValueError``).
        Nothing is written unless everything checks out.
        """
        params = self.parameters()
        missing = [k for k in params if k not in sd]
        unexpected = [k for k in sd if k not in params]
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        bad = [f"{k}: expected {params[k].shape}, got {np.shape(sd[k])}"
               for k in params if np.shape(sd[k]) != params[k].shape]
        if bad:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(bad))
        for k, p in params.items():
            np.copyto(p, np.asarray(sd[k]), casting="unsafe")

    def init_random_(self, rng: np.random.Generator, std: float = 0.5) -> "Module":
        """Randomise *every* parameter (test helper): LayerNorm gammas ``1 + N(0, std²)``,
        all other parameters ``N(0, std²)``.  Default init has zero biases and unit
        gammas, whose gradients a test could then get wrong unnoticed."""
        for full, p in self.parameters().items():
            r = rng.standard_normal(p.shape) * std
            if full.rsplit(".", 1)[-1] == "gamma":
                r += 1.0
            p[...] = r
        return self

    def set_recompute(self, mode: str) -> "Module":
        """Activation recomputation ``"none" | "selective" | "full"`` for every
        descendant that supports it (those with a ``recompute`` attribute:
        transformer blocks and attention layers); returns self."""
        check_recompute(mode)
        for _, m in self.named_modules():
            if hasattr(m, "recompute"):
                m.recompute = mode
        return self

    @property
    def dtype(self) -> np.dtype | None:
        """dtype of the first parameter (``None`` for a module without any)."""
        for p in self.parameters().values():
            return p.dtype
        return None

    # ------------------------------------------------- saved activations
    def _save(self, key, copy: dict | None = None, *, slot: str = "", **own) -> None:
        """Keep what backward needs for micro-batch ``key``.

        ``copy``: arrays that came from the caller, stored as copies (unless
        :func:`is_immutable`, then by reference).  ``own``:
        arrays this module created (or non-array values), stored as they are.
        ``slot`` lets one module keep several independent records per key (the GPT
        keeps one for its embedding end and one for its head end).
        """
        where = f" (slot {slot!r})" if slot else ""
        if (slot, key) in self._saved:
            raise RuntimeError(
                f"{type(self).__name__}: activations for key {key!r}{where} are already "
                f"saved (forward called twice for the same micro-batch without a backward)")
        saved = dict(own)
        if copy:
            for name, a in copy.items():
                saved[name] = a if is_immutable(a) else np.array(a, copy=True)
        nbytes = sum(a.nbytes for a in saved.values() if isinstance(a, np.ndarray))
        self._saved[(slot, key)] = (saved, nbytes)
        trace.alloc("activations", nbytes)

    def _check_new_key(self, key) -> None:
        """Before a forward's first message: ``RuntimeError`` if this module (or a
        descendant) still holds activations of ``key`` (a second forward of the
        same micro-batch before its backward)."""
        if key in self.saved_keys():
            raise RuntimeError(
                f"{type(self).__name__}: activations for key {key!r} are already saved "
                f"(forward called twice for the same micro-batch without a backward)")

    def _pop(self, key, *, slot: str = "") -> dict:
        """Take back (and free) what :meth:`_save` stored for ``key``."""
        try:
            saved, nbytes = self._saved.pop((slot, key))
        except KeyError:
            where = f" (slot {slot!r})" if slot else ""
            raise KeyError(
                f"{type(self).__name__}: no saved activations for key {key!r}{where} "
                f"(backward without forward, or backward called twice); "
                f"saved keys: {self.saved_keys()}") from None
        trace.free("activations", nbytes)
        return saved

    def saved_keys(self) -> list:
        """Micro-batch keys with activations saved in this module or a descendant."""
        keys = []
        for _, k in self._saved:
            if k not in keys:
                keys.append(k)
        for child in self.children.values():
            keys += [k for k in child.saved_keys() if k not in keys]
        return keys

    def saved_bytes(self) -> int:
        """Bytes of activations currently saved in this module and its descendants."""
        return sum(n for _, n in self._saved.values()) + \
            sum(c.saved_bytes() for c in self.children.values())

    def clear_saved(self, key=None) -> None:
        """Drop the saved activations of ``key`` (all keys if ``None``), recursively.

        Use after a forward that will have no backward (evaluation)."""
        for slot, k in list(self._saved):
            if key is None or k == key:
                self._pop(k, slot=slot)
        for child in self.children.values():
            child.clear_saved(key)

    # ----------------------------------------------------------- compute
    def forward(self, x, key=0):
        raise NotImplementedError

    def backward(self, dy, key=0):
        """Input gradient and every weight gradient of micro-batch ``key``: what
        :meth:`backward_input` followed by :meth:`backward_weights` computes, in
        one pass."""
        return self.backward_pass(dy, key, weights=True)

    def backward_input(self, dy, key=0):
        """Zero-bubble ``I``: the input gradient only.  Each linear layer keeps its
        ``X`` and ``dY`` under ``key`` until :meth:`backward_weights` (``W``)."""
        return self.backward_pass(dy, key, weights=False)

    def backward_pass(self, dy, key=0, *, weights: bool = True):
        """The backward every module implements once: ``weights=True`` computes
        the weight gradients too (:meth:`backward`), ``weights=False`` leaves
        them for :meth:`backward_weights` (:meth:`backward_input`).  A composite
        module passes ``weights`` on to its children."""
        raise NotImplementedError(f"{type(self).__name__} has no backward_pass")

    def backward_weights(self, key=0) -> None:
        """Zero-bubble ``W``: the weight gradients a :meth:`backward_input` of
        ``key`` left (accumulated into ``grads``).  A composite module asks its
        children; a leaf with nothing deferred does nothing."""
        for child in self.children.values():
            child.backward_weights(key)

    # ------------------------------------------- full recomputation helpers
    def _keep_input_only(self, x, key) -> None:
        """Full recomputation, end of forward: drop everything this module and
        its descendants saved for ``key`` and keep a copy of the input ``x``."""
        self.clear_saved(key)
        self._save(key, copy={"x": x}, slot="recompute")

    def _forward_recomputable(self, x, key):
        """``self._forward(x, key)``; under full recomputation (``self.recompute
        == "full"``) then keep only the input (:meth:`_keep_input_only`)."""
        y = self._forward(x, key)
        if self.recompute == "full":
            self._keep_input_only(x, key)
        return y

    def _recompute_forward(self, key, name: str, flops: float) -> None:
        """Full recomputation, start of backward: run ``self._forward`` again on
        the kept input, saving what backward needs (a compute region ``name``)."""
        x = self._pop(key, slot="recompute")["x"]
        with trace.compute(name, flops=flops):
            self._forward(x, key)

    def flops(self, batch: int, seq: int) -> float:
        """Forward matmul FLOPs for a ``(batch, seq)`` input; backward is twice this."""
        return float(sum(c.flops(batch, seq) for c in self.children.values()))

    def __call__(self, x, key=0):
        return self.forward(x, key)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.params.items())
        kids = "".join(f"\n  ({k}): " + repr(c).replace("\n", "\n  ")
                       for k, c in self.children.items())
        return f"{type(self).__name__}({inner}){kids}"
