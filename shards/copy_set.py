#!/usr/bin/env python3
"""Copy a finished shard set: ``largewave shards copy`` from a checkout (see ``largewave shards copy --help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.cli.shards_copy import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="shards/copy_set.py"))
