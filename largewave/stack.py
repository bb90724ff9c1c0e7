"""Where a stack's pieces live and whether they agree: exports, code sets, fingerprints.

A level's codes are fingerprinted by the exact encoder (weights and config) that made them and
by the input they were computed from, so a level above can refuse codes that do not belong to
its stack, and a retrained level below never silently feeds an old run above.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from largewave.config import StackConfig, _level_key

EXPORT_NAME = "export.pt"


def run_dir(cfg: StackConfig, level: str) -> Path:
    from largewave.engine.run_folder import run_dir as _run_dir

    return _run_dir(cfg, _level_key(level))


def export_path(cfg: StackConfig, level: str) -> Path:
    return run_dir(cfg, level) / EXPORT_NAME


def codes_dir(cfg: StackConfig, level: str) -> str:
    """The code set of ``level`` (what the level above trains on)."""
    return f"{cfg.path(cfg.data.codes).rstrip('/')}/{_level_key(level)}"


def input_dir(cfg: StackConfig, level: str) -> str:
    """The shard set ``level`` reads: audio shards for the first level, codes of the level below above."""
    below = cfg.below(_level_key(level))
    return cfg.path(cfg.data.shards) if below is None else codes_dir(cfg, below)


def latest_step(cfg: StackConfig, level: str) -> Optional[int]:
    from largewave.engine.checkpoint import latest_complete

    ck = latest_complete(run_dir(cfg, level) / "checkpoints")
    return ck.step if ck is not None else None


def encoder_fingerprint(payload: dict[str, Any], input_fingerprint: Optional[str]) -> str:
    """Fingerprint of the codes an export makes: its encoder + quantiser weights and config, and
    the fingerprint of the codes it reads (none for level 1, which reads audio)."""
    h = hashlib.sha256()
    level = payload["level"]
    lv = payload["config"]["levels"][level]
    described = {"level": level, "hop": lv["hop"], "kind": lv["kind"], "encoder": lv["encoder"],
                 "quantiser": lv["quantiser"], "audio": payload["config"]["audio"], "input": input_fingerprint}
    h.update(json.dumps(described, sort_keys=True).encode())
    state = payload["state_dict"]
    for name in sorted(state):
        if name.startswith(("encoder.", "quantiser.")):
            t = state[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def code_set_fingerprint(cfg: StackConfig, level: str) -> Optional[str]:
    """The fingerprint recorded in ``level``'s code set manifest, or None if it has no complete set."""
    from largewave.data.manifest import ManifestError, read_manifest

    try:
        return read_manifest(codes_dir(cfg, level)).fingerprint
    except (ManifestError, FileNotFoundError, OSError):
        return None


def expected_fingerprint(cfg: StackConfig, level: str) -> Optional[str]:
    """The fingerprint the codes of ``level`` must carry: computed from its export (None if no export)."""
    from largewave.engine.export import read_export

    path = export_path(cfg, level)
    if not path.exists():
        return None
    below = cfg.below(_level_key(level))
    input_fp = None if below is None else code_set_fingerprint(cfg, below)
    return encoder_fingerprint(read_export(path), input_fp)


def codes_status(cfg: StackConfig, level: str) -> tuple[bool, str]:
    """(ready, reason): are the codes of ``level`` complete and made by its current export?"""
    have = code_set_fingerprint(cfg, level)
    if have is None:
        return False, f"missing (no complete code set in {codes_dir(cfg, level)})"
    want = expected_fingerprint(cfg, level)
    if want is None:
        return False, f"stale: {level} has no export at {export_path(cfg, level)} to check them against"
    if have != want:
        return False, f"stale (codes fingerprint {have}, {level} export {want})"
    return True, "ready"
