"""The main demo, on both backends: it prints its checks and writes its figures."""
import json
import re
import subprocess
import sys

import pytest

from simpar.demos import overview
from tests.mpi_util import ROOT, run_mpi


def _check_output(text, out_dir, n):
    assert f"{n} devices" in text
    err = float(re.search(r"max relative gradient error (\S+)", text).group(1))
    assert err <= 1e-10
    assert (out_dir / "demo_timeline.png").stat().st_size > 10_000
    doc = json.loads((out_dir / "demo_trace.json").read_text())
    tids = {e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert tids == set(range(n))
    assert str(out_dir / "demo_timeline.png") in text


@pytest.mark.timeout(120)
def test_demo_threads(tmp_path, capsys):
    overview.main(["--world-size", "3", "--out", str(tmp_path), "--backend", "threads"])
    _check_output(capsys.readouterr().out, tmp_path, 3)


@pytest.mark.mpi
def test_demo_mpi(tmp_path):
    res = run_mpi(4, "-m", "simpar", "demo", "--out", str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stderr
    _check_output(res.stdout, tmp_path, 4)
    assert res.stdout.count("max relative gradient error") == 1     # rank 0 prints


def test_cli_help_and_unknown_command():
    ok = subprocess.run([sys.executable, "-m", "simpar"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "demo" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "simpar", "dmeo"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode != 0 and "'dmeo'" in bad.stderr
