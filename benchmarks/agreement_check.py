"""What the always-on checks of a collective cost (numbers for the README).

    python benchmarks/agreement_check.py            # threads, 4 ranks
    python benchmarks/agreement_check.py --quick    # fewer repeats, seconds

1. the work a collective does for its agreement check, alone: the call's
   fingerprint, packed with ``-h`` into the arrival record, and the comparison
   of every rank's ``h`` (min of many; the record is exchanged anyway, for the
   simulated clock, so the check adds no message);
2. the NaN flag of a max/min all-reduce (one ``x.max()`` pass) by message size;
3. one training step of the demo model (dp=2 x tp=2, ``simpar demo``'s
   ``build_model``): how many collectives it makes, its wall time, and the
   checks' share of it.
"""
from __future__ import annotations

import timeit

import numpy as np

import simpar
from simpar.comm.base import _HEAD_STRUCT, _RECORD, Comm


def per_call_check_seconds(n: int = 20000) -> float:
    x = np.ones(8)
    sig = ("all_reduce", 0, x.dtype, x.shape)
    record, head = np.zeros(_RECORD), _HEAD_STRUCT
    table = np.zeros((4, _RECORD))

    def check():
        h = Comm._fingerprint(sig)
        head.pack_into(record, 0, 0.5, 64.0, 0.0, h, -h)
        hs = [head.unpack_from(table, 8 * _RECORD * r)[3] for r in range(4)]
        return min(hs) != max(hs)

    def clock_only():
        head.pack_into(record, 0, 0.5, 64.0, 0.0, 0.0, 0.0)
        ts = [head.unpack_from(table, 8 * _RECORD * r)[0] for r in range(4)]
        return max(ts)
    t_check = min(timeit.repeat(check, number=n, repeat=7)) / n
    t_clock = min(timeit.repeat(clock_only, number=n, repeat=7)) / n
    return t_check - t_clock


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
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats: seconds, no target")
    args = ap.parse_args()
    check = per_call_check_seconds(2000 if args.quick else 20000)
    print(f"agreement check, per collective call: {check * 1e6:.2f} µs "
          "(fingerprint, -h, comparing every rank's h; no extra message)")
    for nbytes in (64 << 10, 1 << 20):                 # (up to 1 KiB: inline, no flag)
        print(f"NaN flag of a max/min all-reduce, {nbytes:>8} B: "
              f"{nan_flag_seconds(nbytes) * 1e6:.2f} µs")
    step, n = simpar.launch(demo_step, 4)[0]
    print(f"demo step (dp=2 x tp=2, threads): {step * 1e3:.1f} ms, {n} collectives per rank; "
          f"checks {n * check * 1e6:.0f} µs = {100 * n * check / step:.3f} % of the step "
          "(target < 1 %)")


if __name__ == "__main__":
    main()
