"""Activation recomputation with pipelines and tensor/sequence parallelism: loss
and every gradient equal the run without recomputation bit for bit (threads and
MPI), and recomputation lowers the activation peak (full < selective < none;
under ZB-H1 only a little: the deferred W keeps each linear layer's input and
output gradient, recomputed or not)."""
from __future__ import annotations

import pytest

import simpar
from tests.mpi_util import run_mpi
from tests.parallel.recompute_checks import LAYOUTS, MODES, bit_equal, check_layout, run


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_recompute_bit_for_bit_threads(name):
    got = simpar.launch(lambda c: check_layout(c, name), LAYOUTS[name].world_size, timeout=120)
    for rank, res in enumerate(got):
        assert all(res[m][0] for m in MODES), (rank, res)
        peak = {m: res[m][1] for m in MODES}
        if "zb-h1" in name:     # W keeps every linear layer's input until it runs
            assert peak["full"] <= peak["none"] and peak["selective"] <= peak["none"], peak
        elif "cp" in name:      # blockwise attention keeps no scores: nothing to select
            assert peak["full"] < peak["selective"] == peak["none"], (rank, peak)
        else:
            assert peak["full"] < peak["selective"] < peak["none"], (rank, peak)


def test_negative_control_a_changed_recompute_is_caught(monkeypatch):
    """The bit-for-bit check is not blind: recomputing with a perturbed weight
    (one that differs from the forward's) changes the gradients."""
    from simpar.nn.module import Module
    name = "tp2+SPxpp2 1f1b"
    base = simpar.launch(lambda c: run(c, name, "none"), 4, timeout=120)
    orig = Module._recompute_forward

    def nudged(self, key, region, flops):
        p = next(iter(self.parameters().values()))
        p.flat[0] += 1e-3                              # the recompute sees another weight
        try:
            orig(self, key, region, flops)
        finally:
            p.flat[0] -= 1e-3
    monkeypatch.setattr(Module, "_recompute_forward", nudged)   # once, for every rank
    got = simpar.launch(lambda c: run(c, name, "full"), 4, timeout=120)
    assert [bit_equal(g, b) for g, b in zip(got, base)] == [False] * 4


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_recompute_bit_for_bit_mpi():
    names = [n for n in LAYOUTS if LAYOUTS[n].world_size == 4]
    out = run_mpi(4, "tests/parallel/scripts/recompute_mpi.py", *names, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln.split(" ", 5) for ln in out.stdout.splitlines() if ln.startswith("equal ")]
    assert sorted((ln[5], ln[1], ln[2]) for ln in lines) == sorted(
        (n, str(r), m) for n in names for r in range(4) for m in MODES), out.stdout + out.stderr
    assert all(ln[3] == "True" for ln in lines), lines


def test_train_recompute_same_losses_and_command_line():
    """``train(..., recompute=...)``: the same losses bit for bit (float64, tp2+SP x
    pp2); ``python -m simpar train --recompute full`` runs; an unknown mode is a
    clear error."""
    import numpy as np

    from simpar.comm.mesh import ParallelConfig
    from simpar.train import main, train
    small = dict(seq_len=16, n_layer=2, n_head=2, d_model=16)

    def job(comm, mode):
        return train(comm, ParallelConfig(tp=2, pp=2), steps=2, batch_size=4, micro_batches=2,
                     sequence_parallel=True, recompute=mode, model=small, dtype=np.float64,
                     log_every=0)["loss"]
    losses = {m: simpar.launch(lambda c, m=m: job(c, m), 4, timeout=60)[0] for m in MODES}
    assert losses["selective"] == losses["none"] == losses["full"], losses
    out = main(["--tp", "2", "--steps", "1", "--batch-size", "2", "--log-every", "0",
                "--recompute", "full", "--out", "out/test_recompute"])
    assert len(out["loss"]) == 1
    with pytest.raises(SystemExit):
        main(["--recompute", "half"])
