"""Run folders named from the config, so that rerunning the same command resumes the same run.

``runs/<stack>/<level>/<signature>/`` where ``signature`` is the first 12 hex digits of a SHA-256
over the JSON of everything that changes what training computes:

* ``stack``, ``level`` and the ``audio`` section;
* the data the level reads: the shard folder (audio shards for level 1, ``{data.codes}/level{k-1}``
  above) and ``data.seed`` (the crop order);
* this level's whole config — kind, hop, encoder, quantiser, decoder, optim, and train —
  as :func:`largewave.config.hashed` sees it: **except** fields marked ``bookkeeping`` that only
  change bookkeeping (``log_every``, ``eval_every``, ``eval_batches``, ``sample_every``,
  ``sample_clips``, ``sample_seconds``, ``save_every``, ``keep_checkpoints``, ``max_nonfinite``,
  ``pause_at``, and ``activation_checkpointing``: same math, less memory) and how the batch is
  split over resources (``micro_batch`` and ``grad_accum``, so that a run moved to fewer or more
  ranks can keep its effective batch and still resume); fields ``added`` later count only when
  they differ from their default, and renamed fields count under their old name;
* the model sections (kind, hop, encoder, quantiser, decoder) of the levels below, whose codes
  this level reads;
* above level 1, the fingerprint of the codes it trains on (from the level below's export, or the
  code set's manifest): retraining the level below gives the level above a new run folder.

Not included: ``run.*`` (where and how to log), ``data.workers`` (the loader's order does not
depend on it) and the world size (a run may resume on a different number of ranks). ``train.steps``
*is* included: it shapes the learning-rate decay, so a longer schedule is a different run.
``signature.json`` in the run folder holds exactly what was hashed.

``snapshot/segment-NNN/`` records what produced each segment of a run (a requeued job starts later,
on whatever code is checked out then): ``command.txt``, ``git.txt`` (commit and status),
``git.diff`` (uncommitted changes), ``pip-freeze.txt``, ``environment.txt`` (launcher variables).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from largewave.config import REPO_ROOT, StackConfig, hashed
from largewave.engine.checkpoint import atomic_write_text



def data_root(cfg: StackConfig, level: str) -> str:
    """The shard set a level trains on: audio for the first level, codes of the level below above."""
    below = cfg.below(level)
    if below is None:
        return cfg.path(cfg.data.shards)
    return f"{cfg.path(cfg.data.codes).rstrip('/')}/{below}"


def signature_payload(cfg: StackConfig, level: str) -> dict[str, Any]:
    lv = hashed(cfg.level(level))  # without bookkeeping fields (see largewave.config.bookkeeping)
    names = cfg.level_names()
    below = {}
    for name in names[: names.index(level)]:
        b = hashed(cfg.levels[name])
        below[name] = {k: b[k] for k in ("kind", "hop", "encoder", "quantiser", "decoder")}
    data = {"root": data_root(cfg, level), "seed": cfg.data.seed}
    if names.index(level) > 0:
        # Keyed by the codes it trains on: retraining the level below never resumes an old run above.
        from largewave import stack

        prev = names[names.index(level) - 1]
        data["codes"] = stack.expected_fingerprint(cfg, prev) or stack.code_set_fingerprint(cfg, prev)
    return {"stack": cfg.stack, "level": level, "audio": hashed(cfg.audio),
            "data": data, "config": lv, "below": below}


def signature(cfg: StackConfig, level: str) -> str:
    text = json.dumps(signature_payload(cfg, level), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir(cfg: StackConfig, level: str) -> Path:
    return Path(cfg.run.root) / cfg.stack / level / signature(cfg, level)


def _run(cmd: list[str], cwd: Optional[Path] = None, timeout: float = 120) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return r.stdout if r.returncode == 0 else f"# {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n"
    except (OSError, subprocess.SubprocessError) as e:
        return f"# {' '.join(cmd)} failed: {e}\n"


def write_snapshot(run: Path, argv: Optional[list[str]] = None) -> Path:
    """Record command line, code version and environment of this segment (rank 0 only)."""
    root = run / "snapshot"
    root.mkdir(parents=True, exist_ok=True)
    n = len([p for p in root.iterdir() if p.name.startswith("segment-")])
    seg = root / f"segment-{n:03d}"
    seg.mkdir()
    argv = list(sys.argv if argv is None else argv)
    (seg / "command.txt").write_text(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  cwd: {os.getcwd()}\n"
        f"{shlex.join([sys.executable] + argv)}\n")
    (seg / "git.txt").write_text(_run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
                                 + _run(["git", "status", "--short"], cwd=REPO_ROOT))
    (seg / "git.diff").write_text(_run(["git", "diff", "HEAD"], cwd=REPO_ROOT))
    # pip freeze takes seconds; it writes its file in the background while training starts.
    try:
        with open(seg / "pip-freeze.txt", "w") as out:
            subprocess.Popen([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"],
                             stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError as e:
        (seg / "pip-freeze.txt").write_text(f"# pip freeze failed: {e}\n")
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NTASKS",
            "SLURM_JOB_NODELIST", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "HOSTNAME")
    (seg / "environment.txt").write_text("".join(f"{k}={os.environ[k]}\n" for k in keys if k in os.environ))
    return seg


# ---- the run's state, for `largewave runs` ------------------------------------------------------
#
# ``state.json`` (rank 0): {"state": running | done | paused | stopped | failed, "step", "steps",
# "pid", "host", "started", "updated", "checkpoint", "export", "wandb", "error"}. Written when a
# segment starts, at every log line and checkpoint, and when it ends. A process killed without a
# word (SIGKILL, a lost node) leaves "running": readers check the pid on the same host.

STATES = ("running", "done", "paused", "stopped", "failed")


def write_state(run: Path, state: str, **fields: Any) -> None:
    assert state in STATES, state
    path = Path(run) / "state.json"
    old = read_state(run) if path.exists() else {}
    new = {**old, **fields, "state": state, "updated": time.time()}
    if state == "running" and old.get("state") != "running":
        new.update(pid=os.getpid(), host=socket.gethostname(), started=time.time(), error=None)
    atomic_write_text(path, json.dumps(new, indent=1), fsync=False)  # rank 0 only: one writer


def read_state(run: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run) / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def live_state(state: dict[str, Any]) -> str:
    """The state as a reader should show it: "running" only while its process is alive (checked on
    the same host; on another host, "running" unless it has said nothing for an hour)."""
    s = state.get("state") or "unknown"
    if s != "running":
        return s
    if state.get("host") == socket.gethostname():
        try:
            os.kill(int(state["pid"]), 0)
        except ProcessLookupError:
            return "stopped"  # killed without a word (SIGKILL, OOM): its checkpoints are what is left
        except (PermissionError, KeyError, TypeError, ValueError):
            pass
        return "running"
    return "running" if time.time() - float(state.get("updated", 0)) < 3600 else "stopped"
