"""The pipeline demo on both backends: prints its checks and writes its figures."""
import re

import pytest

from simpar.demos import pipeline_parallel as demo
from tests.mpi_util import run_mpi


def _check(text, out_dir, figures):
    rows = re.findall(r"^(naive|gpipe|1f1b|interleaved|zb-h1)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+"
                      r"(\S+)\s+(\S+)\s+(.*)$", text, re.M)
    assert [r[0] for r in rows] == ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"], text
    for name, m, v, err, sim_b, formula, wall_b, held in rows:
        assert float(err) <= 1e-10, (name, err)
        if name != "zb-h1":                      # uniform stages: the formula exactly
            assert sim_b == formula, (name, sim_b, formula)
        else:                                    # last stage's head splits I/W unevenly
            assert abs(float(sim_b) - float(formula)) < 0.01
        assert 0 <= float(wall_b) < 1
    held = {r[0]: [float(x) for x in r[7].split()] for r in rows}
    assert held["gpipe"] == [8.0] * 4 and held["1f1b"] == [4.0, 3.0, 2.0, 1.0]
    assert "0F0" in text and "3B7" in text                      # the 1F1B grid
    for f in figures:
        assert (out_dir / f).stat().st_size > 10_000, f


@pytest.mark.timeout(120)
def test_demo_threads(tmp_path, capsys):
    demo.main(["--world-size", "4", "--out", str(tmp_path), "--backend", "threads"])
    _check(capsys.readouterr().out, tmp_path,
           ["pp_schedules.png", "pp_bubble.png", "pp_timeline.png"])


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_demo_mpi(tmp_path):
    res = run_mpi(4, "-m", "simpar.demos.pipeline_parallel", "--out", str(tmp_path),
                  "--no-sweep", timeout=140)
    assert res.returncode == 0, res.stdout + res.stderr
    _check(res.stdout, tmp_path, ["pp_schedules.png", "pp_timeline.png"])
    assert res.stdout.count("max rel err") == 1                  # rank 0 prints


def test_bubble_formula_errors():
    with pytest.raises(ValueError, match="'dualpipe'"):
        demo.bubble_formula("dualpipe", 4, 8)
    with pytest.raises(ValueError, match="vocab"):
        demo.uniform_config(2, min_vocab=10**6)
