"""``pip install .`` gives a working ``largewave`` command outside any checkout.

A fresh virtual environment (``--system-site-packages``: the dependencies come from this machine,
largewave itself must not) gets a non-editable ``pip install --no-deps`` of a copy of the tracked
files; from a temporary directory, with no checkout anywhere on ``sys.path``, the installed
command answers ``--help``, lists runs, builds shards from recordings with a *packaged* config and
trains two steps of its level 1, which ``largewave runs`` then shows.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["level1.train.steps=2", "level1.train.micro_batch=1", "level1.train.crop=2048", "level1.train.eval_every=2",
         "level1.train.eval_batches=1", "level1.train.eval_clips=0", "level1.train.sample_every=1000",
         "level1.train.save_every=2", "level1.train.log_every=1", "run.wandb_mode=disabled", "data.workers=1"]


def tracked_copy(dest: Path) -> Path:
    """The checkout's tracked files (what a clone or an sdist holds), without build leftovers."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = tracked_copy(root / "src")
    env_dir = root / "venv"
    # --without-pip: pip and setuptools come from this machine too (a venv of Python 3.11 would
    # otherwise bring its own old setuptools, without bdist_wheel)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", str(src)], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(src)  # nothing may be read from the source tree after the install
    work = root / "work"
    work.mkdir()
    return env_dir, work


def run(env_dir: Path, work: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pip_install_gives_a_working_largewave_command(venv):
    env_dir, work = venv
    probe = run(env_dir, work, str(env_dir / "bin" / "python"), "-c",
                "import largewave, largewave.config as c, sys; print(largewave.__file__); print(c.CONFIG_DIR); "
                "print(any(p and __import__('pathlib').Path(p).resolve() == __import__('pathlib').Path("
                f"{str(REPO)!r}) for p in sys.path))")
    assert probe.returncode == 0, probe.stderr
    module, configs, checkout_on_path = probe.stdout.split()
    assert Path(module).resolve().is_relative_to(env_dir.resolve()), module
    assert Path(configs).resolve().is_relative_to(env_dir.resolve()) and (Path(configs) / "demo.yaml").exists()
    assert checkout_on_path == "False"
    exe = shutil.which("largewave", path=str(env_dir / "bin"))
    assert exe and Path(exe).parent == env_dir / "bin"

    r = run(env_dir, work, "largewave", "--help")
    assert r.returncode == 0 and "usage: largewave" in r.stdout
    for name in ("demo", "shards", "train", "codes", "sample", "launch", "pbt", "runs", "doctor"):
        assert f"  {name} " in r.stdout, name
    r = run(env_dir, work, "largewave", "runs")
    assert r.returncode == 0 and "no runs" in r.stdout, r.stdout + r.stderr

    # recordings → shards → two steps of the packaged demo config's level 1, all in the work folder
    rec = work / "recordings"
    rec.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(16000 * 12) / 16000
        x = 0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(rec / f"piece{i}.wav", x.astype(np.float32), 16000)
    r = run(env_dir, work, "largewave", "shards", "build", "--stack", "demo", "--input", "recordings", "--quiet",
            "data.valid_fraction=0.2", "data.test_fraction=0.0", "data.workers=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (work / "data" / "demo" / "audio" / "manifest.json").exists()
    r = run(env_dir, work, "largewave", "train", "--stack", "demo", "--level", "1", *TRAIN, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = (work / "runs" / "demo" / "level1").iterdir()
    assert (run_dir / "export.pt").exists()
    snap = (run_dir / "snapshot" / "segment-000" / "command.txt").read_text()
    assert "largewave" in snap

    r = run(env_dir, work, "largewave", "runs", "--json")
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)
    assert info["state"] == "done" and info["step"] == 2 and info["signature"] == run_dir.name
    assert "valid/bits_per_token" in info["last"]
    assert "level1.train.steps=2" in info["diff"]  # compared with the packaged demo.yaml
    r = run(env_dir, work, "largewave", "runs", "demo/level1")
    assert r.returncode == 0 and f"learning curves: runs/demo/level1/{run_dir.name}/curves.png" in r.stdout, r.stdout
    assert (run_dir / "curves.png").stat().st_size > 1000
