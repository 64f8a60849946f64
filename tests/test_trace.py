"""Tracer, memory ledger, Chrome-trace export and the timeline figure."""
import json

import numpy as np
import pytest

from simpar import launch, sim, trace, viz


def _run(comm):
    t = comm.tracer
    with trace.compute("matmul", flops=2e12):
        np.ones((8, 8)) @ np.ones((8, 8))
    comm.all_reduce(np.ones(1024))
    trace.alloc("activations", 4096)
    trace.alloc("params", 100)
    trace.free("activations", 4096)
    return t


def test_events_and_clocks():
    tracers = launch(_run, 2, cluster=sim.a100_cluster())
    for t in tracers:
        comp, comm = t.select("compute")[0], t.select("comm")[0]
        assert comp.flops == 2e12
        assert comp.sim_end - comp.sim_start == 2e12 / sim.A100.flops
        assert comm.name == "all_reduce" and comm.nbytes == 8192 and comm.group == "world"
        assert comm.sim_start == comp.sim_end
        assert comm.sim_end == comm.sim_start + sim.collective_time(
            "all_reduce", 8192, 2, sim.NVLINK3)
        assert comm.wall_end >= comm.wall_start >= comp.wall_end
        m = t.memory.summary()
        assert m["current"] == {"activations": 0, "params": 100}
        assert m["peak"]["activations"] == 4096 and m["peak_total"] == 4196


def test_ledger_rejects_over_free():
    led = trace.MemoryLedger()
    led.alloc("grads", 10)
    with pytest.raises(RuntimeError, match="grads"):
        led.free("grads", 11)


def test_no_tracer_is_a_no_op():
    trace.activate(None)
    with trace.compute("x", flops=1):
        pass
    trace.alloc("params", 5)       # nothing to record into, nothing raised


def test_chrome_trace_is_valid(tmp_path):
    tracers = launch(_run, 3)
    events = viz.flatten([t.events for t in tracers])
    path = tmp_path / "trace.json"
    trace.to_chrome(events, str(path))
    doc = json.loads(path.read_text())
    evs = doc["traceEvents"]
    complete = [e for e in evs if e["ph"] == "X"]
    assert len(complete) == 2 * len(events)          # one per clock
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert e["dur"] >= 0 and e["ts"] >= 0 and e["pid"] in (0, 1) and e["tid"] in (0, 1, 2)
    names = {(e["pid"], e["args"]["name"]) for e in evs if e["ph"] == "M"}
    assert (0, "wall clock") in names and (1, "simulated clock") in names


def test_timeline_figure(tmp_path):
    tracers = launch(_run, 2)
    fig = viz.timeline(viz.flatten([t.events for t in tracers]), "test")
    path = viz.save(fig, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000 and path.endswith("t.png")


def test_presets():
    assert sim.preset("a100").device.flops == 312e12
    assert sim.preset("h100").device.flops == 989e12
    assert sim.preset("a100").intra.bandwidth == pytest.approx(600e9)
    assert sim.preset("a100").inter.bandwidth == pytest.approx(25e9)   # 200 Gb/s
    here = sim.preset("this-machine")
    assert here.device.flops > 1e8 and here.intra.beta > 0
    with pytest.raises(ValueError, match="'tpu'"):
        sim.preset("tpu")


def test_cluster_link_choice():
    c = sim.a100_cluster(devices_per_node=4)
    assert c.link([0, 3]) is sim.NVLINK3
    assert c.link([3, 4]) is sim.IB_HDR


def test_collective_cost_formulas():
    link = sim.LinkSpec("l", 1e-6, 1e-9)
    n, p = 1 << 20, 4
    assert sim.collective_time("all_reduce", n, p, link) == 2 * 3 * 1e-6 + 2 * n * 3 / 4 * 1e-9
    assert sim.collective_time("all_gather", n, p, link) == 3 * 1e-6 + n * 3 / 4 * 1e-9
    assert sim.collective_time("all_to_all", n, 1, link) == 0.0
    with pytest.raises(ValueError, match="'gossip'"):
        sim.collective_time("gossip", n, p, link)
