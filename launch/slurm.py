#!/usr/bin/env python3
"""Submit a level (or the whole chain) to Slurm, or run it on this machine: ``largewave launch`` from a checkout (see ``largewave launch --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/slurm.py"))
