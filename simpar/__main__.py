"""The ``simpar`` command line.

    python -m simpar demo [--world-size N] [--cluster a100|h100|ideal|this-machine]
    python -m simpar tensor | pipeline | expert   # one demo per paradigm
    python -m simpar train [--steps N]            # reference single-device training
    mpiexec -n 4 python -m simpar demo            # any demo, one process per device
"""
from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("simpar.demos.overview", "mesh, reference step across devices, collectives, timeline"),
    "tensor": ("simpar.demos.tensor_parallel", "tensor + sequence parallelism vs the reference"),
    "pipeline": ("simpar.demos.pipeline_parallel", "pipeline schedules, bubbles, equivalence"),
    "expert": ("simpar.demos.expert_parallel", "Mixture-of-Experts routing and all-to-all"),
    "zero": ("simpar.demos.zero", "ZeRO stages 0-3: memory per rank and bytes per step"),
    "memory": ("simpar.demos.memory", "activation recomputation and mixed precision: memory, loss"),
    "context": ("simpar.demos.context_parallel", "context parallelism: ring attention overlap "
                "and balance, ring vs Ulysses"),
    "figures": ("simpar.demos.figures", "regenerate the committed figures/ (demos write ./out)"),
    "train": ("simpar.train", "train a GPT on the shipped corpus on any dp x tp x pp (x ep) layout"),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<9} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"\nunknown command {argv[0]!r}")
        return
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
