#!/usr/bin/env python3
"""The embedded default: the whole demo pipeline on this machine, stage by stage.

    python launch/demo.py              # ~20 minutes of rendered piano → shards → training
    python launch/demo.py --smoke      # a minute of piano and a few steps: checks that it all runs
    python launch/demo.py data.demo_minutes=5 level1.train.steps=200   # any config override

Every stage is a command a user could run by hand (printed before it runs); finished work is
cached (rendered pieces, complete shard sets, complete checkpoints), so rerunning resumes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from largewave.config import ConfigError, load_config  # noqa: E402

# What --smoke changes: a separate stack name (its own data/ and runs/ folders) and tiny sizes.
SMOKE_OVERRIDES = [
    "stack=demo-smoke",
    "data.demo_minutes=1",
    "data.segment_seconds=10",
]


def stages(stack_args: list[str], cfg) -> list[tuple[str, list[str]]]:
    py = sys.executable
    out = []
    if cfg.data.source == "demo":
        out.append(("render piano", [py, "shards/render_piano.py", *stack_args]))
    out.append(("audio shards", [py, "shards/build_audio.py", *stack_args]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Run the demo stack end to end on this machine (CPU is fine).",
        epilog="Extra arguments of the form key.sub=value override the config, e.g. data.demo_minutes=5.",
    )
    ap.add_argument("--config", default="demo", help="stack config name under configs/ or a YAML path (default: demo)")
    ap.add_argument("--smoke", action="store_true", help="a minute of piano and a few steps per stage (what CI runs)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stack_args = ["--config", args.config, *overrides]

    timings = []
    for name, cmd in stages(stack_args, cfg):
        print(f"\n=== {name}: {shlex.join('python' if c == sys.executable else c for c in cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        timings.append((name, time.time() - t0, rc))
        if rc != 0:
            print(f"\nerror: stage '{name}' failed (exit {rc}); fix the problem above and rerun the same command: "
                  f"finished stages are cached.", file=sys.stderr)
            return rc

    print("\n=== demo finished")
    for name, dt, _ in timings:
        print(f"  {name:<16} {dt:8.1f} s")
    print(f"  audio shards:    {cfg.path(cfg.data.shards)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
