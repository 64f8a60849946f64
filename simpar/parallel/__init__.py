"""How the computation is cut across devices.

* :mod:`.tensor` — tensor (and sequence) parallelism, Megatron-LM style;
* :mod:`.pipeline` — pipeline schedules as data, a validator and an executor;
* :mod:`.expert` — expert parallelism for Mixture-of-Experts layers;
* :mod:`.data` — data parallelism (bucketed gradient sums, overlapped with the backward);
* :mod:`.zero` — ZeRO stages 1-3: optimizer state, gradients and parameters sharded;
* :mod:`.context` — context parallelism: ring attention and Ulysses;
* :mod:`.hybrid` — one mesh, one model: the paradigms composed.
"""
