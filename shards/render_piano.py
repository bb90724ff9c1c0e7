#!/usr/bin/env python3
"""Render the demo piano corpus: ``largewave shards render`` from a checkout (see ``largewave shards render --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.shards_render import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="shards/render_piano.py"))
