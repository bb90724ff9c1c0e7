"""``python -m largewave.doctor``: what this machine has for largewave, and what is missing.

Each line is ``[ok]``, ``[--]`` (optional, absent: what you lose, and the command that adds it)
or ``[!!]`` (required and missing or broken: the command that fixes it). Exits 1 when anything
required fails, else 0.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIRED = ("deepspeed", "webdataset", "wandb", "submitit", "soundfile", "soxr", "numpy", "yaml", "tqdm", "boto3")


def _run(cmd: list[str], timeout: float = 10) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)


def checks() -> list[tuple[str, str, str]]:
    """(status, what, detail) rows; status is "ok", "--" or "!!"."""
    rows: list[tuple[str, str, str]] = []
    add = lambda status, what, detail: rows.append((status, what, detail))  # noqa: E731
    try:
        import torch
    except ImportError:
        add("!!", "torch", "not installed: bash scripts/install.sh (chooses the CPU or CUDA build)")
        return rows
    cuda = torch.version.cuda
    add("ok", "torch", f"{torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU build'})")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        add("ok", "GPUs", f"{len(names)}: {', '.join(names)}; NCCL {nccl}")
    else:
        code, _ = _run(["nvidia-smi", "-L"])
        if code == 0 and cuda is None:
            add("!!", "GPUs", "nvidia-smi lists GPUs but torch is the CPU build: "
                              "LARGEWAVE_TORCH_VARIANT=cuda bash scripts/install.sh")
        else:
            add("--", "GPUs", "none: training runs on the CPU (gloo)")
    for mod in REQUIRED:
        try:
            m = importlib.import_module(mod)
            add("ok", mod, str(getattr(m, "__version__", "installed")))
        except Exception as e:
            add("!!", mod, f"{type(e).__name__}: {e}: pip install -e . -c constraints.txt")
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        ok = []
        for name, builder in sorted(ALL_OPS.items()):
            try:
                if builder.is_compatible(verbose=False):
                    ok.append(name)
            except Exception:
                pass
        add("ok", "DeepSpeed ops", f"buildable here: {', '.join(ok) or 'none'} (JIT-built on first use)")
    except Exception as e:
        add("--", "DeepSpeed ops", f"cannot list ({type(e).__name__})")
    from largewave.distributed import cpu_flags

    flags = cpu_flags()
    units = sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16"))
    add("ok", "CPU bf16 units", ", ".join(units) if units else
        "none (amx_bf16/avx512_bf16 absent): precision auto trains in fp32 on this CPU")
    cc = shutil.which("cc") or shutil.which("gcc")
    add("ok" if cc else "--", "C compiler", cc or "absent: the fused CPU sampling step falls back to PyTorch "
        "(apt-get install gcc)")
    if shutil.which("sbatch"):
        code, out = _run(["sinfo", "-h", "-o", "%P %a %D"])
        add("ok" if code == 0 else "--", "Slurm", f"controller answers: {out.splitlines()[0] if out else ''}"
            if code == 0 else "client tools present, no controller answers: jobs run on this machine")
    else:
        add("--", "Slurm", "no client tools: largewave launch runs jobs on this machine (local executor)")
    fs = shutil.which("fluidsynth")
    sf2 = [p for p in ("/usr/share/sounds/sf2/MuseScore_General.sf2", "/usr/share/sounds/sf3/MuseScore_General.sf3",
                       "/usr/share/sounds/sf2/FluidR3_GM.sf2") if Path(p).exists()]
    add("ok" if fs and sf2 else "--", "FluidSynth + soundfont",
        f"{fs}, {sf2[0]}" if fs and sf2 else "missing: the demo corpus cannot be rendered "
        "(apt-get install --no-install-recommends fluidsynth musescore-general-soundfont-lossless)")
    key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists() and "api.wandb.ai" in \
        (Path.home() / ".netrc").read_text(errors="replace")
    mode = os.environ.get("WANDB_MODE")
    add("ok", "W&B", f"{'logged in' if key else 'not logged in'}: runs log "
        f"{mode or ('online' if key else 'offline (wandb login to log online)')}")
    from largewave.cache import cache_dir

    for what, where in (("disk (runs)", Path("runs")), ("disk (cache)", cache_dir())):
        p = where
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p.resolve()).free / 2**30
        add("ok" if free > 5 else "!!", what, f"{free:.1f} GiB free at {where}" +
            ("" if free > 5 else ": less than 5 GiB; free space or move it ($LARGEWAVE_CACHE, run.root)"))
    return rows


def main(argv=None, prog: str | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog=prog or "python -m largewave.doctor", description=__doc__.split("\n\n")[0]).parse_args(argv)
    rows = checks()
    width = max(len(w) for _, w, _ in rows)
    for status, what, detail in rows:
        print(f"[{status}] {what:<{width}}  {detail}")
    bad = [w for s, w, _ in rows if s == "!!"]
    print(f"{len(bad)} problem(s): {', '.join(bad)}" if bad else "healthy: everything required is here")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
