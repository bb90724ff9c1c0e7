"""Sharded, step-named, complete-only checkpoints.

Layout of one checkpoint, ``<run>/checkpoints/step-XXXXXXXX/``:

``mp_rank_00_model_states.pt``, ``*zero_pp_rank_*``   DeepSpeed's own sharded files (every rank
                                                       writes its partition)
``client_state/rank-RRRRR.pt``  per rank: RNG states (python, numpy, torch, cuda) and the
                                loader position, so that every rank continues exactly
``client_state/common.pt``      step, samples seen, world size, resolved config, W&B run id,
                                EMA weights, non-finite counters (written by rank 0)
``COMPLETE``                    JSON ``{"step", "world_size", "zero_stage", "time"}``; written by
                                rank 0 after a barrier that every rank reaches only when its own
                                files are on disk. A folder without it was interrupted and is
                                never resumed from.

DeepSpeed's ``latest`` file is not used: "latest" is the highest step with a ``COMPLETE`` marker.
A different world size is loaded through DeepSpeed's universal checkpoint, converted once into
``step-XXXXXXXX-universal/`` (see :func:`ensure_universal`).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool
    meta: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """All ``step-*`` folders under ``root``, oldest first, with their completeness."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        marker = p / COMPLETE
        meta: dict[str, Any] = {}
        complete = False
        if marker.is_file():
            try:
                meta = json.loads(marker.read_text())
                complete = int(meta.get("step", -1)) == int(m.group(1))
            except (ValueError, OSError):
                complete = False  # a torn marker counts as no marker
        out.append(CheckpointInfo(step=int(m.group(1)), path=p, complete=complete, meta=meta))
    return sorted(out, key=lambda c: c.step)


def latest_complete(root: str | os.PathLike) -> Optional[CheckpointInfo]:
    done = [c for c in list_checkpoints(root) if c.complete]
    return done[-1] if done else None


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Delete interrupted checkpoint folders (rank 0, before the first save of a segment), so a
    later save of the same step never mixes fresh files with stale ones."""
    removed = []
    for c in list_checkpoints(root):
        if not c.complete:
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path)
    for p in Path(root).glob("step-*-universal") if Path(root).is_dir() else []:
        base = Path(root) / p.name[: -len("-universal")]
        if not (base / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)
    return removed


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (and any newer, incomplete one being written)."""
    done = [c for c in list_checkpoints(root) if c.complete]
    removed = []
    for c in done[:-keep] if keep > 0 else []:
        shutil.rmtree(c.path, ignore_errors=True)
        shutil.rmtree(c.path.with_name(c.path.name + "-universal"), ignore_errors=True)
        removed.append(c.path)
    return removed


# ---- RNG state ------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(path: Path) -> None:
    """Flush a checkpoint folder to stable storage before it is declared complete: after a node
    crash a marker must never point at files that only lived in the page cache."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / "client_state" / f"rank-{rank:05d}.pt"


def common_state_path(ckpt: Path) -> Path:
    return ckpt / "client_state" / "common.pt"


def stored_precision(root: str | os.PathLike) -> Optional[str]:
    """The precision ("fp32"/"bf16") the latest complete checkpoint under ``root`` was trained in,
    or None (no checkpoint, or one written before the precision was recorded)."""
    latest = latest_complete(root)
    if latest is None or not common_state_path(latest.path).exists():
        return None
    common = torch.load(common_state_path(latest.path), map_location="cpu", weights_only=False)
    return common.get("precision")


def write_complete(ckpt: Path, step: int, world_size: int, zero_stage: int) -> None:
    fsync_tree(ckpt)
    atomic_write_text(ckpt / COMPLETE, json.dumps(
        {"step": step, "world_size": world_size, "zero_stage": zero_stage, "time": time.time()}))


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


# ---- universal checkpoints (different world size) ----------------------------------------------


def universal_dir(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + "-universal")


def ensure_universal(ckpt: Path) -> Path:
    """Convert a complete checkpoint to DeepSpeed's universal format (once; rank 0 only).

    The conversion writes into a temporary folder renamed into place at the end, so an
    interrupted conversion is simply redone.
    """
    out = universal_dir(ckpt)
    if (out / COMPLETE).exists():
        return out
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal(args)
    # The converter also points a `latest_universal` file at its output folder; resume picks
    # checkpoints by COMPLETE markers, so that pointer (to the temporary name) would only mislead.
    (ckpt.parent / "latest_universal").unlink(missing_ok=True)
    # Our own client state travels with it (the universal loader reads DeepSpeed's files only).
    shutil.copytree(ckpt / "client_state", tmp / "client_state", dirs_exist_ok=True)
    shutil.copy2(ckpt / COMPLETE, tmp / COMPLETE)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
