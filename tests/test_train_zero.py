"""``python -m simpar train --zero 1|2|3 --save DIR --save-every N --resume DIR``:
a run resumed on another layout and ZeRO stage prints the losses of the
uninterrupted run (threads, and under mpiexec)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.mpi_util import ROOT, run_mpi

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}
COMMON = ["--steps", "4", "--batch-size", "4", "--log-every", "1", "--float64"]


def _train(*args, cwd):
    res = subprocess.run([sys.executable, "-m", "simpar", "train", *COMMON, *args], cwd=cwd,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _losses(stdout: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"step\s+(\d+) \| loss (\S+)", stdout)}


def test_save_and_resume_from_the_command_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = _losses(_train("--dp", "2", "--zero", "2", "--save", str(ckpt), "--save-every", "2",
                          "--out", str(tmp_path / "a"), cwd=tmp_path))
    assert sorted(full) == [0, 1, 2, 3]
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    out = _train("--tp", "2", "--zero", "1", "--resume", str(ckpt / "step-00000002"),
                 "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert "resumed from" in out and "at step 2" in out
    assert _losses(out) == {2: full[2], 3: full[3]}
    done = _train("--resume", str(ckpt), "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert "nothing to train" in done


def test_bad_zero_stage_is_refused_by_the_parser(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simpar", "train", "--zero", "4"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "invalid choice: 4" in res.stderr


def test_zero3_with_pipeline_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "simpar", "train", "--pp", "2", "--zero", "3",
                          *COMMON], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "ZeRO-3 is supported with dp x tp" in res.stderr
    assert "pp=2" in res.stderr


@pytest.mark.mpi
def test_resume_under_mpiexec(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = _losses(_train("--dp", "2", "--zero", "1", "--save", str(ckpt), "--save-every", "2",
                          "--out", str(tmp_path / "a"), cwd=tmp_path))
    res = run_mpi(2, "-m", "simpar", "train", *COMMON, "--dp", "2", "--zero", "3", "--resume",
                  str(ckpt / "step-00000002"), "--out", str(tmp_path / "b"), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _losses(res.stdout) == {2: full[2], 3: full[3]}
