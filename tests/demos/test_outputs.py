"""Where the demos write, what they say before they run, and the one command that
regenerates the committed figures."""
import hashlib
import os
import re
import subprocess
import sys

import pytest

from simpar import cli
from simpar.demos import common, expert_parallel, figures
from tests.mpi_util import ROOT, run_mpi

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}


def _simpar(*args, timeout=240, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "simpar", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot() -> dict:
    """Every path ``git status`` reports (new, deleted or modified, tracked or
    not), with a hash of its content: a demo that writes a new file, changes a
    tracked one (a committed figure) or changes a file someone is editing shows."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    snap = {}
    for line in out.splitlines():
        path = ROOT / line[3:].split(" -> ")[-1].strip('"')
        snap[line[3:]] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() \
            else line[:2]
    return snap


#: every command with cheap options, as a user would type it (default --out)
COMMANDS = (["demo"], ["tensor"], ["pipeline", "--no-sweep"], ["expert", "--steps", "2"],
            ["train", "--steps", "3"], ["zero"], ["memory", "--steps", "2"], ["context"],
            ["hybrid", "--steps", "1"])


@pytest.mark.timeout(1200)
def test_demos_with_default_options_leave_the_tree_clean():
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    assert {args[0] for args in COMMANDS} == set(cli.COMMANDS) - {"figures", "notebooks"}
    before = _snapshot()
    for args in COMMANDS:
        res = _simpar(*args)
        assert res.returncode == 0, res.stdout + res.stderr
        assert re.search(rf"\b{common.DEFAULT_OUT}(/|\b)", res.stdout), res.stdout  # says where
        assert _snapshot() == before, args
    assert (ROOT / common.DEFAULT_OUT / "demo_timeline.png").exists()


def test_snapshot_sees_new_and_changed_files():
    # negative control for the test above: a new file and a changed tracked file show
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    before = _snapshot()
    new = ROOT / "figures" / "negative-control.tmp"
    tracked = ROOT / "figures" / "hybrid_loss.png"
    original = tracked.read_bytes()
    try:
        new.write_text("x")
        assert _snapshot() != before
        new.unlink()
        assert _snapshot() == before
        tracked.write_bytes(original + b"\0")
        assert _snapshot() != before
    finally:
        tracked.write_bytes(original)
        new.unlink(missing_ok=True)
    assert _snapshot() == before


@pytest.mark.timeout(300)
def test_simulated_clock_figures_are_byte_identical_run_to_run(tmp_path):
    names = ["tp_comm_volume.png", "tp_memory.png", "pp_schedules.png", "pp_bubble.png"]
    assert set(names) <= set(figures.DETERMINISTIC)
    runs = [figures.draw(names, tmp_path / str(i)) for i in range(2)]
    for a, b in zip(*runs):
        assert a.name == b.name and a.stat().st_size > 10_000
        assert a.read_bytes() == b.read_bytes(), a.name
        assert b"matplotlib" not in a.read_bytes()                   # no version stamp


def test_figures_command_writes_the_repository_figures():
    assert figures.repository_figures() == ROOT / "figures"
    committed = {p.name for p in (ROOT / "figures").glob("*.png")}
    assert committed == set(figures.FIGURES)                # every committed figure has a maker
    res = _simpar("figures", "--help")
    assert res.returncode == 0 and "figures/" in res.stdout
    listed = _simpar("--help")
    assert "figures" in listed.stdout


def test_memory_estimate_printed_first_and_too_large_refused():
    res = _simpar("expert", "--world-size", "1000", timeout=60)
    assert res.returncode == 2
    assert res.stdout.splitlines()[0].startswith("expert parallelism: starting 1000 devices")
    assert "estimated memory" in res.stdout
    assert "more than the" in res.stderr and "use at most" in res.stderr
    assert "Traceback" not in res.stderr


def test_memory_refusal_uses_the_machine_memory(monkeypatch, capsys):
    monkeypatch.setattr(common, "available_memory", lambda: 1 << 30)     # a 1 GiB machine
    with pytest.raises(SystemExit) as exc:
        expert_parallel.main(["--world-size", "64", "--backend", "threads"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "64 devices need an estimated" in err and "1.0 GiB" in err
    assert 1 << 20 < common.available_memory() < 1 << 50


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpiexec_with_one_process_says_it_runs_a_threads_world(tmp_path):
    res = run_mpi(1, "-m", "simpar", "demo", "--out", str(tmp_path), timeout=100)
    assert res.returncode == 0, res.stderr
    assert "mpiexec started 1 process, so this runs a 4-device threads world" in res.stdout
    assert "4 devices, backend threads" in res.stdout
