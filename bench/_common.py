"""The benchmarks' shared protocol: how things are timed and how the machine is described.

Every comparison in ``bench/`` follows the same rules, kept here once:

- **wall clock** is the headline (what a user waits for); the process's CPU time is recorded
  beside it (on a shared machine it is less disturbed by other jobs, but it hides time spent
  waiting and, with several threads, sums them);
- the things compared run **alternately** (A B A B …), each ``repeats`` >= 3 times, so that a
  burst of foreign load or a thermal/frequency drift hits both; a figure is the **median** with
  its **spread** (min–max) over the repeats, never a single or a best run;
- the **load average** is printed at the start and at the end (other processes on the same
  cores slow the wall clock), and the **CPU model** and its matrix-relevant flags are printed so
  that numbers from different machines of "the same kind" are not confused.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

# /proc/cpuinfo flags that decide how fast fp32/bf16 matmuls and convolutions can run.
MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Sample:
    """One timed run: ``work`` units (samples, seconds of audio, …) in ``wall`` / ``cpu`` seconds."""

    work: float
    wall: float
    cpu: float

    @property
    def wall_rate(self) -> float:
        return self.work / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.work / self.cpu if self.cpu > 0 else float("inf")


def measure(fn: Callable[[], object], work: float = 1.0, sync: Callable[[], None] | None = None) -> tuple[object, Sample]:
    """Run ``fn`` once: (its result, a :class:`Sample` of ``work`` units)."""
    if sync is not None:
        sync()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync is not None:
        sync()
    return out, Sample(work, time.perf_counter() - w0, time.process_time() - c0)


def alternate(cases: dict[str, Callable[[], Sample]], repeats: int) -> dict[str, list[Sample]]:
    """Run every case once per round, in the same order each round (A B A B …), ``repeats`` rounds."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    out: dict[str, list[Sample]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            out[name].append(fn())
    return out


def alternating_steps(cases: Sequence[tuple[str, Callable[[], object]]], warmup: int, steps: int,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Run the cases in turn (A B A B …) for ``warmup + steps`` rounds; the wall seconds of each
    case's ``steps`` timed calls (``sync`` before and after each call, e.g. a CUDA synchronise)."""
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for i in range(warmup + steps):
        for name, fn in cases:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """``median (min–max)`` of the values, each formatted with ``fmt``."""
    v = list(values)
    if len(v) == 1:
        return f"{v[0]:{fmt}}"
    return f"{median(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"


def wall_rates(samples: Sequence[Sample]) -> list[float]:
    return [s.wall_rate for s in samples]


def cpu_rates(samples: Sequence[Sample]) -> list[float]:
    return [s.cpu_rate for s in samples]


def ratio_spread(a: Sequence[float], b: Sequence[float], fmt: str = ".2f") -> str:
    """Ratio of medians, with the range of the per-round ratios (rounds paired, A and B adjacent)."""
    r = [x / y for x, y in zip(a, b)]
    return f"{median(a) / median(b):{fmt}}x ({min(r):{fmt}}–{max(r):{fmt}})"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def cpu_description() -> str:
    """The CPU model and which of :data:`MATRIX_FLAGS` it has (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return f"{model} (no /proc/cpuinfo)"
    have = [f for f in MATRIX_FLAGS if f in flags]
    lack = [f for f in MATRIX_FLAGS if f not in flags]
    return (f"{model}; {os.cpu_count()} CPUs; has {' '.join(have) or '-'}; "
            f"lacks {' '.join(lack) or '-'}")


def print_machine(extra: str = "") -> None:
    """The header every benchmark starts with: CPU, flags, load average."""
    print(f"cpu: {cpu_description()}")
    print(f"start: {load_average()}{'; ' + extra if extra else ''}", flush=True)


def print_end() -> None:
    print(f"end: {load_average()} (other processes share these CPUs when it is above the threads used)")
