"""Where a stack's pieces live and whether they agree: exports, code sets, fingerprints.

    stack.export_path(cfg, "level1")      # runs/<stack>/level1/<signature>/export.pt
    stack.codes_dir(cfg, "level1")        # data/<stack>/codes/level1 (what level2 trains on)
    stack.codes_status(cfg, "level1")     # (True, "ready") | (False, "missing …") | (False, "stale …")
    fp = stack.check_codes(cfg, "level2") # before training level2: its input codes belong to this stack

A level's codes are fingerprinted by the exact encoder that made them (its weights, quantiser and
config) and by the fingerprint of the codes it read (none for level 1, which reads audio), so a
fingerprint names the whole chain of encoders below it. A level above refuses codes whose
fingerprint is not the one its level below's export makes, and a retrained level below never
silently feeds an old run above.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from largewave.config import ConfigError, StackConfig, _level_key, from_dict, hashed

EXPORT_NAME = "export.pt"

# Buffers that record training statistics only: they never change which code a frame gets, so
# they are left out of the fingerprint (re-exporting the same weights keeps the same codes).
_STATISTICS = ("usage", "usage_step", "ema_count", "ema_sum", "recent", "recent_filled")


class CodesError(RuntimeError):
    """A code set that cannot be made or used; the message says why and what to run."""


class CodesNotReady(CodesError, ConfigError):
    """The code set a level trains on is missing or incomplete, or cannot be checked (no export
    of the level below). A :class:`~largewave.config.ConfigError` too: nothing can start."""


class FingerprintError(CodesError, ConfigError):
    """Codes made by another encoder than the one this stack's level below exports.

    Also a :class:`~largewave.config.ConfigError`, so command lines that stop on bad configs
    (exit code 2, nothing started) stop on it the same way."""


def run_dir(cfg: StackConfig, level: str) -> Path:
    """The run folder of ``level`` (see :mod:`largewave.engine.run_folder`)."""
    from largewave.engine.run_folder import run_dir as _run_dir

    return _run_dir(cfg, _level_key(level))


def export_path(cfg: StackConfig, level: str) -> Path:
    """``runs/<stack>/<level>/<signature>/export.pt``: what code precompute and sampling load."""
    return run_dir(cfg, level) / EXPORT_NAME


def codes_dir(cfg: StackConfig, level: str) -> str:
    """The code set that ``level`` makes (what the level above trains on): ``{data.codes}/<level>``."""
    return f"{cfg.path(cfg.data.codes).rstrip('/')}/{_level_key(level)}"


def input_dir(cfg: StackConfig, level: str) -> str:
    """The shard set ``level`` reads: audio shards for the first level, the codes of the level below above."""
    below = cfg.below(_level_key(level))
    return cfg.path(cfg.data.shards) if below is None else codes_dir(cfg, below)


def audio_ready(cfg: StackConfig) -> bool:
    """Is there a complete audio shard set (one with a manifest) at ``data.shards``?"""
    from largewave.data.manifest import ManifestError, read_manifest

    try:
        return read_manifest(cfg.path(cfg.data.shards)).kind == "audio"
    except (ManifestError, OSError):
        return False


def latest_step(cfg: StackConfig, level: str) -> Optional[int]:
    """Step of the latest complete checkpoint of ``level``'s run, or None."""
    from largewave.engine.checkpoint import latest_complete

    ck = latest_complete(run_dir(cfg, level) / "checkpoints")
    return ck.step if ck is not None else None


def _config_arg(cfg: StackConfig) -> str:
    """How a command line names this stack's config: its name when ``configs/<stack>.yaml`` exists,
    otherwise a placeholder (the stack was renamed by an override such as ``stack=demo-smoke``)."""
    from largewave.config import CONFIG_DIR

    return cfg.stack if (CONFIG_DIR / f"{cfg.stack}.yaml").exists() else f"<config> stack={cfg.stack} …"


def train_command(cfg: StackConfig, level: str) -> str:
    """The command that trains ``level`` of this stack (for error messages)."""
    key = _level_key(level)
    return f"largewave train --stack {_config_arg(cfg)} --level {key.removeprefix('level')}"


def shards_command(cfg: StackConfig) -> str:
    """The command that builds this stack's audio shards (for error messages)."""
    return f"largewave shards build --stack {_config_arg(cfg)}"


def codes_command(cfg: StackConfig, level: str) -> str:
    """The command that (re)computes ``level``'s codes (for error messages)."""
    return f"largewave codes --stack {_config_arg(cfg)} --level {_level_key(level).removeprefix('level')}"


def encoder_fingerprint(payload: dict[str, Any], input_fingerprint: Optional[str]) -> str:
    """Fingerprint (16 hex digits) of the codes an export makes.

    Hashes the level's name, hop, kind, encoder and quantiser config and the audio config, the
    fingerprint of the codes it reads (``None`` for level 1, which reads audio), and every
    encoder and quantiser tensor (name, dtype, shape, bytes) except buffers that only count
    usage. Any change to what maps input tokens to codes changes it.

    Args:
        payload: an export dict (:func:`largewave.engine.export.read_export`).
        input_fingerprint: the fingerprint of the code set this level encodes, or None.
    """
    h = hashlib.sha256()
    level = payload["level"]
    # The typed config, as signatures see it (largewave.config.hashed): fields added since keep
    # their old fingerprints while at their default, renamed ones are hashed under their old names,
    # and an export written before a rename still loads through the alias.
    cfg = from_dict(payload["config"], source=f"the config stored in the export of {level}")
    lv = cfg.levels[level]
    described = {"level": level, "hop": lv.hop, "kind": lv.kind, "encoder": hashed(lv.encoder),
                 "quantiser": hashed(lv.quantiser), "audio": hashed(cfg.audio), "input": input_fingerprint}
    h.update(json.dumps(described, sort_keys=True).encode())
    state = payload["state_dict"]
    for name in sorted(state):
        if not name.startswith(("encoder.", "quantiser.")) or name.rsplit(".", 1)[-1] in _STATISTICS:
            continue
        t = state[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def code_set_fingerprint(cfg: StackConfig, level: str) -> Optional[str]:
    """The fingerprint recorded in ``level``'s code set manifest, or None if it has no complete set."""
    from largewave.data.manifest import ManifestError, read_manifest

    try:
        return read_manifest(codes_dir(cfg, level)).fingerprint
    except (ManifestError, OSError):
        return None


_FINGERPRINTS: dict[tuple, str] = {}  # (export path, mtime, size, input fingerprint) → fingerprint


def export_fingerprint(path: str | Path, input_fingerprint: Optional[str]) -> str:
    """:func:`encoder_fingerprint` of the export at ``path`` (cached while the file is unchanged)."""
    from largewave.engine.export import read_export

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, input_fingerprint)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = encoder_fingerprint(read_export(path), input_fingerprint)
    return _FINGERPRINTS[key]


def expected_fingerprint(cfg: StackConfig, level: str, export: Optional[str | Path] = None) -> Optional[str]:
    """The fingerprint the codes of ``level`` must carry, from the exports alone: its export
    (``export``, or :func:`export_path`) over the codes the level below's export makes (for the
    level below without an export here: the fingerprint its code set records). None when
    ``level`` has no export.

    Computable without any code set on disk, so it can name the run folder of the level above."""
    path = Path(export) if export is not None else export_path(cfg, level)
    if not path.exists():
        return None
    below = cfg.below(_level_key(level))
    input_fp = None if below is None else (expected_fingerprint(cfg, below) or code_set_fingerprint(cfg, below))
    return export_fingerprint(path, input_fp)


def codes_status(cfg: StackConfig, level: str) -> tuple[bool, str]:
    """(ready, reason): are the codes of ``level`` complete and made by its current export?

    reason is ``"ready"``, ``"missing (…)"`` or ``"stale (…)"``."""
    have = code_set_fingerprint(cfg, level)
    if have is None:
        return False, f"missing (no complete code set in {codes_dir(cfg, level)})"
    want = expected_fingerprint(cfg, level)
    if want is None:
        return False, f"stale ({level} has no export at {export_path(cfg, level)} to check them against)"
    if have != want:
        return False, f"stale (codes fingerprint {have}, {level} export makes {want})"
    return True, "ready"


def check_codes(cfg: StackConfig, level: str, *, per_shard: int = 1, require_export: bool = True) -> Optional[str]:
    """Check the code set that ``level`` trains on, before training it; return its fingerprint.

    For level 1 (which reads audio) there is nothing to check: returns None. Above, the code set
    of the level below must be complete (have a manifest), describe the codes the level expects
    (level, hop, K), carry the fingerprint that the level below's export makes, and every shard
    must agree: the first ``per_shard`` sample jsons of every shard (0: manifest only) are read
    and their fingerprint, level, hop and K compared with the manifest's.

    ``require_export=False`` accepts a code set whose level below has no export here (codes
    copied from elsewhere): the shards are still checked against their manifest.

    Raises:
        CodesNotReady: the code set is missing or incomplete, or the level below has no export.
        FingerprintError: a fingerprint or code description disagrees; the message names the
            shard (or manifest) and both fingerprints, and the command that recomputes the codes.
    """
    from largewave.data.loader import CorruptSample, ShardSamples
    from largewave.data.manifest import ManifestError, read_manifest

    level = _level_key(level)
    cfg.level(level)
    below = cfg.below(level)
    if below is None:
        return None
    root = codes_dir(cfg, below)
    redo = codes_command(cfg, below)
    try:
        m = read_manifest(root)
    except ManifestError as e:
        raise CodesNotReady(f"{level} trains on the codes of {below}, which are not ready: {e}. "
                         f"Compute them with: {redo}") from None
    where = f"{root}/manifest.json"
    if m.kind != "codes":
        raise FingerprintError(f"{where}: a {m.kind} set, but {level} trains on the codes of {below}")
    blv = cfg.level(below)
    want_meta = {"level": int(below.removeprefix("level")), "hop": blv.hop, "codes": blv.quantiser.codes}
    for k, v in want_meta.items():
        if getattr(m, k) != v:
            raise FingerprintError(f"{where}: {k} = {getattr(m, k)}, but {below} of stack {cfg.stack} has "
                                   f"{k} = {v}; recompute the codes: {redo}")
    path = export_path(cfg, below)
    want = expected_fingerprint(cfg, below)
    if want is None and require_export:
        raise CodesNotReady(f"cannot check the codes in {root}: {below} has no export at {path} "
                            f"(train it: {train_command(cfg, below)})")
    if want is not None and m.fingerprint != want:
        raise FingerprintError(f"{where}: codes fingerprint {m.fingerprint}, but {below}'s export {path} "
                               f"makes fingerprint {want}: these codes were made by another encoder. "
                               f"Recompute them: {redo}")
    if per_shard > 0:
        for split, shards in m.splits.items():
            if not shards:
                continue
            samples = ShardSamples(root, split)
            first = 0
            for s in shards:
                for i in range(first, first + min(per_shard, s.samples)):
                    key = samples.keys[i]
                    try:
                        meta = json.loads(samples.members(i, ("json",))["json"])
                    except (CorruptSample, ValueError, UnicodeDecodeError) as e:
                        raise FingerprintError(f"{root}/{s.name}: sample {key} has no readable json ({e}); "
                                               f"recompute the codes: {redo}") from None
                    fp = meta.get("fingerprint")
                    if fp != m.fingerprint:
                        raise FingerprintError(f"{root}/{s.name}: sample {key} has codes fingerprint {fp}, the "
                                               f"manifest (and {below}'s export) {m.fingerprint}: the set mixes "
                                               f"codes of different encoders. Recompute it: {redo}")
                    for k, v in want_meta.items():
                        if meta.get(k) != v:
                            raise FingerprintError(f"{root}/{s.name}: sample {key} has {k} = {meta.get(k)}, "
                                                   f"expected {v}; recompute the codes: {redo}")
                first += s.samples
    return m.fingerprint


def describe_receptive_fields(cfg: StackConfig) -> list[dict[str, Any]]:
    """Per level, from the config: the decoder's receptive field in tokens and in seconds of audio
    (tokens / the level's input token rate). The prior's is what the top of the stack sees:
    receptive field tokens / top code rate."""
    rows = []
    for name in cfg.level_names():
        lv = cfg.level(name)
        rate = cfg.input_rate(name)
        rf = lv.decoder.receptive_field()
        rows.append({"level": name, "kind": lv.kind, "tokens": rf, "token_rate_hz": rate, "seconds": rf / rate})
    return rows


def print_receptive_fields(cfg: StackConfig, log=print) -> None:
    """One line per level: ``receptive field N tokens at R Hz = S s of audio``."""
    for r in describe_receptive_fields(cfg):
        log(f"# {r['level']:>7} ({r['kind']}): receptive field {r['tokens']} tokens at {r['token_rate_hz']:g} Hz "
            f"= {r['seconds']:.3f} s of audio")
