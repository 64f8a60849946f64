"""One runnable demo per paradigm: ``python -m simpar <command>`` (``python -m
simpar --help`` lists them).  A demo is a short script: it composes the
experiments of :mod:`simpar.experiments`, prints, and draws with
:mod:`simpar.viz`.  ``demo``, ``tensor``, ``pipeline`` and ``expert`` also run
under ``mpiexec -n 4``; the others start threads worlds of their own sizes.

* :mod:`.overview` — the main demo (``python -m simpar demo``): mesh, a
  reference step checked across devices, a collective benchmark, timelines;
* :mod:`.tensor_parallel` — Megatron-LM tensor and sequence parallelism;
* :mod:`.pipeline_parallel` — schedules, bubbles and the executor;
* :mod:`.expert_parallel` — Mixture-of-Experts routing, all-to-all, load balance;
* :mod:`.hybrid` — every hybrid layout trains the same model (``hybrid_loss.png``);
* :mod:`.zero` — ZeRO stages 0-3: ledger bytes per rank and bytes per step against
  ZeRO §5 and §7 (``python -m simpar zero``, ``zero_memory.png``);
* :mod:`.memory` — activation recomputation against Korthikanti Table 2 and mixed
  precision's losses and bytes (``python -m simpar memory``,
  ``activation_memory.png``, ``mixed_precision_loss.png``);
* :mod:`.context_parallel` — ring attention and Ulysses (``python -m simpar context``);
* :mod:`.figures` — ``python -m simpar figures``; :mod:`.notebooks` — ``python -m
  simpar notebooks``;
* :mod:`.common` — the options every demo shares.
"""
