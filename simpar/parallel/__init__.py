"""How the computation is cut across devices — each module the equation it keeps exact:

* :mod:`.tensor` — tensor (and sequence) parallelism: ``X [A₁, A₂] = [X A₁, X A₂]``
  and ``[X₁, X₂] [A₁; A₂] = X₁A₁ + X₂A₂`` (Shoeybi et al. 2019, §3; Korthikanti et
  al. 2022, §4.2.2);
* :mod:`.pipeline` — stages over ``p`` ranks, ``m`` micro-batches, gradients
  accumulated; bubble ``(p−1)/m`` of the compute for 1F1B (Narayanan et al. 2021,
  §2.2; Huang et al. 2019, §2; zero bubble: Qi et al. 2023);
* :mod:`.expert` — ``Σ_{i∈top-k} gᵢ(x) Eᵢ(x)`` with the experts over ``ep`` ranks
  and two all-to-alls (Fedus et al. 2021, §2; Lepikhin et al. 2020);
* :mod:`.data` — ``∇L = Σ_r ∇L_r`` with the loss over the global token count
  (bucketed sums, overlapped with the backward);
* :mod:`.zero` — the same sum, sharded: ``(2 + 2 + K)Ψ`` → ``4Ψ + KΨ/N`` → … →
  ``(4 + K)Ψ/N`` bytes per device (Rajbhandari et al. 2020, §5);
* :mod:`.context` — attention of ``s/cp`` queries against every key block, merged
  by the online softmax (ring: Liu et al. 2023; Ulysses: Jacobs et al. 2023);
* :mod:`.hybrid` — one mesh, one model: world = ``dp·cp·tp·pp`` (Narayanan et al.
  2021, §3).
"""
