"""``largewave shards build | render | copy``: the audio shard sets.

    largewave shards build --stack piano --input ~/maestro-v3.0.0     recordings → shards (python shards/build_audio.py)
    largewave shards render --stack demo --minutes 2                  the demo piano corpus (python shards/render_piano.py)
    largewave shards copy data/piano/audio s3://bucket/piano/audio    a finished set elsewhere (python shards/copy_set.py)

Code shards are made by ``largewave codes`` (python shards/build_codes.py).
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"build": "shards_build", "render": "shards_render", "copy": "shards_copy"}


def main(argv=None, prog: str | None = None) -> int:
    prog = prog or "largewave shards"
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{{','.join(SUBCOMMANDS)}}} [options]   ({prog} SUBCOMMAND --help for each)\n\n" + __doc__)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"{prog}: unknown subcommand {argv[0]!r}; one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"largewave.cli.{SUBCOMMANDS[argv[0]]}")
    return int(module.main(argv[1:], prog=f"{prog} {argv[0]}") or 0)
