#!/usr/bin/env python3
"""Samples, reconstructions and continuations from a trained stack: ``largewave sample`` from a checkout (see ``largewave sample --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/sample.py"))
