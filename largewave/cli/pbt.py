"""Population based training of one level (the paper's recipe for VQ-VAE levels).

    largewave pbt --stack piano --level 1 --members 8 --rounds 20 --interval 2000 \\
        --gpus-per-node 8 --partition gpu level1.quantiser.kind=vqvae
    largewave pbt --stack demo --level 1 --members 3 --rounds 2 --interval 20   # on this machine

Each round trains every member for --interval steps (one job per member, in parallel), scores
them on validation (bits/token plus a penalty for unused codes), and lets the bottom --fraction
copy a top member's checkpoint with perturbed hyperparameters. Rerunning the same command
continues after the last finished round. See largewave/pbt.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


from largewave import cluster as cl
from largewave.cli import add_stack, invocation
from largewave.config import ConfigError, _level_key, load_config


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    add_stack(ap)
    ap.add_argument("--level", default="1", help="the level to train (default: 1)")
    ap.add_argument("--name", default="pbt", help="population name: runs/<stack>/pbt/<name>/ (default: pbt)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--interval", type=int, default=100, help="training steps per round")
    ap.add_argument("--fraction", type=float, default=0.25, help="bottom fraction that copies the top fraction")
    ap.add_argument("--usage-weight", type=float, default=1.0,
                    help="bits/token added to the score for a fully unused codebook (default 1)")
    ap.add_argument("--explore", default=None,
                    help="comma-separated hyperparameters to explore (default: lr + the quantiser's: "
                         "commitment_weight, decay for VQ-VAE; diversity_weight for AMAE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local"])
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--tasks-per-node", type=int, default=None)
    ap.add_argument("--cpus-per-task", type=int, default=None)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", default="4:00:00", help="time limit of one member-round job")
    ap.add_argument("--account", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--constraint", default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    from largewave.pbt import PBT, PBTConfig

    try:
        cfg = load_config(args.stack, args.overrides)
        level = _level_key(args.level)
        cfg.level(level)
        pc = PBTConfig(name=args.name, members=args.members, rounds=args.rounds, interval=args.interval,
                       fraction=args.fraction, usage_weight=args.usage_weight, seed=args.seed)
        res = cl.Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                           cpus_per_task=args.cpus_per_task, partition=args.partition,
                           time_min=cl.parse_time(args.time), account=args.account, qos=args.qos,
                           constraint=args.constraint)
        pbt = PBT(cfg, level, pc, space=args.explore.split(",") if args.explore else None)
        from largewave.engine.trainer import preflight

        preflight(cfg, level)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cluster = cl.resolve_cluster(args.cluster)
    command = shlex.join([*invocation(prog, "largewave pbt"), *(argv if argv is not None else sys.argv[1:])])

    from largewave.jobs import TrainJob

    def run_round(members, rnd, overrides_of):
        jobs = []
        for m in members:
            folder = pbt.root / "submitit" / f"round-{rnd:03d}-member-{m.index:02d}" / "%j"
            ex = cl.make_executor(cluster, folder, res, f"lw-{cfg.stack}-pbt-{args.name}-m{m.index}")
            fn = TrainJob(config=args.stack, overrides=[*args.overrides, *overrides_of(m)], level=level)
            job = ex.submit(fn)
            cl.record_job(cfg.run.root, cfg.stack, cl.JobRecord(
                job_id=str(job.job_id), kind="pbt", level=f"{level}/m{m.index}", cluster=cluster,
                folder=str(folder).replace("%j", str(job.job_id)), command=command, tasks=res.world_size))
            print(f"  round {rnd + 1} member {m.index}: job {job.job_id} on {cluster}", flush=True)
            jobs.append((m, job))
        out = {}
        for m, job in jobs:
            try:
                res_ = job.results()[0]
            except Exception as e:
                raise RuntimeError(f"member {m.index} (job {job.job_id}) failed:\n{str(e)[-3000:]}\n"
                                   f"logs: {str(job.paths.folder)}\nrerun to continue: {command}") from None
            if not res_.get("eval"):
                raise RuntimeError(f"member {m.index} (job {job.job_id}) ended without a validation result")
            out[m.index] = {"metrics": res_["eval"], "checkpoint": res_["checkpoint"]}
        return out

    wandb_run = _controller_wandb(cfg, pbt, pc)
    log = (lambda data, step: wandb_run.log(data, step=step)) if wandb_run is not None else None
    t0 = time.time()
    try:
        members = pbt.run(run_round, wandb_log=log)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    best = min(members, key=lambda m: m.score)
    print(f"[pbt] done in {time.time() - t0:.0f} s: best member {best.index} (score {best.score:.3f}, "
          + ", ".join(f"{k}={v:.3g}" for k, v in best.hparams.items()) + f"); lineage in {pbt.root / 'lineage.jsonl'}")
    return 0


def _controller_wandb(cfg, pbt, pc):
    """The controller's own W&B run (lineage, scores, hyperparameters), grouped with the stack's runs."""
    from largewave.engine.wandb_log import resolve_mode

    mode = resolve_mode(cfg.run.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    (pbt.root / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.run.wandb_project, entity=cfg.run.wandb_entity, group=f"{cfg.stack}-pbt-{pc.name}",
                      name=f"{cfg.stack}-{pbt.level}-pbt-{pc.name}", dir=str(pbt.root), mode=mode,
                      config={"pbt": vars(pc), "space": pbt.space}, job_type="pbt", reinit=True)


if __name__ == "__main__":
    sys.exit(main())
