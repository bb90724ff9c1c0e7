#!/usr/bin/env python3
"""Audio from a trained stack: samples, reconstructions through each level, continuations.

    python launch/sample.py --config demo --seconds 4 --count 2 --seed 0
    python launch/sample.py --config demo --temperature prior=0.9 --temperature level1=0.95,level2=1.0
    python launch/sample.py --config demo --reconstruct recording.wav --seconds 6 --start 30
    python launch/sample.py --config demo --reconstruct <audio-shard key>     # e.g. a valid segment
    python launch/sample.py --config demo --prompt opening.wav --seconds 10   # 10 s in all, prompt first
    python launch/sample.py --runs runs/demo/level1/<sig> runs/demo/level2/<sig> runs/demo/prior/<sig>

Sampling runs the cascade prior → level-k decoder … → level-1 decoder → mu-law → 16 kHz WAV with
the models' incremental generation. The WAVs (exactly --seconds long) and summary.json go to
runs/<stack>/samples/<time>-seed<seed>/ (or --out); the printed summary gives the time and
real-time factor (seconds taken per second of audio) of every level.

Exit codes: 0 done · 2 a level is not trained yet, a bad input or a bad config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from largewave.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="launch/sample.py", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", "--stack", dest="config", default="demo",
                    help="stack config name under configs/ or a YAML path (default: demo)")
    ap.add_argument("--runs", nargs="+", metavar="RUN",
                    help="load these run folders / export files (one per level) instead of the config's")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--reconstruct", metavar="FILE_OR_KEY",
                      help="encode this recording (an audio file or a key of the audio shards) and decode it back "
                           "from every level")
    mode.add_argument("--prompt", metavar="FILE_OR_KEY", help="continue this recording")
    ap.add_argument("--seconds", type=float, default=None,
                    help="length of every output (default 4; with --prompt the prompt is included, default 8; "
                         "with --reconstruct the length taken from the recording, 0 = all of it)")
    ap.add_argument("--start", type=float, default=0.0, help="--reconstruct: where in the recording to start (s)")
    ap.add_argument("--prompt-seconds", type=float, default=None, help="--prompt: use only its first N seconds")
    ap.add_argument("--count", type=int, default=1, help="clips sampled together (default 1)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    ap.add_argument("--temperature", action="append", default=[], metavar="T | LEVEL=T[,LEVEL=T]",
                    help="sampling temperature for every level, or per level (repeatable; 0 = greedy; default: the "
                         "config's quality.temperatures, 1.0 where it names none)")
    ap.add_argument("--top-p", action="append", default=[], metavar="P | LEVEL=P[,LEVEL=P]",
                    help="nucleus cut-off for every level, or per level (repeatable): sample only among the most "
                         "likely tokens holding this much probability; 1 = no cut-off (default: the config's "
                         "quality.top_p, 1 where it names none)")
    ap.add_argument("--out", help="output folder (default: runs/<stack>/samples/<time>-seed<seed>)")
    ap.add_argument("--device", help="cuda, cpu, … (default: cuda when present)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for generation on CPU (default 1: sample-by-sample steps are too small "
                         "to split; 0 = torch's default)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="weights of every generation step: fp32 (exact, default) or bf16 (rounded weights, fp32 "
                         "accumulation: faster on CPU where the fused step is built; bench/sampling.py measures both)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    from largewave.sampling import (Stack, StackError, continue_stack, parse_temperatures, reconstruct_stack,
                                    sample_stack)

    try:
        temps = parse_temperatures(args.temperature)
        nuclei = parse_temperatures(args.top_p, "top-p")
        if args.runs:
            stack = Stack.load(args.runs, device=args.device, threads=args.threads or None, verbose=True,
                               precision=args.precision)
            cfg = stack.cfg
        else:
            cfg = load_config(args.config, args.overrides)
            stack = Stack.load(cfg, device=args.device, threads=args.threads or None, precision=args.precision)
        common = dict(temperatures=temps, top_p=nuclei, seed=args.seed, out_dir=args.out, stack=stack)
        if args.reconstruct:
            seconds = 4.0 if args.seconds is None else (args.seconds or None)
            reconstruct_stack(cfg, args.reconstruct, seconds, args.start, **common)
        elif args.prompt:
            continue_stack(cfg, args.prompt, 8.0 if args.seconds is None else args.seconds, args.count,
                           prompt_seconds=args.prompt_seconds, **common)
        else:
            sample_stack(cfg, 4.0 if args.seconds is None else args.seconds, args.count, **common)
    except (ConfigError, StackError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
