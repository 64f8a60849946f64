"""One training step of the reference GPT in float32 on one BLAS thread.

    python benchmarks/reference_step.py [--steps 5] [--profile]
    python benchmarks/reference_step.py --quick     # a tiny model, one step: a smoke test
    python benchmarks/reference_step.py --compare [REV]   # new / old kernels, one run

Measures forward + backward + AdamW of the reference model (h=512, s=256, b=8,
4 layers, 8 heads, vocab 65) and compares its model FLOP/s (3 × forward matmul
FLOPs / step time) with a plain NumPy float32 matmul of comparable size measured in
the same run.  The ratio says how much of the machine's matmul speed the
hand-written NumPy model keeps (target ≥ 0.60).

``--compare REV`` times today's kernels against those of ``simpar/nn/functional.py``
at git revision ``REV`` (default: the last commit before the plain-math split), in
one run: the old functions are loaded side by side and swapped in for the models'
kernels on alternate steps, and the ratio of median step times new/old is printed
(target ≤ 1.02).
"""
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"     # before NumPy is imported
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
if "--no-tune-malloc" in os.sys.argv:           # import simpar tunes malloc unless told not to
    os.environ["SIMPAR_TUNE_MALLOC"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import simpar  # noqa: E402
from simpar.nn import GPT, GPTConfig  # noqa: E402
from simpar.nn import functional as F  # noqa: E402
from simpar.nn import kernels as K  # noqa: E402
from simpar.optim import AdamW  # noqa: E402

OLD_REV = "04a1a98"        # functional.py before the plain-math / kernels split
CONFIG = GPTConfig(vocab_size=65, seq_len=256, n_layer=4, n_head=8, d_model=512)
BATCH = 8
QUICK_CONFIG = GPTConfig(vocab_size=65, seq_len=16, n_layer=1, n_head=2, d_model=32)
QUICK_BATCH = 2


class MatmulProbe:
    """FLOP/s of a plain (2048×512) @ (512×2048) float32 product."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((2048, 512), dtype=np.float32)
        self.b = rng.standard_normal((512, 2048), dtype=np.float32)
        self.out = np.empty((2048, 2048), np.float32)
        np.matmul(self.a, self.b, out=self.out)

    def __call__(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(self.a, self.b, out=self.out)
            times.append(time.perf_counter() - t0)
        return 2.0 * 2048 * 512 * 2048 / float(np.median(times))


def make_step(config: GPTConfig = CONFIG, batch: int = BATCH):
    model = GPT(config, seed=0, dtype=np.float32)
    opt = AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, config.vocab_size, size=(batch, config.seq_len))
    tgt = rng.integers(0, config.vocab_size, size=(batch, config.seq_len))

    def step() -> float:
        model.zero_grad()
        loss = model.loss(idx, tgt)
        opt.step(model.gradients())
        return loss

    return model, step


# ------------------------------------------------------------ new / old kernels
KERNEL_OF = {"gelu_fast": "gelu", "gelu_backward_fast": "gelu_backward",
             "layernorm_forward_fast": "layernorm_forward",
             "layernorm_backward_fast": "layernorm_backward",
             "attention_forward_fast": "causal_attention_forward",
             "attention_backward_fast": "causal_attention_backward"}


def load_old_functional(rev: str) -> types.ModuleType:
    """``simpar/nn/functional.py`` as it was at git revision ``rev``, as a module."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    src = subprocess.run(["git", "-C", root, "show", f"{rev}:simpar/nn/functional.py"],
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("old_functional")
    mod.__package__ = "simpar.nn"
    exec(compile(src, f"{rev}:simpar/nn/functional.py", "exec"), mod.__dict__)
    return mod


@contextlib.contextmanager
def old_kernels(old: types.ModuleType):
    """Swap the old functions in for today's kernels and plain functions."""
    swaps = [(K, new, getattr(old, name)) for new, name in KERNEL_OF.items()]
    swaps += [(F, name, getattr(old, name)) for name in old.__all__ if hasattr(F, name)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in swaps]
    try:
        for mod, name, fn in swaps:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _timed(step) -> tuple[float, float, float]:
    """(loss, wall seconds, CPU seconds) of one step."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    return loss, time.perf_counter() - t0, time.process_time() - c0


def compare(rev: str, steps: int) -> None:
    """Median step time with today's kernels over the old ones, alternating steps.
    Wall and CPU time are both reported: on a shared machine the CPU time of this
    one-thread process is the steadier of the two."""
    old = load_old_functional(rev)
    _, new_step = make_step()
    _, old_step = make_step()
    new_step()
    with old_kernels(old):
        old_step()                                    # warm-up both
    runs = {"new": [], "old": []}
    for _ in range(steps):
        runs["new"].append(_timed(new_step))
        with old_kernels(old):
            runs["old"].append(_timed(old_step))
    print(f"reference GPT step, new kernels vs functional.py at {rev} ({steps} steps each, "
          f"alternating)")
    med = {}
    for name, rs in runs.items():
        med[name] = [float(np.median([r[i] for r in rs])) for i in (1, 2)]
        print(f"{name}  wall {med[name][0] * 1e3:7.1f} ms  cpu {med[name][1] * 1e3:7.1f} ms  ("
              + ", ".join(f"{r[1] * 1e3:.0f}" for r in rs) + f"); loss {rs[-1][0]:.6f}")
    print(f"ratio new/old  wall {med['new'][0] / med['old'][0]:.3f}  "
          f"cpu {med['new'][1] / med['old'][1]:.3f}   (target <= 1.02)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile summary")
    ap.add_argument("--no-tune-malloc", dest="tune", action="store_false",
                    help="keep glibc's default allocator thresholds")
    ap.add_argument("--compare", nargs="?", const=OLD_REV, metavar="REV",
                    help=f"time new vs old kernels in one run (default REV {OLD_REV})")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model (h=32, s=16, 1 layer), one step: seconds, no target")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare, max(args.steps, 3))
        return
    config, batch = (QUICK_CONFIG, QUICK_BATCH) if args.quick else (CONFIG, BATCH)
    if args.quick:
        args.steps = 1

    tuned = simpar.runtime._tuned
    model, step = make_step(config, batch)
    probe = MatmulProbe()
    b, s = batch, config.seq_len
    step_flops = 3.0 * model.flops(b, s)
    loss0 = step()                                    # warm-up
    times, cpu, mms = [], [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        mms.append(probe())                           # same load as the step just seen
    t = float(np.median(times))
    mm = float(np.median(mms))
    model_fs = step_flops / t

    print(f"reference GPT step, float32, 1 BLAS thread: h={config.d_model} s={s} b={b} "
          f"layers={config.n_layer} heads={config.n_head} vocab={config.vocab_size} "
          f"({model.num_parameters() / 1e6:.2f} M parameters)")
    print(f"allocator            {'glibc thresholds raised (mallopt)' if tuned else 'defaults'}")
    print(f"loss                 {loss0:.4f} -> {loss:.4f}")
    print(f"step time (median)   {t * 1e3:.1f} ms   (steps: "
          + ", ".join(f"{x * 1e3:.0f}" for x in times) + ")")
    print(f"model FLOPs / step   {step_flops / 1e9:.2f} GFLOP (3 x forward matmul FLOPs)")
    print(f"model FLOP/s         {model_fs / 1e9:.1f} GFLOP/s")
    print(f"plain matmul FLOP/s  {mm / 1e9:.1f} GFLOP/s  ((2048x512) @ (512x2048) float32)")
    print(f"ratio                {model_fs / mm:.3f}   (target >= 0.60)")
    print(f"(CPU time per step   {float(np.median(cpu)) * 1e3:.1f} ms: wall and CPU differ when "
          f"other processes share the cores)")

    if args.profile:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        print(f"\ncProfile (CPU time) over {args.steps} steps, top 15 by tottime:")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
