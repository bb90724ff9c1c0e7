"""Every command that the README, the docs or an error message tells a user to run exists and
answers ``--help``: renaming a script without updating what points to it breaks this test."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# python[3] SCRIPT, torchrun … SCRIPT, python -m MODULE
SCRIPT = re.compile(r"(?:python3?|torchrun(?: --?[\w-]+(?:[ =]\S+)?)*)\s+((?:launch|shards|bench|tests|scripts)/\w+\.py)")
MODULE = re.compile(r"python3? -m (largewave(?:\.\w+)*)")
# the installed command: largewave SUBCOMMAND (shards has its own subcommands)
CLI = re.compile(r"(?<![\w/.-])largewave (shards (?:build|render|copy)|[a-z]+)\b")


def _texts() -> dict[str, str]:
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]
    for folder in ("largewave", "launch", "shards", "bench", "scripts"):
        files += sorted((REPO / folder).rglob("*.py"))
    files.append(REPO / "tests" / "slurm_cluster.py")
    return {str(f.relative_to(REPO)): f.read_text() for f in files if f.exists()}


def named_commands() -> dict[str, set[str]]:
    """{script or ``-m module``: the files that name it}."""
    found: dict[str, set[str]] = {}
    for name, text in _texts().items():
        for m in SCRIPT.finditer(text):
            found.setdefault(m.group(1), set()).add(name)
        for m in MODULE.finditer(text):
            found.setdefault(f"-m {m.group(1)}", set()).add(name)
        for m in CLI.finditer(text):
            if m.group(1).split()[0] in CLI_WORDS:
                found.setdefault(f"largewave {m.group(1)}", set()).add(name)
    return found


def _cli_words() -> set[str]:
    from largewave.cli import COMMANDS as SUBCOMMANDS

    return set(SUBCOMMANDS)


# a word after "largewave " that is a subcommand; prose such as "largewave trains" is not a command,
# but a subcommand named in a text and missing from the CLI is (see the test below)
CLI_WORDS = _cli_words() | {"shards"}
COMMANDS = sorted(named_commands())


def test_the_scan_finds_the_documented_commands():
    # the scan itself must work, or the test below would pass on nothing
    for must in ("launch/slurm.py", "launch/train.py", "launch/sample.py", "shards/build_audio.py",
                 "shards/build_codes.py", "tests/slurm_cluster.py", "largewave launch", "largewave train",
                 "largewave runs", "largewave shards build", "largewave codes", "largewave doctor"):
        assert must in COMMANDS, COMMANDS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_named_command_answers_help(command):
    where = ", ".join(sorted(named_commands()[command]))
    if command.startswith("largewave "):
        args = ["-m", *command.split()]
    else:
        args = command.split() if command.startswith("-m ") else [str(REPO / command)]
    if not command.startswith(("-m ", "largewave ")):
        assert (REPO / command).is_file(), f"{where} names {command}, which does not exist"
    r = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), \
        f"{command} --help (named in {where}) exited {r.returncode}:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
