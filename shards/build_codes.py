#!/usr/bin/env python3
"""Precompute a level's codes: ``largewave codes`` from a checkout (see ``largewave codes --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.codes import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="shards/build_codes.py"))
