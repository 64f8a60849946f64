"""How the computation is cut across devices.

* :mod:`.tensor` — tensor (and sequence) parallelism, Megatron-LM style;
* :mod:`.pipeline` — pipeline schedules as data, a validator and an executor;
* :mod:`.expert` — expert parallelism for Mixture-of-Experts layers;
* :mod:`.data` — data parallelism (bucketed gradient sums, overlapped with the backward).
"""
