"""Bucketed (coalesced) all-reduce: one call, same sums as one call per array."""
import numpy as np
import pytest

from simpar import launch
from simpar.parallel.data import all_reduce_coalesced


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [1, 2, 3])
def test_coalesced_equals_separate(size):
    shapes = [(3, 4), (5,), (2, 1, 3), ()]

    def arrays_of(rank):
        rng = np.random.default_rng(rank)
        return [rng.standard_normal(s) for s in shapes]

    def fn(comm):
        mine = arrays_of(comm.rank)
        everyone = [arrays_of(r) for r in range(size)]
        want = [sum(a[i] for a in everyone) for i in range(len(shapes))]
        all_reduce_coalesced(mine, comm)
        assert len(comm.tracer.select("comm", name="all_reduce")) == 1      # one bucket
        return mine, want
    for mine, want in launch(fn, size, timeout=20):
        for got, w in zip(mine, want):
            np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_rejected():
    def fn(comm):
        all_reduce_coalesced([np.zeros(2), np.zeros(2, np.float32)], comm)
    with pytest.raises(TypeError, match="float32"):
        launch(fn, 2, timeout=20)
