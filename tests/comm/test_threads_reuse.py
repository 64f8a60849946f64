"""Threads backend: a collective must finish reading its peers' inputs before
any rank may return (and overwrite its input in place)."""
import threading
import time

import numpy as np
import pytest

from simpar import launch
from simpar.comm import threads


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "broadcast", "all_to_all"])
def test_inputs_reused_right_after_collective(kind, monkeypatch):
    orig = threads._Group.wait

    def slow_rank0_wait(self, *args):        # rank 0 leaves every barrier late
        orig(self, *args)
        if threading.current_thread().name == "simpar-rank0":
            time.sleep(0.05)
    monkeypatch.setattr(threads._Group, "wait", slow_rank0_wait)

    def fn(comm):
        x = np.full(4, float(comm.rank + 1))
        if kind == "all_gather":
            got, want = comm.all_gather(x), np.repeat([1.0, 2.0], 4)
        elif kind == "reduce_scatter":
            got, want = comm.reduce_scatter(x), np.full(2, 3.0)
        elif kind == "broadcast":
            got, want = comm.broadcast(x, root=1), np.full(4, 2.0)
        else:
            got, want = comm.all_to_all(x, [2, 2])[0], np.repeat([1.0, 2.0], 2)
        x.fill(-100.0)                        # the caller reuses its buffer at once
        np.testing.assert_array_equal(got, want)
    launch(fn, 2, timeout=30)
