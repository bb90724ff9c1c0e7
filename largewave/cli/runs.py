"""Runs you can inspect without W&B: a table of a stack's runs, or one run with its curves.

    largewave runs                          every run under runs/ (or run.root of --stack)
    largewave runs --stack piano            one stack's runs
    largewave runs demo/level1              the newest level-1 run of stack demo, in detail,
                                            and its learning curves in <run>/curves.png
    largewave runs 3f9c2a                   a run by (the start of) its signature, or by its folder
    largewave runs --json                   the same figures as JSON

Columns: level, signature (the run folder's name), state (running / done / paused / stopped /
failed), step/total, best and last validation bits/token, codes used of K (last validation),
the reconstruction figures of the last validation (LSD dB / flatness excess dB / pitch-class
agreement), the latest complete checkpoint, the W&B run path, and how the run's config differs
from the stack's shipped YAML. Everything is read from the run folders (metrics.jsonl,
state.json, config.yaml, checkpoints/): W&B need not be reachable.
"""
from __future__ import annotations

import argparse
import json
import sys

from largewave.config import ConfigError, load_config


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("run", nargs="?", help="one run: its folder, signature (prefix) or STACK/LEVEL (the newest)")
    ap.add_argument("--stack", "--config", dest="stack", default=None, metavar="NAME_OR_PATH",
                    help="only this stack's runs, under its run.root (default: every stack under --root)")
    ap.add_argument("--root", default=None, help="where run folders live (default: run.root of --stack, else runs)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    from largewave import runs

    try:
        cfg = load_config(args.stack) if args.stack else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = args.root or (cfg.run.root if cfg else "runs")
    if args.run:
        try:
            info = runs.load_run(runs.resolve_run(args.run, root))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        png = runs.draw_curves(info)
        if args.json:
            print(json.dumps({**info.to_dict(), "curves": str(png) if png else None}, indent=1))
        else:
            print(runs.format_detail(info))
            print(f"learning curves: {png}" if png else "learning curves: nothing logged yet")
        return 0
    found = runs.find_runs(root, cfg.stack if cfg else None)
    if args.json:
        print(json.dumps([r.to_dict() for r in found], indent=1))
    elif not found:
        print(f"no runs under {root}" + (f" for stack {cfg.stack}" if cfg else ""))
    else:
        print(runs.format_table(found))
    return 0
