"""Fixtures shared by several test files."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# W&B's system-metrics sampler (on for users) is off in the tests, here and in every process they
# start: it only costs time on 2 cores.
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")

# The only reasons a test may skip when CI=true: the machine itself rules the test out. Any other
# skip (a missing program, package, cache or service) fails the run there, so that a skipped test
# cannot hide a missing install step. Skip through ``skip_because(name, detail)``.
ALLOWED_SKIPS = {
    "not-root": "needs root (installs Debian packages, runs daemons as SlurmUser=root)",
    "root": "needs a user other than root (root reads files whatever their permissions)",
    "no-gpu": "needs a CUDA GPU",
}


def skip_because(name: str, detail: str) -> None:
    """Skip with an allowlisted reason (see ``ALLOWED_SKIPS``)."""
    if name not in ALLOWED_SKIPS:
        raise ValueError(f"{name!r} is not an allowed skip reason: {sorted(ALLOWED_SKIPS)}")
    pytest.skip(f"[{name}] {detail}")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(f"[{name}]" in reason for name in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true for a reason outside the allowlist {sorted(ALLOWED_SKIPS)}: "
                       f"{reason}\n(install what the test needs in scripts/install.sh or a fixture)")


def ensure_program(program: str, package: str) -> str:
    """The path of ``program``, installing Debian's ``package`` first when it is missing (root)."""
    found = shutil.which(program)
    if found:
        return found
    if os.geteuid() != 0:
        skip_because("not-root", f"{program} is missing; apt-get install {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    found = shutil.which(program)
    assert found, f"apt-get install {package} did not provide {program}"
    return found


# Slurm's client and daemon programs: what a machine "without Slurm" lacks.
SLURM_PROGRAMS = {"srun", "sbatch", "sinfo", "squeue", "scancel", "scontrol", "sacct", "salloc", "sattach", "sstat",
                  "sshare", "sprio", "sdiag", "sacctmgr", "sreport", "strigger", "sbcast", "scrontab", "sview",
                  "slurmctld", "slurmd", "slurmdbd", "slurmstepd"}


@pytest.fixture
def one_thread():
    """Tiny models run many small forwards (and generation runs sample by sample): one thread is
    fastest there, and fair to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def path_without(tmp_path: Path, programs: set[str]) -> str:
    """A PATH that finds every program the current PATH finds except ``programs``: one folder of
    links, so the test sees a machine where those were never installed, whatever this one has."""
    folder = tmp_path / "bin-without"
    folder.mkdir(parents=True, exist_ok=True)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            link = folder / entry.name
            if entry.name in programs or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    path = str(folder)
    assert all(shutil.which(p, path=path) is None for p in programs)
    return path


@pytest.fixture
def no_slurm_env(tmp_path):
    """The environment of a machine where Slurm was never installed (no Slurm program on PATH,
    no SLURM_CONF)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = path_without(tmp_path, SLURM_PROGRAMS)
    return env
