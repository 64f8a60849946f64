"""Training any layout: the global batch makes every dense layout train the same
model on the same data, so its losses equal the single-device reference run."""
import re

import numpy as np
import pytest

import simpar
from simpar.comm.mesh import ParallelConfig
from simpar.testing import TOL, rel_error
from simpar.train import main, train, train_reference
from tests.mpi_util import run_mpi

SMALL = dict(steps=4, batch_size=8, lr=5e-3, dtype=np.float64, warmup=2)
MODEL = dict(seq_len=16, n_layer=2, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def reference_losses():
    out = train_reference(config=dict(MODEL), eval_batches=0, **SMALL)
    return np.array(out["loss"])


@pytest.mark.parametrize("layout,opts", [
    (ParallelConfig(), {}),
    (ParallelConfig(dp=2, tp=2), {}),
    (ParallelConfig(dp=2, pp=2), {"micro_batches": 2}),
    (ParallelConfig(tp=2, pp=2), {"micro_batches": 4, "sequence_parallel": True}),
    (ParallelConfig(dp=2, pp=2), {"micro_batches": 2, "overlap": True, "bucket_bytes": 4096}),
], ids=["1 device", "dp2xtp2", "dp2xpp2", "tp2+SPxpp2", "dp2xpp2 overlap"])
def test_every_layout_trains_like_the_reference(layout, opts, reference_losses):
    out = simpar.launch(lambda comm: train(comm, layout, model=MODEL, **SMALL, **opts),
                        layout.world_size, timeout=120)
    losses = np.array(out[0]["loss"])
    assert rel_error(losses, reference_losses) <= TOL
    assert all(np.array_equal(o["loss"], losses) for o in out)        # every rank
    assert all(s > 0 for s in out[0]["sim_step"])


def test_moe_layout_trains():
    layout = ParallelConfig(dp=2, ep=2)
    out = simpar.launch(lambda comm: train(comm, layout, model=MODEL, moe_experts=4, moe_k=2,
                                           **SMALL), 2, timeout=120)
    assert np.isfinite(out[0]["loss"]).all() and out[0]["loss"][-1] < out[0]["loss"][0]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="micro_batches=0"):
        train(None, ParallelConfig(), micro_batches=0)
    with pytest.raises(ValueError, match="batch_size=6 .* dp=4"):
        train(None, ParallelConfig(dp=4), batch_size=6)


def test_command_line_threads(tmp_path, capsys):
    out = main(["--dp", "2", "--pp", "2", "--micro-batches", "2", "--steps", "3",
                "--log-every", "1", "--float64", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "dp2 tp1 pp2 ep1: final loss" in printed and "simulated step" in printed
    assert (tmp_path / "train_loss.png").exists() and (tmp_path / "train_timeline.png").exists()
    assert len(out["loss"]) == 3


def test_command_line_mpi_prints_the_threads_losses(tmp_path):
    args = ["--dp", "2", "--tp", "2", "--steps", "3", "--log-every", "1", "--float64"]
    threads = main(args + ["--out", str(tmp_path / "t")])["loss"]
    res = run_mpi(4, "-m", "simpar", "train", *args, "--out", str(tmp_path / "m"), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    printed = [float(x) for x in re.findall(r"\| loss (\d+\.\d+) \|", res.stdout)]
    assert printed == [round(x, 4) for x in threads], res.stdout


def _disagree(comm, **per_rank):
    """train() on dp=2 where each rank passes its own value of some options."""
    mine = {k: v[comm.rank] for k, v in per_rank.items()}
    return train(comm, ParallelConfig(dp=2), model=MODEL, **{**SMALL, **mine})


@pytest.mark.parametrize("options,shown", [
    ({"warmup": (2, 3)}, ("warmup=2", "warmup=3")),
    ({"grad_clip": (1.0, None)}, ("grad_clip=1.0", "grad_clip=None")),
    ({"lr": (5e-3, 5e-3), "seed": (0, 1)}, ("seed=0", "seed=1")),
])
def test_ranks_that_disagree_on_options_get_one_error_naming_each_value(options, shown):
    with pytest.raises(ValueError, match="training loop") as exc:
        simpar.launch(lambda comm: _disagree(comm, **options), 2, timeout=60)
    text = str(exc.value)
    assert "rank 0" in text and "rank 1" in text
    for value in shown:
        assert value in text


def test_ranks_that_agree_train_normally():
    # negative control for the test above: the same options per rank train
    out = simpar.launch(lambda comm: _disagree(comm, warmup=(2, 2)), 2, timeout=60)
    assert out[0]["loss"] == out[1]["loss"] and len(out[0]["loss"]) == SMALL["steps"]


DISAGREE_MPI = """
import numpy as np, simpar
from simpar.comm.mesh import ParallelConfig
from simpar.train import train
simpar.run(lambda c: train(c, ParallelConfig(dp=2), steps=2, batch_size=4, warmup=2 + c.rank,
                           model=dict(seq_len=16, n_layer=1, n_head=2, d_model=16)))
"""


@pytest.mark.mpi
def test_mpi_ranks_that_disagree_on_options_fail_with_each_value():
    res = run_mpi(2, "-c", DISAGREE_MPI, timeout=120)
    assert res.returncode != 0
    assert "training loop" in res.stderr and "warmup=2" in res.stderr \
        and "warmup=3" in res.stderr, res.stderr
    assert res.stderr.count("Traceback") == 1, res.stderr          # one report per job
