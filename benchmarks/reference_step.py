"""One training step of the reference GPT in float32 on one BLAS thread.

    python benchmarks/reference_step.py [--steps 5] [--profile]
    python benchmarks/reference_step.py --quick     # a tiny model, one step: a smoke test
    python benchmarks/reference_step.py --compare [REV]   # new / old kernels, one run
    python benchmarks/reference_step.py --torch      # the same step in PyTorch eager, one run

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

``--torch`` runs the same step — same shapes, weights, dtype (float32 and float64),
one thread — in PyTorch eager (``torch.nn.functional``: layer_norm, a fused causal
``scaled_dot_product_attention``, tanh GELU, cross_entropy; ``torch.optim.AdamW``),
checks that both give the same loss, and prints PyTorch's step time over simpar's
(target ≥ 1.0: simpar at least as fast).  PyTorch is optional (``pip install
'simpar[bench]'``); without it the benchmark says so and skips the comparison.
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


def make_step(config: GPTConfig = CONFIG, batch: int = BATCH, dtype=np.float32):
    model = GPT(config, seed=0, dtype=dtype)
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


# ------------------------------------------------------------ PyTorch side by side
def torch_step(model: GPT, idx: np.ndarray, tgt: np.ndarray, lr: float, wd: float):
    """The reference GPT's training step written in PyTorch eager, with ``model``'s
    weights and dtype; returns ``step() -> loss``."""
    import torch
    import torch.nn.functional as TF
    c = model.config
    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(p.values(), lr=lr, weight_decay=wd)
    x_ids, y_ids = torch.tensor(idx), torch.tensor(tgt).reshape(-1)
    b, s, h, nh = *idx.shape, c.d_model, c.n_head

    def ln(x, name):
        return TF.layer_norm(x, (h,), p[name + ".gamma"], p[name + ".beta"], 1e-5)

    def heads(t):                                  # (b, s, h) -> (b, nh, s, h/nh)
        return t.view(b, s, nh, h // nh).transpose(1, 2)

    def forward():
        x = p["wte"][x_ids] + p["wpe"][:s]
        for i in range(c.n_layer):
            blk = f"blocks.{i}."
            q, k, v = (ln(x, blk + "ln1") @ p[blk + "attn.qkv.W"]
                       + p[blk + "attn.qkv.b"]).split(h, dim=-1)
            a = TF.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
            x = x + a.transpose(1, 2).reshape(b, s, h) @ p[blk + "attn.proj.W"] \
                + p[blk + "attn.proj.b"]
            f = TF.gelu(ln(x, blk + "ln2") @ p[blk + "mlp.fc1.W"] + p[blk + "mlp.fc1.b"],
                        approximate="tanh")
            x = x + f @ p[blk + "mlp.fc2.W"] + p[blk + "mlp.fc2.b"]
        return ln(x, "ln_f") @ p["lm_head.W"]

    def step() -> float:
        opt.zero_grad(set_to_none=False)
        loss = TF.cross_entropy(forward().reshape(b * s, -1), y_ids)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def versus_torch(steps: int, config: GPTConfig = CONFIG, batch: int = BATCH) -> None:
    """simpar's and PyTorch's step, alternating, float32 and float64, one thread."""
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: pip install 'simpar[bench]' (or torch) to compare")
        return
    torch.set_num_threads(1)
    print(f"PyTorch {torch.__version__} eager vs simpar, one thread, h={config.d_model} "
          f"s={config.seq_len} b={batch} layers={config.n_layer}, median of {steps} steps")
    for dtype in (np.float32, np.float64):
        model, ours = make_step(config, batch, dtype)
        rng = np.random.default_rng(1)
        idx = rng.integers(0, config.vocab_size, size=(batch, config.seq_len))
        tgt = rng.integers(0, config.vocab_size, size=(batch, config.seq_len))
        theirs = torch_step(model, idx, tgt, lr=3e-4, wd=0.01)
        first = (ours(), theirs())                   # warm-up; the same weights and batch
        runs = {"simpar": [], "torch": []}
        for _ in range(steps):
            runs["simpar"].append(_timed(ours))
            runs["torch"].append(_timed(theirs))
        med = {k: float(np.median([r[1] for r in v])) for k, v in runs.items()}
        last = (runs["simpar"][-1][0], runs["torch"][-1][0])
        tol = 1e-4 if dtype == np.float32 else 1e-10
        same = all(abs(a - b) <= tol * abs(b) for a, b in (first, last))
        print(f"  {np.dtype(dtype).name:8s} loss simpar {first[0]:.6f} -> {last[0]:.6f}, torch "
              f"{first[1]:.6f} -> {last[1]:.6f} ({'same' if same else 'DIFFERENT'})")
        print(f"  {'':8s} "
              f"step simpar {med['simpar'] * 1e3:7.1f} ms  torch {med['torch'] * 1e3:7.1f} ms  "
              f"torch/simpar {med['torch'] / med['simpar']:.2f}  (target >= 1.0)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile summary")
    ap.add_argument("--no-tune-malloc", dest="tune", action="store_false",
                    help="keep glibc's default allocator thresholds")
    ap.add_argument("--compare", nargs="?", const=OLD_REV, metavar="REV",
                    help=f"time new vs old kernels in one run (default REV {OLD_REV})")
    ap.add_argument("--torch", action="store_true",
                    help="the same step in PyTorch eager (if installed), float32 and float64")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model (h=32, s=16, 1 layer), one step: seconds, no target")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare, max(args.steps, 3))
        return
    config, batch = (QUICK_CONFIG, QUICK_BATCH) if args.quick else (CONFIG, BATCH)
    if args.quick:
        args.steps = 1
    if args.torch:
        versus_torch(max(args.steps, 1), config, batch)
        return

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
