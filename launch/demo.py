#!/usr/bin/env python3
"""The demo stack end to end: ``largewave demo`` from a checkout (see ``largewave demo --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/demo.py"))
