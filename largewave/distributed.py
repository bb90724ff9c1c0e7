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

Device policy: CUDA + NCCL when a GPU is visible, otherwise CPU + gloo; precision ``auto`` is bf16
on a GPU and, on a CPU, only where it has bf16 matrix units and bf16 measured faster
(:func:`resolve_precision`); a resumed run keeps the precision stored in its checkpoint. The process
group gets a finite timeout so that a collective that hangs (a dead peer, a rank stuck in I/O)
raises an error instead of silently burning the allocation.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional

import torch

from largewave.cache import cache_dir

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
    precision_reason: str = ""  # how it was chosen (printed at start-up)

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


# /proc/cpuinfo flags of bf16 matrix units (AMX tiles, AVX-512 bf16 dot products).
BF16_UNITS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``LARGEWAVE_CPU_FLAGS``, space-separated, replaces them: for tests)."""
    if "LARGEWAVE_CPU_FLAGS" in os.environ:
        return set(os.environ["LARGEWAVE_CPU_FLAGS"].split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _probe_cache() -> Path:
    return cache_dir() / "precision-probe.json"


def _probe_key() -> str:
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))))
    return f"torch {torch.__version__}|threads {torch.get_num_threads()}|{platform.processor()}|{flags}"


def bf16_probe(repeats: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, backward) of a small WaveNet, fp32 and bf16 autocast,
    alternating, median of ``repeats``: {"fp32": s, "bf16": s}. About two seconds."""
    from largewave.models.wavenet import WaveNet  # models sit above this module

    g = torch.Generator().manual_seed(0)
    net = WaveNet(256, [1, 2, 4, 8, 16, 32], residual_channels=64, gate_channels=128, skip_channels=128)
    tokens = torch.randint(0, 256, (2, 2048), generator=g)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(repeats + 1):
        for name in times:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = torch.nn.functional.cross_entropy(net(tokens).float(), tokens)
            loss.backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``train.precision``: "fp32" or "bf16" as asked; "auto" is bf16 on a GPU
    with bf16 support, and on a CPU only where it has bf16 matrix units (:data:`BF16_UNITS`) and a
    short probe (:func:`bf16_probe`, cached per CPU, torch version and thread count in
    ``$LARGEWAVE_CACHE/precision-probe.json``) measured bf16 at least 10% faster than fp32."""
    if requested != "auto":
        return requested, "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: GPU with bf16"
        return "fp32", "auto: this GPU has no bf16"
    units = sorted(cpu_flags() & set(BF16_UNITS))
    if not units:
        return "fp32", f"auto: no bf16 matrix units on this CPU (none of {', '.join(BF16_UNITS)})"
    path, key = _probe_cache(), _probe_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    probe = cached.get(key)
    if probe is None:
        probe = bf16_probe()
        cached[key] = probe
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: probe again next time
    speedup = probe["fp32"] / probe["bf16"]
    prec = "bf16" if speedup >= 1.1 else "fp32"
    return prec, f"auto: {'/'.join(units)}; bf16 probe {speedup:.2f}x fp32"


def pick_device(local_rank: int) -> tuple[torch.device, str]:
    """(device, backend) for this process: GPU → NCCL, CPU → gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def init(precision: str = "auto", timeout_s: float = 1800.0,
         environ: Optional[Mapping[str, str]] = None) -> Runtime:
    """Read the environment, export it for DeepSpeed, pick the device and join the process group.

    ``timeout_s`` bounds every collective: a rank that waits longer for its peers raises instead
    of hanging until the job's time limit. ``precision`` is resolved by :func:`resolve_precision`
    and agreed across ranks (fp32 if any rank resolved fp32).
    """
    env = read_env(environ)
    os.environ.update(env.as_environ())
    device, backend = pick_device(env.local_rank)
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
    prec, why = resolve_precision(precision, device)
    if all_reduce_max([1.0 if prec == "fp32" else 0.0], device)[0] and prec != "fp32":
        prec, why = "fp32", "auto: another rank resolved fp32"
    return Runtime(env=env, device=device, backend=backend, precision=prec, precision_reason=why)  # type: ignore[arg-type]


def autocast(rt: Runtime):
    """The forward's precision context: bf16 autocast when the run trains in bf16 (DeepSpeed holds
    bf16 weights and fp32 master copies; inputs the model computes itself, such as the encoder's
    waveform features, are fp32 and need the cast), a no-op in fp32. Losses are computed in fp32
    by the models (logits ``.float()``)."""
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.precision == "bf16")


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
