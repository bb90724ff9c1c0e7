"""Copy a finished shard set (audio or codes) to another location, e.g. object storage.

    largewave shards copy data/piano/audio s3://my-bucket/piano/audio
    largewave shards copy data/piano/codes/level1 s3://my-bucket/piano/codes/level1
    largewave shards copy s3://my-bucket/piano/audio /scratch/piano/audio     # and back

The source may be a local folder, s3://, http(s):// or a pipe: command with {name}; the destination
a local folder or an s3:// prefix. Every shard is checked against the source manifest as it is
copied; the destination's manifest is written last, so a half-copied set reads as incomplete, and
rerunning an interrupted copy skips the shards already there. S3 endpoint and credentials come
from the standard AWS settings (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).

Exit codes: 0 copied (or already there) · 2 the source is incomplete or damaged, or the
destination cannot be written · 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from largewave.data.manifest import ManifestError, copy_shard_set


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("src", help="the shard set to copy (its folder or URL prefix)")
    ap.add_argument("dst", help="where to put it: a local folder or s3://bucket/prefix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        done = copy_shard_set(args.src, args.dst, progress=not args.quiet)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the destination has no manifest yet; run the same command again", file=sys.stderr)
        return 130
    print(f"{args.src} → {args.dst}: {done['copied']} shard(s) copied ({done['bytes'] / 1e6:.1f} MB), "
          f"{done['skipped']} already there; manifest written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
