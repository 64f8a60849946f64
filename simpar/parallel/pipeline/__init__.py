"""Pipeline parallelism: schedules as data, a validator, stages and an executor.

A model cut into ``p`` stages (Huang et al. 2019, §2), a batch into ``m``
micro-batches whose gradients are summed before one optimizer step, so the step
equals the unsplit batch; with equal stages each rank idles
``(p−1)/m`` of its compute time (GPipe, 1F1B: Narayanan et al. 2021, §2.2.1),
``(p−1)/(v·m)`` interleaved (§2.2.2), and ZB-H1 moves weight gradients ``W`` into
the bubble: ``(p−1)(T_F + T_I − T_W)`` (Qi et al. 2023, Table 2).

Read in this order:

* :mod:`.schedules` — ``Action`` (``F``, ``B``, ``I``, ``W``, ``SEND_*``/``RECV_*``),
  the generators ``naive``, ``gpipe``, ``one_f_one_b``, ``interleaved_one_f_one_b``,
  ``zero_bubble_h1`` (plain data; imports nothing of the package);
* :mod:`.validate` — ``validate`` / ``simulate``: deadlock freedom, causality and
  timing of a schedule without a model; ``format_schedule`` (the "0F1" grid);
* :mod:`.stage` — ``partition`` a GPT into stages, ``PipelineStage``;
* :mod:`.executor` — ``run_schedule``: one rank dispatching its actions;
* :mod:`.timeline` — bubbles, per-stage times, critical path, schedule pictures.

A whole step in a few lines (every rank)::

    model = GPT(cfg, seed=0)                        # same weights on every rank
    sch = one_f_one_b(p=comm.size, m=8)
    stages = stages_for_rank(model, sch, comm.rank)  # {stage: PipelineStage} of this rank
    result = run_schedule(comm, sch, stages, inputs, targets)
"""
from .executor import ActionRecord, StepResult, run_schedule
from .schedules import (SCHEDULES, Action, Schedule, gpipe, interleaved_one_f_one_b,
                        make_schedule, naive, one_f_one_b, zero_bubble_h1)
from .stage import PipelineStage, build_stages, partition, stages_for_rank
from .timeline import critical_path, draw_pipeline, gather_records, stage_times, summarize
from .validate import ScheduleError, SimResult, format_schedule, simulate, validate

__all__ = [
    "Action", "Schedule", "SCHEDULES", "make_schedule", "format_schedule",
    "naive", "gpipe", "one_f_one_b", "interleaved_one_f_one_b", "zero_bubble_h1",
    "validate", "simulate", "ScheduleError", "SimResult",
    "partition", "PipelineStage", "build_stages", "stages_for_rank",
    "run_schedule", "StepResult", "ActionRecord",
    "gather_records", "summarize", "stage_times", "critical_path", "draw_pipeline",
]

