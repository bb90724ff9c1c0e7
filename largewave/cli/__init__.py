"""``largewave``: one command for every stage of a stack.

    largewave demo                           the embedded default, end to end (make demo)
    largewave shards build --stack piano --input ~/maestro-v3.0.0
    largewave train --stack demo --level 1   one level on this machine (torchrun/srun for ranks)
    largewave codes --stack demo --level 1   precompute a level's codes
    largewave launch --stack demo --level 2  submit to Slurm (or run it here)
    largewave runs                           every run with its figures; largewave runs RUN: one run

Each subcommand answers ``--help``. ``launch/*.py`` and ``shards/*.py`` in a checkout are thin
wrappers around the same code (``python launch/slurm.py`` is ``largewave launch``). Every
subcommand that reads a config takes ``--stack NAME_OR_PATH`` (``--config`` is the same flag,
default ``demo``): a name of a config shipped with largewave (``demo``, ``piano``, ``nsynth``,
``wavenet``) or a path to your own YAML. Relative paths in configs (``data/…``, ``runs/…``) are
relative to the current directory.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name → (module under largewave.cli, one line for --help). ``shards`` has its own subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the demo stack end to end: render piano, shards, every level, samples, quality summary"),
    "shards": ("shards", "audio shards: build from recordings, render the demo piano, copy a set"),
    "train": ("train", "train (or resume) one level in this process; run it under torchrun/srun for ranks"),
    "codes": ("codes", "precompute a level's codes with its trained encoder"),
    "sample": ("sample", "samples, reconstructions and continuations from a trained stack"),
    "launch": ("launch", "submit a level or the whole chain to Slurm, or run it here (also --status/--list)"),
    "pbt": ("pbt", "population based training of one level"),
    "runs": ("runs", "list runs with their figures, or show one run and draw its learning curves"),
    "doctor": ("doctor", "what this machine has for largewave and what is missing"),
}

STACK_HELP = ("stack config: a name shipped with largewave (demo, piano, nsynth, wavenet) or a path to a "
              "YAML file (default: demo); --config is the same flag")
THREADS_HELP = ("torch threads of this process on CPU (default: auto — every core for batched work such as "
                "code precompute, 1 for sample-by-sample generation, whose steps are too small to split; "
                "0: torch's own default)")


def add_stack(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--stack`` (alias ``--config``), the same in every subcommand."""
    ap.add_argument("--stack", "--config", dest="stack", default="demo", metavar="NAME_OR_PATH", help=STACK_HELP)


def add_threads(ap: argparse.ArgumentParser) -> None:
    """``--threads``, the same in every subcommand that computes on CPU (None: auto)."""
    ap.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def python_command(*args: str) -> list[str]:
    """The command line that runs ``largewave ARGS`` with this interpreter (for child processes)."""
    return [sys.executable, "-m", "largewave", *args]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a child process imports this same largewave, installed or not."""
    env = dict(os.environ if env is None else env)
    here = str(Path(__file__).resolve().parent.parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in parts:
        env["PYTHONPATH"] = os.pathsep.join([here, *parts])
    return env


def invocation(prog: str | None, fallback: str) -> list[str]:
    """How the user ran this command, to print it back ("rerun with: …"): ``python launch/slurm.py``
    for a checkout's wrapper, ``largewave launch`` for the CLI."""
    prog = prog or fallback
    return ["python", prog] if prog.endswith(".py") else prog.split()


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: largewave COMMAND [options]   (largewave COMMAND --help for each)\n\n"
            + __doc__.split("\n\n")[0].replace("``", "") + "\n\ncommands:\n" + "\n".join(lines) + "\n\nexamples:\n"
            + "\n\n".join(__doc__.split("\n\n")[1:]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from largewave import __version__

        print(f"largewave {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"largewave: unknown command {name!r}; one of: {', '.join(COMMANDS)} (largewave --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"largewave.{'doctor' if name == 'doctor' else 'cli.' + COMMANDS[name][0]}")
    return int(module.main(rest, prog=f"largewave {name}") or 0)
