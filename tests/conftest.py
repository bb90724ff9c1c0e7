"""Fixtures shared by several test files."""
import os
import shutil
from pathlib import Path

import pytest
import torch

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
