"""Build audio shards: a folder of recordings → WebDataset tar shards + manifest.

    largewave shards build --stack demo                       # the demo piano (rendered first if needed)
    largewave shards build --stack piano --input ~/maestro-v3.0.0 \\
        data.split_file=~/maestro-v3.0.0/maestro-v3.0.0.csv data.workers=8
    largewave shards build --stack demo --input my_recordings/ --out data/mine/audio

Input: every wav/flac/ogg/mp3/aiff/… file under the folder (recursively), any rate and channel
count. Output (default ``data.shards`` of the config): ``{split}-{index:06d}.tar`` shards of 16 kHz
mono FLAC segments, ``report.json`` (every skipped file with its reason) and ``manifest.json``
(written last). Rebuilding from the same input gives byte-identical shards. The shards can be
copied to shared or object storage afterwards (largewave shards copy); training reads them from a local
folder, ``s3://bucket/prefix``, an http(s) prefix or a ``pipe:`` command (see README). With
``data.shards=s3://…`` the set is built in a local staging folder and then copied there.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from largewave.cli import add_stack
from largewave.config import ConfigError, load_config
from largewave.codes import staging_dir
from largewave.data import storage
from largewave.data.manifest import ManifestError, copy_shard_set
from largewave.data.shards import BuildError, build_audio_shards


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, 
        description="Turn a folder of recordings into WebDataset audio shards (16 kHz mono FLAC segments, "
                    "split train/valid/test by piece) with a manifest and a report of skipped files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys used (override with key=value): data.source, data.raw_dir, data.shards, "
               "data.segment_seconds, data.shard_mb, data.valid_fraction, data.test_fraction, "
               "data.split_file, data.seed, data.workers, audio.sample_rate.\n"
               "A split file is a CSV with a path column (audio_filename, path, file, …) and a split "
               "column (train / validation / test), e.g. MAESTRO's maestro-v3.0.0.csv; paths are relative "
               "to --input. Pieces it does not list are split by hash.",
    )
    add_stack(ap)
    ap.add_argument("--input", help="folder of recordings (default: data.source, or the rendered demo "
                                    "folder data.raw_dir when data.source is 'demo')")
    ap.add_argument("--out", help="output folder or s3:// prefix (default: data.shards)")
    ap.add_argument("--no-render", action="store_true",
                    help="with data.source=demo: do not render the demo piano when data.raw_dir holds none "
                         "(by default it is rendered first, as largewave shards render would)")
    ap.add_argument("--force", action="store_true",
                    help="rebuild even if the output is a complete set made from the same files and settings")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.stack, args.overrides)
        d = cfg.data
        if args.input:
            src = os.path.expanduser(args.input)
        elif d.source == "demo":
            src = cfg.path(d.raw_dir)
            if not args.no_render and not any(Path(src).glob("*.flac")):
                # Nothing rendered yet: render data.demo_minutes first. An existing corpus is used
                # as it is (it may have been rendered with largewave shards render --minutes N).
                from largewave.data.piano import RenderError, render_corpus
                try:
                    render_corpus(src, d.demo_minutes, workers=max(1, d.workers), progress=not args.quiet)
                except RenderError as e:
                    raise BuildError(f"rendering the demo piano into {src}: {e}") from None
        else:
            src = os.path.expanduser(d.source)
        out = args.out or cfg.path(d.shards)
        out = out if storage.is_remote(out) else os.path.expanduser(out)
        # a remote destination (s3://): built in a local staging folder, then copied, manifest last
        local = str(staging_dir(out)) if storage.is_remote(out) else out
        split_file = os.path.expanduser(d.split_file) if d.split_file else None
        build_audio_shards(src, local, sample_rate=cfg.audio.sample_rate, segment_seconds=d.segment_seconds,
                           shard_mb=d.shard_mb, valid_fraction=d.valid_fraction,
                           test_fraction=d.test_fraction, split_file=split_file, seed=d.seed,
                           workers=d.workers, progress=not args.quiet, force=args.force)
        if local != out:
            done = copy_shard_set(local, out, progress=not args.quiet)
            print(f"copied to {out}: {done['copied']} shard(s), {done['skipped']} already there "
                  f"(the local copy stays in {local})")
    except (ConfigError, BuildError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the shard set has no manifest and counts as incomplete; run again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
