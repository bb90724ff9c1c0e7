"""Cluster side of the launcher: which executor, what resources, and a record of submitted jobs.

Everything Slurm- and submitit-specific lives here and in :mod:`largewave.jobs`; training code
only reads the distributed environment (:mod:`largewave.distributed`).

Executors:

- ``slurm``: submitit's SlurmExecutor: one sbatch job, one task per GPU (``--gpus-per-node``
  tasks per node), each task one DeepSpeed rank. The job asks Slurm for SIGUSR2
  ``signal_delay_s`` before its time limit; the training loop saves and requeues (see
  :mod:`largewave.jobs`).
- ``local``: submitit's LocalExecutor on this machine (the embedded default when no Slurm
  controller answers); ``--tasks-per-node`` processes become the ranks.
- ``debug``: submitit's DebugExecutor, in this process (for pdb).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import submitit

SIGNAL_DELAY_S = 120  # SIGUSR2 this long before the time limit: enough for a ZeRO save
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "FINISHED", "DONE", "INTERRUPTED", "UNKNOWN"}


def slurm_available(timeout: float = 15.0) -> bool:
    """True when a Slurm controller answers (``sinfo`` succeeds), not merely when sbatch is installed."""
    if shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError):
        return False
    return r.returncode == 0


def resolve_cluster(requested: str) -> str:
    if requested == "auto":
        return "slurm" if slurm_available() else "local"
    return requested


def parse_time(text: str) -> int:
    """Slurm-style time (``MM``, ``HH:MM:SS``, ``D-HH:MM``, ``D-HH:MM:SS``, ``90m``, ``4h``) → minutes."""
    t = str(text).strip()
    try:
        if t.endswith("m"):
            return max(1, int(float(t[:-1])))
        if t.endswith("h"):
            return max(1, int(float(t[:-1]) * 60))
        days = 0
        if "-" in t:
            d, t = t.split("-", 1)
            days = int(d)
            parts = [int(p) for p in t.split(":")]
            parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
            h, m, s = parts
        else:
            parts = [int(p) for p in t.split(":")]
            if len(parts) == 1:
                h, m, s = 0, parts[0], 0
            elif len(parts) == 2:
                h, m, s = 0, parts[0], parts[1]
            elif len(parts) == 3:
                h, m, s = parts
            else:
                raise ValueError
    except ValueError:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM:SS, D-HH:MM:SS, 90m or 4h") from None
    minutes = days * 1440 + h * 60 + m + (1 if s else 0)
    if minutes < 1:
        raise ValueError(f"--time {text!r} is shorter than a minute")
    return minutes


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0  # 0 on CPU clusters / this machine
    tasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    partition: Optional[str] = None
    time_min: int = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, venv)
    signal_delay_s: int = SIGNAL_DELAY_S

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes} must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node} must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node {self.tasks_per_node} must be >= 1")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"one task per GPU: --tasks-per-node {self.tasks_per_node} differs from "
                             f"--gpus-per-node {self.gpus_per_node}")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


class _ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that only writes sbatch text (``--dry-run``): submitit's own executor refuses
    to exist where ``srun`` is not on PATH, but previewing a script needs no Slurm at all."""

    @classmethod
    def affinity(cls) -> int:
        return 2

    def _internal_process_submissions(self, delayed_submissions):
        raise RuntimeError("a dry-run executor cannot submit")


def make_executor(cluster: str, folder: Path, res: Resources, name: str, dependency: Optional[str] = None,
                  array_parallelism: Optional[int] = None, single_task: bool = False, dry_run: bool = False):
    """A submitit executor for ``cluster`` (slurm | local | debug) with these resources.

    ``single_task`` gives one task (code precompute array members, sampling) whatever the GPUs.
    ``dry_run`` (Slurm only) makes an executor that renders the sbatch script and needs no Slurm
    binaries on this machine.
    """
    folder = Path(folder)
    ntasks = 1 if single_task else res.ntasks_per_node
    nodes = 1 if single_task else res.nodes
    if cluster == "slurm":
        cls = _ScriptOnlySlurmExecutor if dry_run else submitit.SlurmExecutor
        ex = cls(folder=folder, max_num_timeout=10_000)  # we requeue ourselves; no silent cap
        params = dict(job_name=name, nodes=nodes, ntasks_per_node=ntasks, time=res.time_min,
                      signal_delay_s=res.signal_delay_s, stderr_to_stdout=True,
                      additional_parameters={"requeue": True}, setup=list(res.setup) or None)
        if res.gpus_per_node:
            params["gpus_per_node"] = 1 if single_task else res.gpus_per_node
        for key, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos),
                           ("constraint", res.constraint), ("cpus_per_task", res.cpus_per_task),
                           ("dependency", dependency)):
            if value:
                params[key] = value
        if res.mem_gb:
            params["mem"] = f"{int(res.mem_gb)}GB"
        if array_parallelism:
            params["array_parallelism"] = array_parallelism
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=ntasks, nodes=1,
                             signal_delay_s=min(res.signal_delay_s, 60))
        return ex
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise ValueError(f"--cluster {cluster!r}: expected auto, slurm, local or debug")


def sbatch_script(executor) -> str:
    """The sbatch script submitit would submit (for ``--dry-run``)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ------------------------------------------------------------------------------------------
# Job record: runs/<stack>/jobs.jsonl — what --status, --list and --cancel read.
# ------------------------------------------------------------------------------------------


@dataclass
class JobRecord:
    job_id: str
    kind: str  # train | codes | sample | pbt
    level: str
    cluster: str
    folder: str  # submitit folder (logs, pickles)
    command: str  # how to resubmit
    submitted: float = field(default_factory=time.time)
    depends_on: Optional[str] = None
    run_dir: Optional[str] = None
    tasks: int = 1


def jobs_file(runs_root: str | Path, stack: str) -> Path:
    return Path(runs_root) / stack / "jobs.jsonl"


def record_job(runs_root: str | Path, stack: str, rec: JobRecord) -> None:
    p = jobs_file(runs_root, stack)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(asdict(rec)) + "\n")


def read_jobs(runs_root: str | Path, stack: str) -> list[JobRecord]:
    p = jobs_file(runs_root, stack)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(JobRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut by a crash mid-write: skip it, keep the rest
    return out


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id → Slurm state, from sacct (accounting) with squeue as a fallback."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                jid, _, state = line.partition("|")
                states[jid.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
    except (subprocess.SubprocessError, OSError):
        pass
    missing = [j for j in job_ids if j not in states]
    if missing:
        try:
            r = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(missing)],
                               capture_output=True, text=True, timeout=30)
            for line in r.stdout.splitlines():
                jid, _, state = line.partition("|")
                states[jid.strip()] = state.strip()
        except (subprocess.SubprocessError, OSError):
            pass
    return states


def job_state(rec: JobRecord) -> str:
    if rec.cluster == "slurm":
        states = slurm_states([rec.job_id])
        if rec.job_id in states:
            return states[rec.job_id]
        # an array job: summarise its members
        members = {k: v for k, v in states.items() if k.startswith(rec.job_id + "_")}
        return ",".join(sorted(set(members.values()))) or "UNKNOWN"
    try:
        job = submitit.LocalJob(folder=rec.folder, job_id=rec.job_id, tasks=list(range(rec.tasks)))
        return job.state
    except Exception:  # a local job of an earlier session: its process handle is gone
        return "UNKNOWN"


def log_paths(rec: JobRecord) -> list[Path]:
    folder = Path(rec.folder)
    return sorted(folder.glob(f"{rec.job_id}_*_log.out")) + sorted(folder.glob(f"{rec.job_id}_*_log.err"))


def log_tail(rec: JobRecord, lines: int = 30) -> str:
    chunks = []
    for p in log_paths(rec):
        text = p.read_text(errors="replace").splitlines()
        if text:
            chunks.append(f"--- {p}\n" + "\n".join(text[-lines:]))
    return "\n".join(chunks) if chunks else f"(no log files yet in {rec.folder})"


def cancel(rec: JobRecord) -> bool:
    if rec.cluster == "slurm":
        return subprocess.run(["scancel", rec.job_id], capture_output=True).returncode == 0
    try:
        submitit.LocalJob(folder=rec.folder, job_id=rec.job_id, tasks=list(range(rec.tasks))).cancel()
        return True
    except Exception:
        try:
            os.kill(int(rec.job_id), 15)
            return True
        except (ValueError, OSError):
            return False
