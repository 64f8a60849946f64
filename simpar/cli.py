"""The ``python -m simpar`` command line: one subcommand per demo, ``train``,
``figures`` and ``notebooks``.

Every command lives in a module with ``parser()`` (its own
:class:`Parser`, whose usage line reads ``python -m simpar <command>``) and
``main(argv)``.  ``python -m simpar --help`` lists the commands without
importing them; ``python -m simpar <command> --help`` shows the command's
options, each with its meaning and default.  A mistyped command or option gets
the closest one suggested ("did you mean --steps?"); options must be spelled
out (no abbreviations: ``--n`` is not taken for ``--no-loss-scaling``).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

#: command -> (module, one line of help), in the order ``--help`` lists them
COMMANDS = {
    "demo": ("simpar.demos.overview", "the main demo: mesh, a reference step across devices, "
             "collectives, timelines"),
    "tensor": ("simpar.demos.tensor_parallel", "tensor + sequence parallelism checked against "
               "one device; bytes and memory per layer"),
    "pipeline": ("simpar.demos.pipeline_parallel", "pipeline schedules (GPipe, 1F1B, "
                 "interleaved, ZB-H1): bubbles and equivalence"),
    "expert": ("simpar.demos.expert_parallel", "Mixture-of-Experts: routing, all-to-all, "
               "load balance"),
    "hybrid": ("simpar.demos.hybrid", "every hybrid layout (dp, tp, pp, ep, vpp) trains the "
               "same model"),
    "zero": ("simpar.demos.zero", "ZeRO stages 0-3: memory per rank and bytes per step"),
    "memory": ("simpar.demos.memory", "activation recomputation and mixed precision: memory "
               "and loss"),
    "context": ("simpar.demos.context_parallel", "context parallelism: ring attention's overlap "
                "and balance, ring vs Ulysses"),
    "train": ("simpar.train", "train a GPT on the shipped corpus on any dp x tp x pp x ep x cp "
              "layout"),
    "figures": ("simpar.demos.figures", "regenerate the committed figures/ (demos write ./out)"),
    "notebooks": ("simpar.demos.notebooks", "execute every notebook and write it back with its "
                  "outputs"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (docstrings), each option with its default."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with simpar's conventions: no abbreviated
    options, defaults shown in ``--help``, and "did you mean" for a mistyped
    option, command or choice."""

    def __init__(self, prog: str, description: str | None = None, **kw) -> None:
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, allow_abbrev=False, **kw)
        #: options other commands have and this one refuses: option -> why
        self.not_here: dict[str, str] = {}

    def error(self, message: str):
        refused = [why for opt, why in self.not_here.items()
                   if message.startswith("unrecognized arguments:") and opt in message.split()]
        if refused:
            super().error(f"{message} ({refused[0]})")
        hint = suggestion(message, self._option_string_actions, self._choices())
        super().error(message + (f"; did you mean {hint}?" if hint else ""))

    def _choices(self) -> dict:
        """``{option or dest: choices}`` of every argument that has choices."""
        return {(a.option_strings[-1] if a.option_strings else a.dest): list(a.choices)
                for a in self._actions if a.choices}


def suggestion(message: str, options, choices: dict) -> str | None:
    """The closest option to an unrecognized one in argparse's ``message``, or the
    closest choice to an invalid one (None if nothing is close)."""
    if message.startswith("unrecognized arguments:"):
        for word in message.split(":", 1)[1].split():
            name = word.split("=", 1)[0]
            if name.startswith("-"):
                close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
                if close:
                    return close[0]
    found = re.search(r"invalid choice: '?([^' ]+)'? \(", message)
    if found:
        bad = found.group(1)
        pool = [str(c) for cs in choices.values() for c in cs]
        close = difflib.get_close_matches(bad, pool, n=1, cutoff=0.5)
        if close:
            return repr(close[0])
    return None


def command_parser() -> Parser:
    """``python -m simpar <command> [options]``: the commands, one line each."""
    ap = Parser("python -m simpar", "simpar: how LLMs are trained on many devices, in pure "
                "NumPy. Every command runs on a threads world in one process, or on the "
                "processes of mpiexec.",
                epilog="python -m simpar <command> --help shows the options of a command. "
                       "Under MPI: mpiexec -n 4 python -m simpar <command>.")
    sub = ap.add_subparsers(dest="command", metavar="<command>", title="commands",
                            parser_class=argparse.ArgumentParser)
    for name, (_, text) in COMMANDS.items():
        # the command's own parser reads its options (and its --help)
        sub.add_parser(name, help=text, add_help=False)
    return ap


def load(command: str):
    """The module of ``command`` (it has ``parser()`` and ``main(argv)``)."""
    return importlib.import_module(COMMANDS[command][0])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = command_parser()
    if not argv:
        ap.print_help()
        return
    args, rest = ap.parse_known_args(argv[:1])
    if args.command is None:
        ap.error(f"the first argument must be a command, got {argv[0]!r}")
    load(args.command).main(argv[1:] + rest)
