"""scripts/install.sh chooses the torch variant on purpose: CPU wheels without an NVIDIA GPU, CUDA
wheels where ``nvidia-smi`` lists one, an override variable; ``--print-torch`` shows the choice."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def choose(tmp_path: Path, smi: str | None = None, **env: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = os.environ["PATH"]
    if smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    else:  # hide any real nvidia-smi
        path = ":".join(p for p in path.split(":") if not (Path(p) / "nvidia-smi").exists())
    r = subprocess.run(["bash", "scripts/install.sh", "--print-torch"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{bin_dir}:{path}", **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(line.split(": ", 1) for line in r.stdout.splitlines())


def test_no_gpu_chooses_the_cpu_build(tmp_path):
    got = choose(tmp_path)
    assert got["variant"].startswith("cpu (no NVIDIA GPU")
    assert got["command"].endswith("torch==2.13.0")
    # here the configured pip source holds the CPU wheel, so no index is added; elsewhere PyTorch's CPU index
    cpu_wheel_here = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "-q",
                                     "torch==2.13.0+cpu"], capture_output=True).returncode == 0
    assert ("download.pytorch.org/whl/cpu" in got["command"]) != cpu_wheel_here


def test_nvidia_smi_listing_a_gpu_chooses_cuda(tmp_path):
    got = choose(tmp_path, smi='echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    assert got["variant"] == "cuda (nvidia-smi lists 1 GPU(s))"
    assert "whl/cpu" not in got["command"] and got["command"].endswith("torch==2.13.0")
    # an nvidia-smi that answers with no GPU (driver present, no device) stays on CPU
    assert choose(tmp_path / "x", smi="exit 9")["variant"].startswith("cpu")


def test_overrides(tmp_path):
    got = choose(tmp_path, smi='echo "GPU 0: NVIDIA A100"', LARGEWAVE_TORCH_VARIANT="cpu")
    assert got["variant"] == "cpu (LARGEWAVE_TORCH_VARIANT=cpu)"
    got = choose(tmp_path, LARGEWAVE_TORCH_VARIANT="cuda", LARGEWAVE_TORCH_INDEX="https://download.pytorch.org/whl/cu126")
    assert got["command"].endswith("--index-url https://download.pytorch.org/whl/cu126 torch==2.13.0")
    r = subprocess.run(["bash", "scripts/install.sh", "--print-torch"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "LARGEWAVE_TORCH_VARIANT": "rocm"})
    assert r.returncode == 2 and "must be auto, cpu or cuda" in r.stderr


@pytest.mark.parametrize("pkg", ["deepspeed", "wandb", "webdataset"])
def test_setup_bounds_and_constraints(pkg):
    setup = (REPO / "setup.py").read_text()
    assert f'"{pkg}>=' in setup and f'"{pkg}>=' in setup and "<" in setup.split(f'"{pkg}>=')[1].split('"')[0]
    pinned = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.lower().startswith(pkg + "==")]
    assert pinned, f"constraints.txt pins no {pkg}"


def test_doctor_reports_the_machine_and_fails_on_a_missing_requirement():
    import sys as _sys

    r = subprocess.run([_sys.executable, "-m", "largewave.doctor"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ("torch", "GPUs", "deepspeed", "DeepSpeed ops", "CPU bf16 units", "Slurm", "FluidSynth + soundfont",
                 "W&B", "disk (runs)", "disk (cache)"):
        assert any(line.startswith(("[ok] " + what, "[--] " + what)) for line in r.stdout.splitlines()), what
    assert "healthy" in r.stdout
    # boto3 made unimportable: a required package is missing → named, with the fix, exit 1
    code = "import sys; sys.modules['boto3'] = None; from largewave.doctor import main; sys.exit(main([]))"
    r = subprocess.run([_sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "[!!] boto3" in r.stdout and "pip install -e . -c constraints.txt" in r.stdout
