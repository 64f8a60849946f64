"""Running a schedule: each rank dispatches its actions to its stages and its peers.

::

    for action in schedule.actions[rank]:
        F       x = input (token ids, a received array, or the previous local stage's output)
                y = stage.forward(x, key=mb)              # saved activations: copies, per mb
                last stage: loss of mb, and its gradient seed
        B / I   dy = loss gradient, a received array, or the next local stage's result
                dx = stage.backward(dy, key=mb)           # I: weight gradients deferred
        W       stage.backward_weights(key=mb)
        SEND_*  comm.isend(...)                           # posted; waited for at the end
        RECV_*  comm.recv(...)                            # blocks until the message is there

Gradients accumulate over the micro-batches in the modules' ``grads``; the loss is
the mean over **all** micro-batches' tokens, so each micro-batch's loss gradient is
scaled by its share of the tokens and the result equals one big batch (GPipe's
synchronous accumulation, Huang et al. 2019, §2)::

    L = Σ_mb (N_mb / N) · L_mb        ∇L = Σ_mb (N_mb / N) · ∇L_mb

The order of the actions is the schedule's (1F1B: Narayanan et al. 2021,
§2.2.1; ``I``/``W``: Qi et al. 2023, §2).

Before the first message every rank checks its arguments and proves the schedule
deadlock-free with :func:`.validate.validate`, so a bad configuration fails with the
same ``ValueError`` on every rank instead of hanging.

Each action's tracer events are tagged with ``args={"action", "mb", "stage"}`` and
the action's times on both clocks are returned as :class:`ActionRecord`\\ s; the
memory ledger's activation bytes after every action give the micro-batches held.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ... import trace
from ...comm import Comm
from .schedules import Action, Schedule
from .stage import PipelineStage
from .validate import validate

MAX_TAG = 32767          # the smallest upper bound MPI guarantees for tags


@dataclass
class ActionRecord:
    """One executed action of one rank, on both clocks."""

    rank: int
    index: int
    action: Action
    sim_start: float
    sim_end: float
    wall_start: float
    wall_end: float
    activation_bytes: int = 0      # ledger "activations" after the action


@dataclass
class StepResult:
    """What one rank got from :func:`run_schedule`."""

    rank: int
    loss: float | None                       # mean over all tokens (ranks of the last stage)
    mb_losses: dict = field(default_factory=dict)
    aux_losses: dict = field(default_factory=dict)   # mb -> this rank's MoE auxiliary losses
    records: list[ActionRecord] = field(default_factory=list)
    peak_activation_bytes: int = 0           # above the level at the start of the step
    mb_activation_bytes: int = 0             # held by one micro-batch's first forward

    @property
    def peak_in_flight(self) -> float:
        """Peak activations held, in micro-batches (bytes of one forward of chunk 0)."""
        return self.peak_activation_bytes / self.mb_activation_bytes \
            if self.mb_activation_bytes else 0.0


def message_tag(kind: str, mb: int, stage: int, n_stages: int) -> int:
    """A tag unique to one message: activation (``F``) or gradient (``B``) of
    micro-batch ``mb`` arriving at stage ``stage``."""
    return 2 * (mb * n_stages + stage) + (0 if kind == "F" else 1)


def check_run_args(comm: Comm, schedule: Schedule, stages: Mapping[int, PipelineStage],
                   inputs: Sequence, targets: Sequence) -> None:
    """Every check that needs no message; raises the same error on every rank."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if schedule.p != comm.size:
        raise ValueError(f"schedule {schedule.name!r} is for p={schedule.p} pipeline ranks, "
                         f"but the communicator has {comm.size}")
    mine = schedule.stages_of(comm.rank)
    if sorted(stages) != mine:
        raise ValueError(f"rank {comm.rank} must hold stages {mine} of the schedule, "
                         f"got {sorted(stages)}")
    for s, st in stages.items():
        if not isinstance(st, PipelineStage) or st.index != s or st.n_stages != schedule.n_stages:
            raise ValueError(f"stages[{s}] must be stage {s} of {schedule.n_stages}, got {st!r}")
    if len(inputs) != schedule.m or len(targets) != schedule.m:
        raise ValueError(f"schedule {schedule.name!r} runs m={schedule.m} micro-batches, got "
                         f"{len(inputs)} inputs and {len(targets)} targets")
    cfg = next(iter(stages.values())).config
    for mb, (x, y) in enumerate(zip(inputs, targets)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape != y.shape or not 0 < x.shape[1] <= cfg.seq_len:
            raise ValueError(f"micro-batch {mb}: inputs {x.shape} and targets {y.shape} must "
                             f"both be (batch, seq) with seq <= seq_len={cfg.seq_len}")
        for what, ids in (("inputs", x), ("targets", y)):
            if not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"micro-batch {mb}: {what} must be integer token ids, "
                                f"got dtype {ids.dtype}")
            if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
                raise ValueError(f"micro-batch {mb}: {what} hold token ids in [{ids.min()}, "
                                 f"{ids.max()}], outside [0, vocab_size={cfg.vocab_size})")
    top = message_tag("B", schedule.m - 1, schedule.n_stages - 1, schedule.n_stages)
    if top > MAX_TAG:
        raise ValueError(f"m={schedule.m} micro-batches x {schedule.n_stages} stages need "
                         f"message tags up to {top} > {MAX_TAG}")
    validate(schedule)                       # deadlock-free and causal, or ScheduleError


def check_split(comm: Comm, schedule: Schedule, stages: Mapping[int, PipelineStage]) -> None:
    """The stages of all ranks must chain into one partition of the model's layers
    (ranks cut with different splits would compute a wrong loss, silently).  One
    small exchange, the first time a set of stages runs; the same ``ValueError``
    naming each rank's split on every rank."""
    if all(getattr(st, "split_checked", False) for st in stages.values()):
        return
    mine = {s: (st.layers.start, st.layers.stop) for s, st in stages.items()}
    views = comm.gather_objects(mine)                  # cold path: once per set of stages
    split = {}
    for view in views:
        split.update(view)
    chained = [split[s][0] for s in range(1, schedule.n_stages)] == \
        [split[s][1] for s in range(schedule.n_stages - 1)] and split[0][0] == 0
    if not chained or sorted(split) != list(range(schedule.n_stages)):
        shown = "; ".join(f"rank {r}: " + ", ".join(f"stage {s} = layers [{a}, {b})"
                                                    for s, (a, b) in sorted(v.items()))
                          for r, v in enumerate(views))
        raise ValueError(f"pipeline ranks disagree on the layer split: {shown}")
    for st in stages.values():
        st.split_checked = True


def run_schedule(comm: Comm, schedule: Schedule, stages: Mapping[int, PipelineStage],
                 inputs: Sequence, targets: Sequence, *, clobber_buffers: bool | None = None,
                 loss_tokens: int | None = None,
                 grads_ready: Callable[[list[str]], None] | None = None,
                 loss_scale: float = 1.0) -> StepResult:
    """One training step of ``schedule`` on this rank (forward, backward, gradients
    accumulated into the stages' ``grads``; no optimizer step).

    ``stages``: ``{stage index: PipelineStage}`` for the stages this rank holds
    (``schedule.stages_of(rank)``).  ``inputs`` / ``targets``: the ``m``
    micro-batches of token ids, ``(batch, seq)`` each, the same on every rank.
    ``clobber_buffers``: overwrite every received array with NaN once its action
    is done, as a reused receive buffer would be — the result must not change,
    because modules save copies (DESIGN.md §2).  Default: ``comm.check``, i.e. on
    with ``SIMPAR_CHECK=1`` (as in the test suite), off otherwise (it costs a
    write of every message).

    ``loss_tokens``: the token count the loss is the mean over (default: all
    of this step's tokens; data parallelism passes the global count, so the
    gradients summed over the dp group are those of the global mean).
    ``grads_ready(names)`` is called as the gradients of a stage's pieces become
    final (in the last backward of that stage) — the hook data parallelism uses
    to launch its bucketed all-reduces early.
    ``loss_scale``: the backward starts from ``S · loss`` (mixed precision's loss
    scaling, :mod:`simpar.mixed_precision`); the reported losses are unscaled.

    Every rank must pass the same schedule and micro-batches (the checks run on
    each rank alone, before any message, so they cannot see another rank's).
    """
    check_run_args(comm, schedule, stages, inputs, targets)
    comm.agree("pipeline step (schedule, micro-batch shapes, loss tokens)",
               (schedule.name, schedule.p, schedule.m, schedule.n_stages,
                tuple(np.shape(x) for x in inputs), loss_tokens, float(loss_scale)))
    check_split(comm, schedule, stages)
    ex = _Executor(comm, schedule, stages, inputs, targets, clobber_buffers, loss_tokens,
                   grads_ready, loss_scale)
    return ex.run()


class _Executor:
    def __init__(self, comm, schedule, stages, inputs, targets, clobber, loss_tokens=None,
                 grads_ready=None, loss_scale=1.0):
        self.comm, self.sch, self.stages = comm, schedule, stages
        self.inputs = [np.asarray(x) for x in inputs]
        self.targets = [np.asarray(y) for y in targets]
        self.clobber = comm.check if clobber is None else bool(clobber)
        self.step_tokens = sum(y.size for y in self.targets)
        self.total_tokens = self.step_tokens if loss_tokens is None else int(loss_tokens)
        self.loss_scale = float(loss_scale)
        any_stage = next(iter(stages.values()))
        self.dtype = any_stage.dtype
        self.grads_ready = grads_ready
        # the action after which a stage's gradients are final: its last B or W
        self.final_action = {}
        for i, a in enumerate(schedule.actions[comm.rank]):
            if a.kind in ("B", "W"):
                self.final_action[a.stage] = i
        self.ready: dict = {}          # (kind, mb, stage) -> array waiting to be consumed
        self.loss_cache: dict = {}     # mb -> cross-entropy cache (last stage)
        self.sends: list = []
        self.result = StepResult(comm.rank, None)

    # ------------------------------------------------------------ the loop
    def run(self) -> StepResult:
        tracer = self.comm.tracer
        base = tracer.memory.current.get("activations", 0)
        peak = base
        for i, a in enumerate(self.sch.actions[self.comm.rank]):
            n0, s0, w0 = len(tracer.events), tracer.sim_now, time.perf_counter()
            self.last = self.final_action.get(a.stage) == i
            getattr(self, "do_" + a.kind)(a)
            for e in tracer.events[n0:]:
                e.args.update(action=a.kind, mb=a.mb, stage=a.stage)
            held = tracer.memory.current.get("activations", 0)
            peak = max(peak, held)
            if a.kind == "F" and not self.result.mb_activation_bytes:
                self.result.mb_activation_bytes = held - base
            self.result.records.append(ActionRecord(self.comm.rank, i, a, s0, tracer.sim_now, w0,
                                                    time.perf_counter(), held - base))
        for req in self.sends:
            req.wait()
        self.result.peak_activation_bytes = peak - base
        self._check_done()
        if self.sch.n_stages - 1 in self.stages:
            r = self.result
            r.loss = float(sum(r.mb_losses[mb] * self.targets[mb].size
                               for mb in range(self.sch.m)) / self.step_tokens)
        return self.result

    def _check_done(self) -> None:
        left = [k for k in self.ready] + [("loss", mb) for mb in self.loss_cache]
        held = {s: st.saved_keys() for s, st in self.stages.items() if st.saved_keys()}
        if left or held:
            raise RuntimeError(f"rank {self.comm.rank}: step ended with unconsumed data {left} "
                               f"and saved activations {held}")

    # ------------------------------------------------------------ compute
    def do_F(self, a: Action) -> None:
        st = self.stages[a.stage]
        x = self.inputs[a.mb] if a.stage == 0 else self.ready.pop(("F", a.mb, a.stage))
        y = st.forward(x, key=a.mb)
        self._clobber(x, a.stage == 0)
        if st.moe_layers():
            self.result.aux_losses[a.mb] = self.result.aux_losses.get(a.mb, 0.0) + \
                st.aux_loss(a.mb)
        if st.is_last:
            loss, cache = st.loss_forward(y, self.targets[a.mb])
            self.result.mb_losses[a.mb] = loss
            self.loss_cache[a.mb] = cache
            trace.alloc("activations", cache[0].nbytes)       # probabilities, until backward
        else:
            self.ready[("out", a.mb, a.stage)] = y
            if self.sch.rank_of(a.stage + 1) == self.comm.rank:   # next chunk is local
                self.ready[("F", a.mb, a.stage + 1)] = self.ready.pop(("out", a.mb, a.stage))

    def _output_grad(self, a: Action):
        st = self.stages[a.stage]
        if st.is_last:
            cache = self.loss_cache.pop(a.mb)
            trace.free("activations", cache[0].nbytes)
            # d(mean over all tokens)/d(mean over this micro-batch's tokens)
            share = self.targets[a.mb].size / self.total_tokens * self.loss_scale
            return st.loss_backward(cache, share), False
        return self.ready.pop(("B", a.mb, a.stage)), True

    def _route_input_grad(self, a: Action, dx) -> None:
        if a.stage == 0:
            return
        if self.sch.rank_of(a.stage - 1) == self.comm.rank:
            self.ready[("B", a.mb, a.stage - 1)] = dx
        else:
            self.ready[("dx", a.mb, a.stage)] = dx

    def do_B(self, a: Action) -> None:
        dy, received = self._output_grad(a)
        ready = self.grads_ready if self.last else None
        dx = self.stages[a.stage].backward(dy, key=a.mb, grads_ready=ready)
        self._clobber(dy, not received)
        self._route_input_grad(a, dx)

    def do_I(self, a: Action) -> None:
        dy, received = self._output_grad(a)
        dx = self.stages[a.stage].backward_input(dy, key=a.mb)
        self._clobber(dy, not received)
        self._route_input_grad(a, dx)

    def do_W(self, a: Action) -> None:
        ready = self.grads_ready if self.last else None
        self.stages[a.stage].backward_weights(key=a.mb, grads_ready=ready)

    def _clobber(self, buf, skip: bool) -> None:
        if self.clobber and not skip and isinstance(buf, np.ndarray) and buf.flags.writeable:
            buf.fill(np.nan)

    # ------------------------------------------------------ point-to-point
    def _shape(self, mb: int) -> tuple:
        return next(iter(self.stages.values())).message_shape(*self.inputs[mb].shape)

    def _tag(self, kind: str, mb: int, stage: int) -> int:
        return message_tag(kind, mb, stage, self.sch.n_stages)

    def do_SEND_F(self, a: Action) -> None:
        y = self.ready.pop(("out", a.mb, a.stage))
        self.sends.append(self.comm.isend(y, self.sch.rank_of(a.stage + 1),
                                          self._tag("F", a.mb, a.stage + 1)))

    def do_RECV_F(self, a: Action) -> None:
        self.ready[("F", a.mb, a.stage)] = self.comm.recv(
            self._shape(a.mb), self.dtype, self.sch.rank_of(a.stage - 1),
            self._tag("F", a.mb, a.stage))

    def do_SEND_B(self, a: Action) -> None:
        dx = self.ready.pop(("dx", a.mb, a.stage))
        self.sends.append(self.comm.isend(dx, self.sch.rank_of(a.stage - 1),
                                          self._tag("B", a.mb, a.stage - 1)))

    def do_RECV_B(self, a: Action) -> None:
        self.ready[("B", a.mb, a.stage)] = self.comm.recv(
            self._shape(a.mb), self.dtype, self.sch.rank_of(a.stage + 1),
            self._tag("B", a.mb, a.stage))
