#!/usr/bin/env python3
"""Population based training of one level: ``largewave pbt`` from a checkout (see ``largewave pbt --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.pbt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/pbt.py"))
