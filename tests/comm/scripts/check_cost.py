"""What the always-on checks of a collective cost (numbers for the README).

    python tests/comm/scripts/check_cost.py            # threads, 4 ranks

1. the work a collective does for its agreement check, alone: the call's
   fingerprint and the 5-number arrival vector instead of 2 (min of many);
2. the NaN flag of a max/min all-reduce (one ``x.max()`` pass) by message size;
3. one training step of the demo model (dp=2 x tp=2, ``simpar demo``'s
   ``build_model``): how many collectives it makes, its wall time, and the
   checks' share of it.
"""
from __future__ import annotations

import timeit

import numpy as np

import simpar
from simpar.comm.base import Comm


def per_call_check_seconds() -> float:
    x = np.ones(8)
    sig = ("all_reduce", 0, x.dtype, x.shape)

    def new():
        h = float(Comm._fingerprint(sig))
        r = np.array([0.5, 64.0, 0.0, h, -h])
        return r[3] != -r[4]

    def old():
        return np.array([0.5, 64.0])
    n = 20000
    t_new = min(timeit.repeat(new, number=n, repeat=7)) / n
    t_old = min(timeit.repeat(old, number=n, repeat=7)) / n
    return t_new - t_old


def nan_flag_seconds(nbytes: int) -> float:
    x = np.ones(nbytes // 8)
    n = max(10, 200000 // max(nbytes // 8, 1))
    return min(timeit.repeat(lambda: bool(np.isnan(x.max())), number=n, repeat=7)) / n


def demo_step(comm):
    from simpar.comm.mesh import Mesh, ParallelConfig
    from simpar.data import CharTokenizer, get_batch, load_corpus
    from simpar.nn import GPT, GPTConfig
    from simpar.parallel.hybrid import build_model
    text = load_corpus()
    tok = CharTokenizer(text)
    cfg = GPTConfig(tok.vocab_size, 64, n_layer=2, n_head=4, d_model=128)
    x, y = get_batch(tok.encode(text), 2 * comm.size, 64, np.random.default_rng(0))
    model = build_model(GPT(cfg, seed=0), Mesh(comm, ParallelConfig(dp=2, tp=2)))
    model.step(x, y)                                    # warm up
    model.zero_grad()
    import time
    best, n_coll = 1e9, 0
    for _ in range(5):
        comm.barrier()
        start = len(comm.tracer.events)
        model.zero_grad()
        t0 = time.perf_counter()
        model.step(x, y)
        best = min(best, time.perf_counter() - t0)
        n_coll = sum(1 for e in comm.tracer.events[start:]
                     if e.category == "comm" and e.name not in ("send", "recv"))
    return best, n_coll


def main() -> None:
    check = per_call_check_seconds()
    print(f"agreement check, per collective call: {check * 1e6:.2f} µs "
          "(fingerprint + 3 more numbers in the arrival exchange; no extra message)")
    for nbytes in (64, 64 << 10, 1 << 20):
        print(f"NaN flag of a max/min all-reduce, {nbytes:>8} B: "
              f"{nan_flag_seconds(nbytes) * 1e6:.2f} µs")
    step, n = simpar.launch(demo_step, 4)[0]
    print(f"demo step (dp=2 x tp=2, threads): {step * 1e3:.1f} ms, {n} collectives per rank; "
          f"checks {n * check * 1e6:.0f} µs = {100 * n * check / step:.3f} % of the step")


if __name__ == "__main__":
    main()
