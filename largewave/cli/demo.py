"""The embedded default: the whole demo stack, end to end, on this machine (or your cluster).

    largewave demo              # 20 minutes of rendered piano → shards → level 1 → codes →
                                       # level 2 → codes → prior → samples + a reconstruction
    largewave demo --smoke      # a minute of piano, 300 level-1 steps and a few for the levels
                                       # above: checks that it all runs and passes a smoke-scale gate
    largewave demo --long       # the same corpus, a wider level 1 trained longer (about an
                                       # hour on 2 cores), gated on the full quality targets
    largewave demo data.demo_minutes=5 level1.train.steps=200   # any config override

The stack runs through ``largewave launch --level all`` (submitit's local executor when no Slurm
controller answers), so every stage is cached and resumable: rerunning continues where it
stopped. At the end it reconstructs a validation clip through the levels and prints a quality
summary — per level the validation bits/token, the shuffled-codes gap and the reconstruction
figures against their chance and noise baselines, the samples against the corpus — checked against
the floors in the config's ``quality.gate`` (exit 1 when one is missed), and the paths of the WAV
files.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path


from largewave.cli import add_stack, child_env, python_command
from largewave.config import ConfigError, load_config

SAMPLE_SECONDS = 4.0
# Every level trains on this many local ranks (one thread each), on any machine: the recipe is
# fixed in steps and in global batch (ranks × micro_batch), so a machine with fewer cores takes
# longer but trains the same model.
RANKS = 2
SMOKE_LEVEL1 = ["level1.train.steps=300", "level1.train.eval_every=300", "level1.train.sample_every=300",
                "level1.train.save_every=100",
                "level1.optim.warmup_steps=20"]
# What --smoke changes: its own stack name (own data/ and runs/ folders), a minute of piano and a
# few steps for the levels above level 1, and a smoke-scale quality gate (see SMOKE_LEVEL1 below).
SMOKE_OVERRIDES = [
    "stack=demo-smoke", "data.demo_minutes=1", "data.segment_seconds=10",
    *[f"{level}.{key}" for level in ("level1", "level2", "prior")
      for key in ("train.steps=8", "train.eval_every=8", "train.sample_every=8", "train.save_every=4",
                  "train.eval_batches=2", "train.sample_clips=1", "train.sample_seconds=0.25", "optim.warmup_steps=2",
                  "train.eval_clips=1", "train.eval_clip_seconds=0.25")],
    # level 1 gets the steps that the smoke-scale floor needs: it uses its codes (gap > 0) and its
    # reconstructions beat equal-RMS noise on LSD
    *SMOKE_LEVEL1,
    "quality.clips=2", "quality.clip_seconds=1.0",
    "quality.gate.level1.gap_bits=0", "quality.gate.level1.lsd_beats_noise=true",
    *[f"quality.gate.level1.{k}=null" for k in ("lsd_db", "flatness_excess_db", "pitch_class")],
    "quality.gate.level1.beat_noise=false", "quality.gate.level1.beat_chance=false",
    "quality.gate.level2.gap_bits=null", "quality.gate.level2.beat_chance=false",
    "quality.gate.prior.centroid_ratio=null", "quality.gate.prior.flatness_db=null",
]

# What --long changes: its own stack name (the same corpus, its own runs and codes), every level
# trained longer, and the full quality targets as its gate. About an hour on 2 cores.
LONG_OVERRIDES = [
    "stack=demo-long", "data.raw_dir=data/demo/raw", "data.shards=data/demo/audio",
    "level1.train.steps=6000", "level1.train.eval_every=1000", "level1.train.sample_every=6000",
    "level1.train.save_every=500",
    "level2.train.steps=3200", "level2.train.eval_every=800", "level2.train.sample_every=3200",
    "level2.train.save_every=500",
    "prior.train.steps=1200", "prior.train.eval_every=400", "prior.train.sample_every=1200",
    "prior.train.save_every=500",
    # a level 1 trained this long is confident enough that any nucleus cut-off makes its output fade
    # (6,000 steps: LSD 10.0 dB at top-p 1, 20.8 dB at 0.95, the output 8 dB quieter): sample it whole
    "quality.top_p.level1=1.0",
    # the targets: level-1 reconstructions close to the input, a level 2 that uses its codes, prior
    # samples with the corpus' spectrum
    "quality.gate.level1.lsd_db=9", "quality.gate.level1.flatness_excess_db=4", "quality.gate.level1.pitch_class=0.95",
    "quality.gate.level1.beat_noise=true", "quality.gate.level1.beat_chance=true",
    "quality.gate.level2.gap_bits=0.3", "quality.gate.level2.beat_chance=true",
    "quality.gate.prior.centroid_ratio=1.5", "quality.gate.prior.flatness_db=8",
]


def run_stack(config: str, overrides: list[str], cluster: str, seconds: float, ranks: int = RANKS
              ) -> tuple[int, list[tuple[str, float]]]:
    """``largewave launch --level all`` with its output streamed; returns (status, [(stage, seconds)])."""
    cmd = [*python_command("launch"), "--stack", config, "--level", "all", "--cluster", cluster, "--wait",
           "--tasks-per-node", str(ranks), "--sample-seconds", f"{seconds:g}", *overrides]
    print(f"=== {shlex.join(['largewave', *cmd[3:]])}", flush=True)
    timings = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.match(r"\s+(.+?) done in (\d+) s", line)
        if m:
            timings.append((m.group(1), float(m.group(2))))
    rc = proc.wait()
    timings.append(("whole stack", time.time() - t0))
    return rc, timings


def newest_samples(cfg) -> list[str]:
    summaries = sorted((Path(cfg.run.root) / cfg.stack / "samples").glob("*/summary.json"),
                       key=lambda p: p.stat().st_mtime)
    for p in reversed(summaries):
        s = json.loads(p.read_text())
        if s.get("mode") == "sample":
            return list(s["paths"])
    return []


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack(ap)
    ap.add_argument("--smoke", action="store_true", help="a minute of piano, 300 level-1 steps and a few for the levels above, a smoke-scale gate "
                         "(what CI runs)")
    ap.add_argument("--long", action="store_true",
                    help="the long variant: every level trained longer (about an hour on 2 cores), gated on the full "
                         "quality targets")
    ap.add_argument("--ranks", type=int, default=RANKS,
                    help=f"ranks (processes) per training job, one thread each (default {RANKS}: the recipe's global "
                         f"batch is ranks × micro_batch, so keep it to reproduce the demo's figures)")
    ap.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local"],
                    help="where the stages run (default auto: Slurm when a controller answers, else this machine)")
    ap.add_argument("--seconds", type=float, default=None, help=f"length of the samples (default {SAMPLE_SECONDS:g}; smoke 1)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)

    if args.smoke and args.long:
        ap.error("--smoke and --long are different recipes: give one")
    if args.ranks < 1:
        ap.error(f"--ranks {args.ranks} must be >= 1")
    overrides = (SMOKE_OVERRIDES if args.smoke else LONG_OVERRIDES if args.long else []) + list(args.overrides)
    seconds = args.seconds or (1.0 if args.smoke else SAMPLE_SECONDS)
    try:
        cfg = load_config(args.stack, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rc, timings = run_stack(args.stack, overrides, args.cluster, seconds, args.ranks)
    if rc != 0:
        print(f"\nerror: the demo stack stopped (exit {rc}); fix the problem above and rerun the same command: "
              f"finished stages are kept.", file=sys.stderr)
        return rc

    from largewave.data.manifest import read_manifest
    from largewave.report import stack_report
    from largewave.sampling import reconstruct_stack

    t0 = time.time()
    valid = read_manifest(cfg.path(cfg.data.shards)).shards("valid")[0]
    key, length = valid.keys[0], valid.lengths[0] / cfg.audio.sample_rate
    start = max(0.0, min(length - seconds, length / 2 - seconds / 2))  # mid-piece: renders begin with silence
    rec = reconstruct_stack(cfg, key, seconds=seconds, start=start, seed=0, log=None)
    timings.insert(-1, ("reconstruction", time.time() - t0))
    samples = newest_samples(cfg)
    t0 = time.time()
    report = stack_report(cfg, samples, expected_seconds=seconds)
    timings.insert(-1, ("quality summary", time.time() - t0))

    print("\n=== demo finished" + (" (smoke)" if args.smoke else " (long)" if args.long else ""))
    for name, dt in timings:
        print(f"  {name:<30} {dt:8.0f} s")
    print(report.format())
    print("\nsamples:\n" + "\n".join(f"  {p}" for p in samples))
    print(f"reconstruction of valid clip {key} from {start:.1f} s (original, then decoded from each level's codes):\n"
          + "\n".join(f"  {p}" for p in rec.paths))
    print(f"runs, checkpoints, exports, W&B: {Path(cfg.run.root) / cfg.stack}/")
    if not report.ok:
        print("\nerror: the quality checks marked FAIL above did not pass", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
