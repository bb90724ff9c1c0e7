"""Train one level of a stack (DeepSpeed ZeRO; CPU or GPU; one process or many).

    largewave train --stack demo --level 1                       # one process
    largewave train --stack demo --level 1 level1.train.steps=50 level1.optim.lr=3e-4
    torchrun --nproc_per_node 2 -m largewave train --stack demo --level 1  # 2 ranks (also deepspeed / srun)

Rerunning the same command resumes from the run's latest complete checkpoint: the run folder
``runs/<stack>/<level>/<signature>/`` is named from the config (see largewave/engine/run_folder.py).

Exit codes: 0 done · 2 bad config or missing data (nothing started), or a remote shard that
cannot be fetched intact · 3 stopped on request
(SIGUSR2/SIGTERM) after a complete checkpoint: rerun / requeue · 4 diverged (non-finite losses).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from largewave.cli import add_stack
from largewave.config import ConfigError, load_config


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + "\nOverrides are key.sub=value; a level name may drop the "
        "'levels.' prefix (level1.train.crop=8192).")
    add_stack(ap)
    ap.add_argument("--level", default="1", help="level to train: 1, 2, … or prior (default: 1)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config and data, print derived quantities and the run folder, then exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return ap.parse_args(argv)


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.stack, args.overrides)
        level = cfg.level(args.level)  # unknown level → ConfigError naming the stack's levels
        del level
        from largewave.config import _level_key
        from largewave.data.loader import ShardFetchError, original_message
        from largewave.engine.trainer import EXIT_CONFIG, EXIT_NONFINITE, NonFiniteLossError, Trainer

        trainer = Trainer(cfg, _level_key(args.level), argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        d = cfg.derived(trainer.level)
        for k, v in d.items():
            print(f"{k:>24}: {v}")
        print(f"{'run folder':>24}: {trainer.run_dir}")
        return 0
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ConfigError as e:  # found only once ranks exist (e.g. data too small for the world size)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ShardFetchError as e:  # a remote shard that cannot be fetched intact (also from a loader worker)
        print(f"error: {original_message(e)}", file=sys.stderr)
        return EXIT_CONFIG
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
