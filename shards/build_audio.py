#!/usr/bin/env python3
"""Build audio shards from a folder of recordings: ``largewave shards build`` from a checkout (see ``largewave shards build --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.shards_build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="shards/build_audio.py"))
