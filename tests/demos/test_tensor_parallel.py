"""The tensor-parallel demo on both backends: its error table, its per-layer
byte counts and its three figures."""
import re

import pytest

from simpar.demos import tensor_parallel
from tests.mpi_util import run_mpi


def _check_output(text, out_dir, n):
    assert f"tp={n}" in text
    table = re.findall(r"^   (logits|loss|\w+ grads) +(\S+) +(\S+)$", text, re.M)
    assert len(table) == len(tensor_parallel.GROUPS)
    assert all(float(v) <= 1e-10 for row in table for v in row[1:]), table
    # per-layer bytes: traced (tp, tp+sp) == 8bsh(t-1)/t; naive MLP > Megatron MLP
    rows = re.findall(r"^ +(\d+) +(\d+)Ki +(\d+)Ki +(\d+)Ki +(\d+)Ki +(\d+)Ki", text, re.M)
    assert [int(r[0]) for r in rows] == [t for t in range(1, n + 1) if n % t == 0]
    for t, tp, sp, formula, naive, megatron in (map(int, r) for r in rows):
        assert tp == sp == formula
        assert naive > megatron or t == 1
    for name in ("tp_timeline.png", "tp_comm_volume.png", "tp_memory.png"):
        assert (out_dir / name).stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_demo_threads(tmp_path, capsys):
    tensor_parallel.main(["--world-size", "4", "--out", str(tmp_path), "--backend", "threads"])
    _check_output(capsys.readouterr().out, tmp_path, 4)


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_demo_mpi(tmp_path):
    res = run_mpi(4, "-m", "simpar.demos.tensor_parallel", "--out", str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stderr
    _check_output(res.stdout, tmp_path, 4)
    assert res.stdout.count("max relative error") == 1          # rank 0 prints
