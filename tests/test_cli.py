"""The command line explains itself: ``python -m simpar --help`` lists every
command; every command's ``--help`` shows ``python -m simpar <command>`` and each
option's meaning and default; typos get the closest option; errors print once."""
import argparse
import subprocess
import sys

import pytest

from simpar import cli
from tests.mpi_util import ROOT, run_mpi


def _simpar(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "simpar", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """What ``parser --help`` fails to explain: an option without help text, or
    one whose default is not shown."""
    text = "".join(parser.format_help().split())          # wrapping aside
    problems = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = a.option_strings[-1] if a.option_strings else a.dest
        if not (a.help or "").strip():
            problems.append(f"{name}: no help text")
        elif "".join(a.help.split()) not in text:
            problems.append(f"{name}: help text not shown")
        if a.default is not argparse.SUPPRESS and f"(default:{a.default})" not in text:
            problems.append(f"{name}: default {a.default!r} not shown")
    return problems


def test_top_level_help_lists_every_command_with_one_line():
    res = _simpar("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m simpar")
    lines = " ".join(res.stdout.split())
    for name, (_, text) in cli.COMMANDS.items():
        assert f"{name} {' '.join(text.split())}" in lines, name
    bare = _simpar()                                          # no command: the same list
    assert bare.returncode == 0 and "train" in bare.stdout


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_help_shows_its_usage_options_and_defaults(command, capsys):
    parser = cli.load(command).parser()
    assert parser.prog == f"python -m simpar {command}"
    assert undocumented(parser) == []
    with pytest.raises(SystemExit) as exc:                    # main() uses that parser
        cli.load(command).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m simpar {command} ")
    for a in parser._actions:
        assert a.option_strings[-1] in out


def test_undocumented_finds_missing_help_and_defaults():
    # negative control for the check above
    ap = cli.Parser("python -m simpar x")
    ap.add_argument("--quiet-one", type=int, default=3)
    ap.add_argument("--told", type=int, default=4, help="told")
    assert undocumented(ap) == ["--quiet-one: no help text", "--quiet-one: default 3 not shown"]
    bare = argparse.ArgumentParser(prog="x")                 # no ArgumentDefaultsHelpFormatter
    bare.add_argument("--steps", type=int, default=5, help="training steps")
    assert undocumented(bare) == ["--steps: default 5 not shown"]


def test_subcommand_help_from_the_shell():
    res = _simpar("train", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m simpar train ")
    assert "--steps STEPS" in res.stdout and "training steps (default: 500)" in res.stdout


@pytest.mark.parametrize("args,hint", [
    (["train", "--stpes", "3"], "did you mean --steps?"),
    (["train", "--micro-batchs", "2"], "did you mean --micro-batches?"),
    (["trian"], "did you mean 'train'?"),
    (["train", "--attention", "ulyses"], "did you mean 'ulysses'?"),
    (["zero", "--world-size", "4"], "starts threads worlds of its own sizes"),
])
def test_typos_get_the_closest_option(args, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert hint in capsys.readouterr().err


def test_no_abbreviations_and_no_wild_guesses(capsys):
    # --n would be taken for --no-loss-scaling by argparse's default allow_abbrev
    with pytest.raises(SystemExit):
        cli.main(["train", "--n", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --n 3" in err
    with pytest.raises(SystemExit):                           # negative control: nothing close
        cli.main(["train", "--zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err


def test_a_failing_job_reports_its_error_once():
    res = _simpar("train", "--micro-batches", "0", "--steps", "1")
    assert res.returncode != 0
    assert res.stderr.count("micro_batches must be a positive integer") == 1, res.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("command", ["zero", "hybrid"])
def test_threads_only_demos_refuse_mpiexec(command):
    res = run_mpi(2, "-m", "simpar", command, "--out", "/nonexistent", timeout=100)
    assert res.returncode != 0
    assert res.stderr.count("runs its own threads worlds") == 1, res.stderr
    assert "Ψ" not in res.stdout and "layout" not in res.stdout      # nothing ran
