"""Plans and submits a stack's jobs: training per level, code precompute, sampling, with chaining.

``plan(cfg, "2")`` → the steps needed to train level 2: the code precompute of level 1 when its
codes are missing or stale, then training. ``submit`` turns steps into submitit jobs: on Slurm
each step depends on the previous one (``afterok``); on this machine they run one after another.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from largewave import cluster as cl
from largewave.config import StackConfig, _level_key

POLL_S = 5.0


class LaunchError(RuntimeError):
    """A launch that cannot go ahead; the message says why and what to do."""


@dataclass
class Step:
    kind: str  # train | codes | sample
    level: str
    tasks: int = 1  # array size for codes
    seconds: float = 4.0
    count: int = 1

    def describe(self) -> str:
        if self.kind == "train":
            return f"train {self.level}"
        if self.kind == "codes":
            return f"codes of {self.level} ({self.tasks} array tasks)"
        if self.kind == "shards":
            return "audio shards"
        return f"sample {self.count} × {self.seconds:g} s"


def _level_name(cfg: StackConfig, level: str) -> str:
    key = _level_key(level)
    if key not in cfg.levels:
        raise LaunchError(f"stack {cfg.stack!r} has no level {level!r}; it has {', '.join(cfg.levels)} (or 'all')")
    return key


def plan(cfg: StackConfig, level: str, code_tasks: int = 8, samples: int = 2, sample_seconds: float = 4.0) -> list[Step]:
    from largewave import stack

    names = cfg.level_names()
    if level == "all":
        steps: list[Step] = []
        if not stack.audio_ready(cfg):
            steps.append(Step("shards", "audio"))
        for i, name in enumerate(names):
            steps.append(Step("train", name))
            if i < len(names) - 1:
                steps.append(Step("codes", name, tasks=code_tasks))
        steps.append(Step("sample", names[-1], seconds=sample_seconds, count=samples))
        return steps
    name = _level_name(cfg, level)
    below = cfg.below(name)
    steps = []
    if below is not None:
        ok, reason = stack.codes_status(cfg, below)
        if not ok:
            if not stack.export_path(cfg, below).exists():
                raise LaunchError(f"{name} trains on the codes of {below}, which are {reason}, and {below} has no "
                                  f"trained export yet ({stack.export_path(cfg, below)}): train it first "
                                  f"(--level {below.removeprefix('level')}) or run the whole chain (--level all)")
            steps.append(Step("codes", below, tasks=code_tasks))
    steps.append(Step("train", name))
    return steps


def _job_for(step: Step, config: str, overrides: list[str]):
    from largewave.jobs import CodesJob, SampleJob, ShardsJob, TrainJob

    if step.kind == "shards":
        return ShardsJob(config=config, overrides=list(overrides))
    if step.kind == "train":
        return TrainJob(config=config, overrides=list(overrides), level=step.level)
    if step.kind == "codes":
        return CodesJob(config=config, overrides=list(overrides), level=step.level, count=step.tasks)
    return SampleJob(config=config, overrides=list(overrides), seconds=step.seconds, count=step.count)


def _folder(cfg: StackConfig, step: Step) -> Path:
    return Path(cfg.run.root) / cfg.stack / "submitit" / f"{step.kind}-{step.level}" / "%j"


def _executor(step: Step, cfg: StackConfig, res: cl.Resources, cluster: str, dependency: Optional[str] = None,
              dry_run: bool = False):
    name = f"lw-{cfg.stack}-{step.kind}-{step.level}"
    return cl.make_executor(cluster, _folder(cfg, step), res, name, dependency=dependency,
                            single_task=step.kind != "train", dry_run=dry_run)


def sbatch_for(step: Step, cfg: StackConfig, res: cl.Resources, dependency: Optional[str] = None) -> str:
    """The sbatch script of one step, as it would be submitted to Slurm."""
    ex = _executor(step, cfg, res, "slurm", dependency=dependency, dry_run=True)
    if step.kind == "codes":
        ex.parameters["map_count"] = step.tasks
    return cl.sbatch_script(ex)


def print_derived(cfg: StackConfig, world_size: int) -> None:
    for name in cfg.level_names():
        d = cfg.derived(name, world_size)
        code = f", codes at {d['code_rate_hz']:g} Hz" if d["code_rate_hz"] else ""
        print(f"# {name}: receptive field {d['receptive_field_tokens']} tokens = {d['receptive_field_ms']:.1f} ms of audio, "
              f"hop {d['hop']}{code}, effective batch {d['effective_batch']} "
              f"({d['audio_seconds_per_step']:.1f} s of audio per step on {world_size} ranks)")


def preflight(plan_steps: list[Step], cfg: StackConfig) -> None:
    """Refuse, before anything is submitted, a first step whose input data cannot work."""
    from largewave.config import ConfigError
    from largewave.engine.trainer import preflight as train_preflight

    first = plan_steps[0]
    if first.kind == "train":
        try:
            train_preflight(cfg, first.level)
        except ConfigError as e:
            raise LaunchError(str(e)) from None


def submit(plan_steps: list[Step], cfg: StackConfig, config: str, overrides: list[str], res: cl.Resources,
           cluster: str, wait: bool, command: str) -> tuple[int, list[tuple[str, float]]]:
    """Submit the steps, each after the previous one (``afterok`` on Slurm; in turn on this machine).

    Returns (exit status, [(step, seconds)] for the steps waited for)."""
    from largewave import stack

    preflight(plan_steps, cfg)
    print_derived(cfg, res.world_size)
    previous: Optional[str] = None
    timings: list[tuple[str, float]] = []
    for step in plan_steps:
        dependency = f"afterok:{previous}" if (cluster == "slurm" and previous) else None
        ex = _executor(step, cfg, res, cluster, dependency=dependency)
        fn = _job_for(step, config, overrides)
        t0 = time.time()
        if step.kind == "codes":
            handle = ex.map_array(fn, list(range(step.tasks)))
            job_id = handle[0].job_id.split("_")[0] if cluster == "slurm" else handle[0].job_id
        else:
            handle = ex.submit(fn)
            job_id = handle.job_id
        folder = Path(str(_folder(cfg, step)).replace("%j", str(job_id)))
        rec = cl.JobRecord(job_id=str(job_id), kind=step.kind, level=step.level, cluster=cluster, folder=str(folder),
                           command=command, depends_on=previous, tasks=res.world_size if step.kind == "train" else 1)
        cl.record_job(cfg.run.root, cfg.stack, rec)
        print(f"submitted {step.describe()}: job {job_id} on {cluster}" + (f" (after {previous})" if dependency else ""),
              flush=True)
        print(f"  logs: {folder}/", flush=True)
        below = cfg.below(step.level) if step.kind == "train" else None
        if step.kind == "train" and (below is None or stack.export_path(cfg, below).exists()):
            print(f"  run folder: {stack.run_dir(cfg, step.level)}", flush=True)
        previous = str(job_id)
        if cluster != "slurm" or wait:
            rc = _wait(step, handle, rec, command)
            timings.append((step.describe(), time.time() - t0))
            if rc != 0:
                return rc, timings
    if cluster == "slurm" and not wait:
        print(f"\nfollow with: largewave launch --stack {config} --status")
    return 0, timings


def _wait(step: Step, handle, rec: cl.JobRecord, command: str) -> int:
    """Wait for a job (or array) and surface failures with the tail of its log."""
    handles = handle if isinstance(handle, list) else [handle]
    t0 = time.time()
    for h in handles:
        try:
            out = h.results()
        except Exception as e:  # submitit raises FailedJobError / UncompletedJobError with the traceback
            print(f"\nerror: {step.describe()} (job {h.job_id}) failed after {time.time() - t0:.0f} s", file=sys.stderr)
            msg = str(e).strip().splitlines()
            print("\n".join(msg[-25:]), file=sys.stderr)
            print(f"\nlog: {rec.folder}\nresubmit with: {command}", file=sys.stderr)
            return 1
        summary = out[0] if isinstance(out, list) and out else out
        if isinstance(summary, dict) and "run_dir" in summary:  # a training's result
            summary = (f"step {summary['step']}/{summary['steps']}, run folder {summary['run_dir']}"
                       + (f", W&B {summary['wandb']}" if summary.get("wandb") else ""))
        if summary and len(handles) == 1:
            print(f"  {step.describe()} done in {time.time() - t0:.0f} s: {summary}", flush=True)
    if len(handles) > 1:
        print(f"  {step.describe()} done in {time.time() - t0:.0f} s", flush=True)
    return 0


def _latest_per_level(records: list[cl.JobRecord]) -> dict[tuple[str, str], cl.JobRecord]:
    latest: dict[tuple[str, str], cl.JobRecord] = {}
    for r in records:
        latest[(r.kind, r.level)] = r
    return latest


def status(cfg: StackConfig) -> int:
    from largewave import stack

    records = cl.read_jobs(cfg.run.root, cfg.stack)
    if not records:
        print(f"no jobs recorded for stack {cfg.stack} (in {cl.jobs_file(cfg.run.root, cfg.stack)})")
    for (kind, level), rec in _latest_per_level(records).items():
        state = cl.job_state(rec)
        line = f"{kind:<6} {level:<7} job {rec.job_id:<12} {state}"
        if kind == "train":
            step = stack.latest_step(cfg, level)
            line += f"   checkpoint: {'step ' + str(step) if step is not None else 'none yet'}"
        print(line)
        if state.split(",")[0] in {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "INTERRUPTED"}:
            print(cl.log_tail(rec, 20))
            print(f"resubmit with: {rec.command}")
    for name in cfg.level_names()[:-1]:
        ok, reason = stack.codes_status(cfg, name)
        print(f"codes  {name:<7} {'ready' if ok else reason}")
    infos = latest_runs(cfg)
    if infos:
        from largewave import runs

        print("\nlatest run of each level (largewave runs RUN for one, with its curves):")
        print(runs.format_table(infos))
    return 0


def latest_runs(cfg: StackConfig) -> list:
    """Per level, the run this config trains (its signature's folder) when it exists, else the level's
    newest run folder."""
    from largewave import runs, stack

    out = []
    for level in cfg.level_names():
        try:
            mine = stack.run_dir(cfg, level)
        except Exception:  # a level above whose codes are not made yet has no signature
            mine = None
        if mine is not None and (mine / "signature.json").exists():
            out.append(runs.load_run(mine))
            continue
        found = [runs.load_run(p.parent) for p in (Path(cfg.run.root) / cfg.stack / level).glob("*/signature.json")]
        if found:
            out.append(max(found, key=lambda r: r.updated))
    return out


def list_jobs(cfg: StackConfig) -> int:
    records = cl.read_jobs(cfg.run.root, cfg.stack)
    states = cl.slurm_states([r.job_id for r in records if r.cluster == "slurm"])
    print(f"{'job':<12} {'kind':<6} {'level':<7} {'cluster':<7} {'submitted':<19} state")
    for r in records:
        state = states.get(r.job_id) or cl.job_state(r)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.submitted))
        print(f"{r.job_id:<12} {r.kind:<6} {r.level:<7} {r.cluster:<7} {when:<19} {state}")
    return 0


def cancel_jobs(cfg: StackConfig, job_id: Optional[str]) -> int:
    records = cl.read_jobs(cfg.run.root, cfg.stack)
    targets = [r for r in records if job_id in (None, r.job_id)]
    if job_id and not targets:
        raise LaunchError(f"job {job_id} is not one of stack {cfg.stack}'s jobs (see --list)")
    n = 0
    for r in targets:
        state = cl.job_state(r).split(",")[0]
        if state in cl.FINISHED_STATES and state != "UNKNOWN":
            continue
        if cl.cancel(r):
            n += 1
            print(f"cancelled {r.kind} {r.level} job {r.job_id}")
    print(f"{n} job(s) cancelled")
    return 0


def resubmit_hint(config: str, overrides: list[str], level: str) -> str:
    return shlex.join(["largewave", "launch", "--stack", config, "--level", level, *overrides])
