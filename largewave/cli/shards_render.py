"""Render the demo piano corpus: MAESTRO performances (MIDI) → one FLAC per piece.

    largewave shards render --stack demo                  # cfg.data.demo_minutes → cfg.data.raw_dir
    largewave shards render --stack demo --minutes 2      # a 2-minute smoke corpus
    largewave shards render --stack demo data.demo_minutes=5

The MIDIs come from the ``miditok==3.1.0`` source distribution (fetched once with ``pip
download`` into ``~/.cache/largewave``, or ``$LARGEWAVE_CACHE``); rendering uses the
``fluidsynth`` program and the MuseScore General soundfont, installed with apt when running as
root. Finished pieces are cached: running again only renders what changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from largewave.cli import add_stack
from largewave.config import ConfigError, load_config
from largewave.data.piano import RenderError, render_corpus


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, 
        description="Render N minutes of solo piano from the MAESTRO MIDIs in the miditok==3.1.0 sdist "
                    "with FluidSynth, one FLAC per performance (cached).",
        epilog="Extra arguments key.sub=value override the config (e.g. data.demo_minutes=5 stack=mine). "
               "Each performance is one piece, rendered up to a common length so that N minutes span "
               "several performances (train/valid are split by piece).",
    )
    add_stack(ap)
    ap.add_argument("--minutes", type=float, help="minutes of piano to render (default: data.demo_minutes)")
    ap.add_argument("--out", help="output folder (default: data.raw_dir of the config)")
    ap.add_argument("--max-piece-minutes", type=float,
                    help="render at most this much of each performance (default: spread the minutes evenly)")
    ap.add_argument("--min-piece-seconds", type=float, default=30.0,
                    help="shortest excerpt when spreading a small corpus over performances (default: 30)")
    ap.add_argument("--soundfont", help="a .sf2/.sf3 file (default: MuseScore General from Debian)")
    ap.add_argument("--workers", type=int, help="parallel fluidsynth processes (default: data.workers)")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get; fail with instructions instead")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.stack, args.overrides)
        minutes = args.minutes if args.minutes is not None else cfg.data.demo_minutes
        if minutes <= 0:
            raise ConfigError(f"--minutes {minutes}: must be > 0")
        out = args.out or cfg.path(cfg.data.raw_dir)
        paths = render_corpus(out, minutes, max_piece_minutes=args.max_piece_minutes,
                              min_piece_seconds=args.min_piece_seconds, soundfont=args.soundfont,
                              workers=max(1, args.workers if args.workers is not None else cfg.data.workers),
                              install=not args.no_install, progress=not args.quiet)
    except (ConfigError, RenderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished pieces are kept, run again to continue", file=sys.stderr)
        return 130
    print(f"{len(paths)} pieces in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
