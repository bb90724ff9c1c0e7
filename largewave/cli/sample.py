"""Audio from a trained stack: samples, reconstructions through each level, continuations.

    largewave sample --stack demo --seconds 4 --count 2 --seed 0
    largewave sample --stack demo --temperature prior=0.9 --temperature level1=0.95,level2=1.0
    largewave sample --stack demo --reconstruct recording.wav --seconds 6 --start 30
    largewave sample --stack demo --reconstruct <audio-shard key>     # e.g. a valid segment
    largewave sample --stack demo --prompt opening.wav --seconds 10   # 10 s in all, prompt first
    largewave sample --runs runs/demo/level1/<sig> runs/demo/level2/<sig> runs/demo/prior/<sig>

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


from largewave.cli import add_stack, add_threads
from largewave.config import ConfigError, load_config


def _threads(n):
    """--threads for generation: auto (None) → 1, 0 → torch's default (None), else n."""
    return 1 if n is None else (n or None)


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_stack(ap)
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
    add_threads(ap)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="weights of every generation step: fp32 (exact, default) or bf16 (rounded weights, fp32 "
                         "accumulation: faster on CPU where the fused step is built; bench/sampling.py measures both)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    from largewave.sampling import (Stack, StackError, continue_stack, parse_temperatures, reconstruct_stack,
                                    sample_stack)

    try:
        temps = parse_temperatures(args.temperature)
        nuclei = parse_temperatures(args.top_p, "top-p")
        if args.runs:
            stack = Stack.load(args.runs, device=args.device, threads=_threads(args.threads), verbose=True,
                               precision=args.precision)
            cfg = stack.cfg
        else:
            cfg = load_config(args.stack, args.overrides)
            stack = Stack.load(cfg, device=args.device, threads=_threads(args.threads), precision=args.precision)
        stack.progress = not args.quiet
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
