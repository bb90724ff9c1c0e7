#!/usr/bin/env python3
"""Train one level: ``largewave train`` from a checkout (see ``largewave train --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/train.py"))
