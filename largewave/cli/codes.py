"""Precompute a level's codes: its trained encoder over every shard of the level below.

    largewave codes --stack demo --level 1                  # audio shards → level-1 codes
    largewave codes --stack demo --level 2                  # level-1 codes → level-2 codes
    largewave codes --stack piano --level 1 --task-index 3 --task-count 8   # one array task
    largewave codes --stack demo --level 1 --export runs/demo/level1/<sig>/export.pt

Input: the audio shards (``data.shards``) for level 1, the codes of the level below
(``{data.codes}/level{k-1}``) above. Output: ``{data.codes}/level{k}`` — the same shard names,
the same keys in the same order, ``{key}.codes.npy`` + ``{key}.json`` carrying the encoder's
fingerprint, and ``manifest.json`` written last (by whichever task finishes the set). Finished
shards are skipped, so an interrupted run is resumed by running the same command again.

Exit codes: 0 done (this task's share; the set is complete when the manifest is written) ·
2 nothing to do it with (no export, input not ready, fingerprint mismatch, bad config) ·
130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from largewave.cli import add_stack, add_threads
from largewave.config import ConfigError, load_config


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_stack(ap)
    ap.add_argument("--level", required=True, help="the level whose codes to compute: 1, 2, …")
    ap.add_argument("--task-index", type=int, default=None,
                    help="this task's index (default: SLURM_ARRAY_TASK_ID, else 0)")
    ap.add_argument("--task-count", type=int, default=None,
                    help="number of tasks sharing the shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    ap.add_argument("--export", help="export to encode with (default: the level's run folder's export.pt)")
    ap.add_argument("--device", help="cuda, cpu, cuda:1, … (default: cuda when present)")
    ap.add_argument("--chunk-frames", type=int, default=None, help="code frames per encoder window")
    add_threads(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    import os

    from largewave.codes import CHUNK_FRAMES, CodesError, precompute_codes

    # Slurm arrays may be numbered from any first index (--array=1-8): count from SLURM_ARRAY_TASK_MIN.
    index = (args.task_index if args.task_index is not None
             else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)))
    count = args.task_count if args.task_count is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    try:
        cfg = load_config(args.stack, args.overrides)
        precompute_codes(cfg, args.level, task_index=index, task_count=count, device=args.device,
                         progress=not args.quiet, export=args.export,
                         chunk_frames=args.chunk_frames or CHUNK_FRAMES, threads=args.threads or None)
    except (ConfigError, CodesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to complete the set",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
