"""The one place that reads the distributed environment and sets up devices and process groups.

Three ways a training process can be started, read in this order:

1. **torchrun / the deepspeed launcher** set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
   ``MASTER_ADDR`` and ``MASTER_PORT``.
2. **Slurm (directly or via submitit)** sets ``SLURM_PROCID``, ``SLURM_LOCALID``,
   ``SLURM_NTASKS`` and ``SLURM_JOB_NODELIST``; the master is the first host of the node list
   and the port is derived from ``SLURM_JOB_ID`` so that every task of a job (and nothing else)
   agrees on it without talking first.
3. **Nothing**: a single process on a free local port.

Whatever the source, :func:`init` exports all five ``RANK … MASTER_PORT`` variables before
DeepSpeed initialises, because DeepSpeed falls back to MPI discovery when any is missing (even
for one process).

Device policy: CUDA + NCCL + bf16 when a GPU is visible, otherwise CPU + gloo + fp32. The process
group gets a finite timeout so that a collective that hangs (a dead peer, a rank stuck in I/O)
raises an error instead of silently burning the allocation.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch

Launcher = Literal["torchrun", "slurm", "single"]

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environ(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


@dataclass(frozen=True)
class Runtime:
    """What :func:`init` set up: the environment plus device, backend and compute precision."""

    env: DistEnv
    device: torch.device
    backend: str  # "nccl" or "gloo"
    precision: Literal["fp32", "bf16"]

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def read_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank, world size and rendezvous address from torchrun, Slurm, or nothing."""
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in e]
        if missing and int(e["WORLD_SIZE"]) > 1:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} are not: "
                               "start multi-process runs with torchrun or the deepspeed launcher")
        return DistEnv(rank=int(e["RANK"]), local_rank=int(e.get("LOCAL_RANK", e["RANK"])),
                       world_size=int(e["WORLD_SIZE"]), master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(e.get("MASTER_PORT") or _free_port()), launcher="torchrun")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = e.get("SLURM_JOB_ID", "0")
        # An array task has its own job id; either way, tasks of one job share it and different
        # jobs on the same node are unlikely to collide in 20k ports.
        digits = re.sub(r"\D", "", job_id) or "0"
        return DistEnv(rank=int(e["SLURM_PROCID"]), local_rank=int(e.get("SLURM_LOCALID", 0)),
                       world_size=int(e["SLURM_NTASKS"]), master_addr=first_host(nodelist),
                       master_port=20000 + int(digits) % 20000, launcher="slurm")
    return DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                   master_port=_free_port(), launcher="single")


def local_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """Ranks of this job on this node: torchrun's ``LOCAL_WORLD_SIZE``, Slurm's
    ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (``"2(x3)"``: its first count), or
    submitit's local executor (``SUBMITIT_LOCAL_NTASKS`` over its nodes); 1 when none is set."""
    e = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        m = re.match(r"\s*(\d+)", e.get(key, ""))
        if m:
            return max(1, int(m.group(1)))
    if e.get("SUBMITIT_LOCAL_NTASKS", "").isdigit():
        nodes = int(e.get("SUBMITIT_LOCAL_JOB_NUM_NODES", "1") or 1)
        return max(1, int(e["SUBMITIT_LOCAL_NTASKS"]) // max(1, nodes))
    return 1


def cpu_threads_per_rank(environ: Optional[Mapping[str, str]] = None) -> int:
    """Torch threads for one CPU rank: ``SLURM_CPUS_PER_TASK`` when Slurm gave each task its own
    CPUs, else the CPUs this process may run on shared by the node's ranks, so that ranks never
    oversubscribe the cores (two ranks with two threads each on two cores run many times slower
    than with one each)."""
    e = os.environ if environ is None else environ
    if e.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(e["SLURM_CPUS_PER_TASK"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // local_world_size(e))


def flush_denormals() -> None:
    """Flush subnormal floats to zero on CPU (no effect elsewhere). As a WaveNet trains, some
    activations and gradients decay into the subnormal range, which x86 cores process at a
    fraction of normal speed: the demo's level 1 ran a training step 2x slower after 2,000 steps
    than at its start. No trained figure depends on values below 1e-38."""
    torch.set_flush_denormal(True)


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``gpu[003-005,010],cpu01``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to parsing: scontrol may exist but not reach a controller
    head = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # split on commas outside brackets
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", head)
    if not m:
        return head
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(local_rank: int, precision: str = "auto") -> tuple[torch.device, str, str]:
    """(device, backend, precision) for this process: GPU → NCCL (+bf16), CPU → gloo (+fp32)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        backend = "nccl"
        prec = "bf16" if precision == "auto" else precision
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # bf16 on CPU works but is slower than fp32 on most CPUs; only when asked.
        prec = "fp32" if precision == "auto" else precision
    return device, backend, prec


def init(precision: str = "auto", timeout_s: float = 1800.0,
         environ: Optional[Mapping[str, str]] = None) -> Runtime:
    """Read the environment, export it for DeepSpeed, pick the device and join the process group.

    ``timeout_s`` bounds every collective: a rank that waits longer for its peers raises instead
    of hanging until the job's time limit.
    """
    env = read_env(environ)
    os.environ.update(env.as_environ())
    device, backend, prec = pick_device(env.local_rank, precision)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed  # the engine layer owns this dependency; imported late to keep `--help` fast
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups created later (DeepSpeed's data-parallel groups) get torch's module-level default
    # timeout (30 min), not the world group's: make that default ours too, so that every
    # collective — ours or DeepSpeed's — raises after `timeout_s` when a peer hangs.
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return Runtime(env=env, device=device, backend=backend, precision=prec)  # type: ignore[arg-type]


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise MAX of small float vectors across ranks (flags, counters)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
