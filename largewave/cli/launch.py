"""Submit largewave training to Slurm (or run it on this machine): one command per level.

    largewave launch --level 1 --nodes 8 --gpus-per-node 8 --partition gpu --time 2-00:00:00
    largewave launch --level 2            # precomputes level-1 codes first if they are missing
    largewave launch --level all          # level 1 → codes → level 2 → codes → prior → samples
    largewave launch --level 1 --dry-run  # print the sbatch script and resolved config only
    largewave launch --status | --list | --cancel

Without a Slurm controller (``sinfo`` fails) the jobs run on this machine through submitit's
local executor, waiting for each to finish: that is the embedded default. A job that is
preempted or reaches its time limit saves a checkpoint and requeues itself; relaunching the
same command resumes the same run (same run folder, same W&B run).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


from largewave import cluster as cl
from largewave.cli import add_stack, invocation
from largewave.config import ConfigError, dump_yaml, load_config


def parse_args(argv=None, prog: str | None = None):
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + "\nConfig overrides: key.sub=value, e.g. level1.optim.lr=1e-4",
    )
    what = ap.add_argument_group("what to run")
    what.add_argument("--level", help="level to train: 1, 2, …, prior, or all (the whole chain)")
    add_stack(what)
    what.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    where = ap.add_argument_group("where and how big")
    where.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local", "debug"],
                       help="auto: Slurm when a controller answers (sinfo succeeds), else this machine")
    where.add_argument("--nodes", type=int, default=1)
    where.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    where.add_argument("--tasks-per-node", type=int, default=None,
                       help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    where.add_argument("--cpus-per-task", type=int, default=None)
    where.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    where.add_argument("--partition", default=None)
    where.add_argument("--time", default="4:00:00", help="time limit per job (HH:MM:SS, D-HH:MM:SS, 90m, 4h)")
    where.add_argument("--account", default=None)
    where.add_argument("--qos", default=None)
    where.add_argument("--constraint", default=None)
    where.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line run in the job before training (repeatable), e.g. 'source venv/bin/activate'")
    where.add_argument("--code-tasks", type=int, default=None,
                       help="array tasks for code precompute (default: 8 on Slurm, 1 on this machine)")
    where.add_argument("--samples", type=int, default=2, help="clips sampled at the end of --level all")
    where.add_argument("--sample-seconds", type=float, default=4.0, help="length of each sampled clip")
    act = ap.add_argument_group("actions")
    act.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and resolved config; submit nothing")
    act.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                     help="wait for the jobs to finish (default: yes on this machine, no on Slurm)")
    act.add_argument("--status", action="store_true", help="state of the stack's latest job per level, with log tails of failures")
    act.add_argument("--list", action="store_true", help="every job submitted for the stack")
    act.add_argument("--cancel", nargs="?", const="all", metavar="JOBID", help="cancel the stack's running jobs (or one)")
    args = ap.parse_args(argv)
    if not (args.level or args.status or args.list or args.cancel):
        ap.error("say what to do: --level N|prior|all, or --status, --list, --cancel")
    return args


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.stack, args.overrides)
        res = cl.Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                           cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, partition=args.partition,
                           time_min=cl.parse_time(args.time), account=args.account, qos=args.qos,
                           constraint=args.constraint, setup=args.setup)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from largewave import launcher

    try:
        if args.status:
            return launcher.status(cfg)
        if args.list:
            return launcher.list_jobs(cfg)
        if args.cancel:
            return launcher.cancel_jobs(cfg, None if args.cancel == "all" else args.cancel)
        cluster = "slurm" if args.dry_run and args.cluster == "auto" else cl.resolve_cluster(args.cluster)
        code_tasks = args.code_tasks or (8 if cluster == "slurm" else 1)
        plan = launcher.plan(cfg, args.level, code_tasks=code_tasks, samples=args.samples,
                             sample_seconds=args.sample_seconds)
        if args.dry_run:
            print(f"# resolved config ({cfg.stack})\n{dump_yaml(cfg)}")
            launcher.print_derived(cfg, res.world_size)
            for i, step in enumerate(plan):
                print(f"\n# ---- {step.describe()} ----")
                print(launcher.sbatch_for(step, cfg, res, dependency="afterok:<job of the step above>" if i else None))
            return 0
        wait = args.wait if args.wait is not None else cluster != "slurm"
        rc, _ = launcher.submit(plan, cfg, args.stack, args.overrides, res, cluster, wait=wait,
                                command=shlex.join([*invocation(prog, "largewave launch"),
                                                    *(argv if argv is not None else sys.argv[1:])]))
        return rc
    except launcher.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
