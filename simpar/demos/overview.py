"""The main demo: a world of devices, one reference step, a collective benchmark.

    python -m simpar demo                    # 4 devices in one process (threads)
    mpiexec -n 4 python -m simpar demo       # 4 MPI processes

1. prints the device mesh of the world;
2. runs one step of the reference GPT on that mesh (tensor parallelism inside
   each dp replica, gradients summed over dp) and compares every gradient with
   the same step done by one device on the whole batch;
3. times ``all_reduce`` for a few message sizes (wall clock of this machine and
   the simulated clock of the chosen cluster);
4. draws the run as a timeline on both clocks and writes a Chrome trace.
"""
from __future__ import annotations

import os

import numpy as np

from .. import sim, testing, trace, viz
from ..comm import Comm, run
from ..experiments import demo_layout, gradient_errors
from .common import demo_parser, process_rank, start

# memory model (bytes): base, per device, per device² — every device also
# computes the single-device reference on the whole batch (measured: 1.7 GB at 16)
MEMORY = (150e6, 5e6, 6.5e6)


def collective_benchmark(comm: Comm, sizes=(4 << 10, 64 << 10, 1 << 20), reps: int = 5) -> list:
    rows = []
    for nbytes in sizes:
        x = np.ones(nbytes // 4, np.float32)
        comm.barrier()
        start_events = len(comm.tracer.events)
        for _ in range(reps):
            comm.all_reduce(x)
        evs = [e for e in comm.tracer.events[start_events:] if e.name == "all_reduce"]
        wall = float(np.median([e.wall_end - e.wall_start for e in evs]))
        simt = evs[-1].sim_end - evs[-1].sim_start
        rows.append((nbytes, wall, simt))
    return rows


def main_rank(comm: Comm) -> dict:
    cfg = demo_layout(comm.size)
    err = testing.worst_over_ranks(comm, gradient_errors(comm))   # NaN-aware, every rank
    step_events = list(comm.tracer.events)           # the timeline shows the step
    bench = collective_benchmark(comm)
    events = comm.gather_objects(step_events)
    return {"config": cfg, "err": err, "bench": bench, "events": viz.flatten(events),
            "backend": comm.backend}


def parser():
    return demo_parser("demo", __doc__)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cluster = sim.preset(args.cluster)
    start("simpar demo", args, MEMORY)
    results = run(main_rank, args.world_size, args.backend, cluster)
    me = results[0]
    if process_rank() != 0:
        return
    n = len(results)
    print(f"simpar demo: {n} devices, backend {me['backend']}, simulated cluster: {cluster.name}\n")
    print(me["config"].grid())
    worst = me["err"]
    c = me["config"]
    print(f"\n1. reference GPT step on the mesh above (dp={c.dp} x tp={c.tp}) vs one device "
          f"on the whole batch:\n   max relative gradient error {worst:.2e} "
          f"({testing.verdict(worst)}; float64)")
    print("\n2. all_reduce (float32), median of 5 calls")
    print(f"   {'size':>8} {'wall clock here':>16} {'simulated':>12}")
    for nbytes, wall, simt in me["bench"]:
        print(f"   {nbytes >> 10:>5} KiB {wall * 1e6:>13.1f} µs {simt * 1e6:>9.1f} µs")
    os.makedirs(args.out, exist_ok=True)
    png = viz.save(viz.timeline(me["events"], f"GPT step, dp={c.dp} x tp={c.tp}"),
                   os.path.join(args.out, "demo_timeline.png"))
    js = os.path.join(args.out, "demo_trace.json")
    trace.to_chrome(me["events"], js)
    print(f"\n3. wrote {png} (timeline, wall and simulated clocks)\n"
          f"   wrote {js} (open in https://ui.perfetto.dev or chrome://tracing)")


if __name__ == "__main__":
    main()
