"""What a submitted job runs: picklable callables that submitit executes on every task.

Preemption and time limits. Slurm sends SIGUSR2 ``signal_delay_s`` before the time limit (the
sbatch script asks for it), ``scancel --signal=USR2`` sends it on demand, and preemption with
PreemptMode=REQUEUE sends SIGTERM. submitit's own handler would call ``checkpoint()`` on global
rank 0 only, inside the signal handler — it cannot drive a ZeRO save, which needs every rank. So
the training loop installs its own handlers on every rank (replacing submitit's), agrees on the
stop at the next step boundary and saves collectively; then this module requeues the job:

- SIGUSR2 (time limit, or an explicit request): rank 0 runs ``scontrol requeue``; the same job id
  comes back, runs the same pickled callable, and training resumes from the checkpoint just
  written (same run folder, same W&B run id). We never let submitit count timeouts, so a long
  training is never ended by its cap.
- SIGTERM (preemption): Slurm requeues the job itself when the partition says PreemptMode=REQUEUE;
  we only save. A plain ``scancel`` also sends SIGTERM: we save and the job ends, as asked.

After a stop every task exits with :data:`STOP_EXIT_CODE` without writing a submitit result, so
the submitting side keeps waiting for the requeued run instead of reading a half-done result. A
job that finished its steps returns normally and is never requeued.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

STOP_EXIT_CODE = 3  # "stopped on request, checkpoint saved": requeue-able


def _export_dist_env_from_submitit() -> None:
    """Under submitit's local executor, map its task environment onto torchrun's variables.

    Under Slurm, :mod:`largewave.distributed` reads SLURM_* itself; the local executor has its own
    variables (SUBMITIT_LOCAL_*), translated here so that training sees one convention.
    """
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or "RANK" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                      LOCAL_WORLD_SIZE=str(max(1, env.num_tasks // max(1, env.num_nodes))),
                      MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(20000 + int(env.job_id) % 20000 if str(env.job_id).isdigit() else 29500))


def _requeue_self() -> None:
    job_id = os.environ.get("SLURM_JOB_ID")
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        job_id = f"{array_job}_{array_task}"
    if not job_id:
        return
    r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        print(f"[largewave] scontrol requeue {job_id} failed: {r.stderr.strip()}", file=sys.stderr, flush=True)
    else:
        print(f"[largewave] requeued job {job_id}; it resumes from the checkpoint just saved", flush=True)


def _exit_stopped(signal_name: Optional[str]) -> None:
    under_slurm = "SLURM_JOB_ID" in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if under_slurm and rank == 0 and signal_name == "SIGUSR2":
        _requeue_self()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: no submitit result is written, so the job does not look finished.
    os._exit(STOP_EXIT_CODE)


@dataclass
class TrainJob:
    """Train one level of a stack on every task of the job (one task = one rank)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    level: str = "level1"

    def __call__(self):
        _export_dist_env_from_submitit()
        from largewave.config import load_config
        from largewave.engine.trainer import train

        cfg = load_config(self.config, self.overrides)
        result = train(cfg, self.level)
        if result.stopped:
            _exit_stopped(result.stop_signal)
        return result.summary()


@dataclass
class CodesJob:
    """Precompute the codes of ``level`` over the shards below it: task ``index`` of ``count``."""

    config: str
    overrides: list[str] = field(default_factory=list)
    level: str = "level1"
    count: int = 1

    def __call__(self, index: int = 0):
        _export_dist_env_from_submitit()
        from largewave.config import load_config
        from largewave.codes import precompute_codes

        cfg = load_config(self.config, self.overrides)
        return precompute_codes(cfg, self.level, task_index=index, task_count=self.count)


@dataclass
class ShardsJob:
    """Build the stack's audio shards (rendering the demo piano first when ``data.source`` is demo)."""

    config: str
    overrides: list[str] = field(default_factory=list)

    def __call__(self):
        from largewave.cli import child_env, python_command

        cmd = [*python_command("shards", "build"), "--stack", self.config, *self.overrides]
        r = subprocess.run(cmd, cwd=os.getcwd(), env=child_env())
        if r.returncode != 0:
            raise RuntimeError(f"building the audio shards failed (exit {r.returncode}): see the output above")
        return "audio shards ready"


@dataclass
class SampleJob:
    """Sample audio from a trained stack (prior → decoders → waveform)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    seconds: float = 4.0
    count: int = 1
    seed: int = 0  # fixed: the chain's samples, and the quality gate that reads them, are reproducible

    def __call__(self):
        from largewave.config import load_config
        from largewave.sampling import sample_stack

        cfg = load_config(self.config, self.overrides)
        return sample_stack(cfg, seconds=self.seconds, count=self.count, seed=self.seed)
