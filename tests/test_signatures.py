"""Run signatures and code fingerprints are promises: "rerun the same command = resume" and "these
codes belong to that encoder". Their golden values for every level of every file in ``configs/``
are pinned here; a change must be deliberate (regenerate with ``LARGEWAVE_UPDATE_GOLDEN=1`` and
give the reason in the commit message).

The codes fingerprint of the level below (part of a signature above level 1) is pinned to a fixed
value, and the weights given to the fingerprint are a fixed function of each tensor's shape, so
the goldens depend only on the config and on the hashing code, not on what this machine has
trained.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from largewave import stack
from largewave.config import CONFIG_DIR, ConfigError, _build, added, bookkeeping, hashed, load_config
from largewave.engine import run_folder
from largewave.models import build_level

GOLDEN = Path(__file__).parent / "golden" / "signatures.json"
BELOW = "f00dfeedf00dfeed"  # the codes fingerprint a level above level 1 is given


def _pinned_below(monkeypatch):
    monkeypatch.setattr(stack, "expected_fingerprint", lambda cfg, level, export=None: BELOW)
    monkeypatch.setattr(stack, "code_set_fingerprint", lambda cfg, level: BELOW)


def _fixed_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A fixed function of each tensor's name and shape (so that a decoder change, which the
    fingerprint does not see, moves nothing)."""
    out = {}
    for name, t in sorted(module.state_dict().items()):
        n = t.numel()
        scale = (1 + zlib.crc32(name.encode()) % 7) / 7
        values = torch.linspace(-1.0, 1.0, n, dtype=torch.float64) * scale if n else torch.zeros(0)
        out[name] = values.reshape(t.shape).to(t.dtype) if t.is_floating_point() else \
            torch.arange(n, dtype=torch.int64).reshape(t.shape).to(t.dtype)
    return out


def compute(name: str) -> dict[str, dict[str, str]]:
    cfg = load_config(name)
    result = {}
    for level in cfg.level_names():
        entry = {"signature": run_folder.signature(cfg, level)}
        if cfg.levels[level].has_codes:
            torch.manual_seed(0)
            model = build_level(cfg, level)
            payload = {"level": level, "config": cfg.to_dict(), "state_dict": _fixed_weights(model)}
            below = cfg.below(level)
            entry["fingerprint"] = stack.encoder_fingerprint(payload, None if below is None else BELOW)
        result[level] = entry
    return result


CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_every_config_has_a_golden():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == CONFIGS, "add the new config's goldens with LARGEWAVE_UPDATE_GOLDEN=1"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", CONFIGS)
def test_signatures_and_fingerprints_are_the_golden_ones(name, monkeypatch):
    _pinned_below(monkeypatch)
    got = compute(name)
    if os.environ.get("LARGEWAVE_UPDATE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = got
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())[name]
    assert got == golden, (f"configs/{name}.yaml: signatures or fingerprints moved: {got} != {golden}. "
                           "Existing runs would not resume / existing code sets would be refused. If the "
                           "computation really changed, regenerate with LARGEWAVE_UPDATE_GOLDEN=1 and say why.")


# ---- how fields may be added and renamed without moving them ------------------------------------


def test_bookkeeping_fields_do_not_move_a_signature_and_computation_fields_do(monkeypatch):
    _pinned_below(monkeypatch)
    base = run_folder.signature(load_config("demo"), "level1")
    for ov in ("level1.train.log_every=7", "level1.train.eval_every=9", "level1.train.micro_batch=3",
               "level1.train.grad_accum=4", "level1.train.keep_checkpoints=9", "level1.train.sample_clips=0",
               "run.root=elsewhere", "data.workers=0"):
        assert run_folder.signature(load_config("demo", [ov]), "level1") == base, ov
    for ov in ("level1.optim.lr=7.5e-4", "level1.train.steps=123", "level1.train.crop=800", "data.seed=1",
               "level1.quantiser.codes=32", "level1.decoder.max_dilation=4"):
        assert run_folder.signature(load_config("demo", [ov]), "level1") != base, ov


def test_an_added_field_at_its_default_and_a_renamed_field_keep_the_hash():
    @dataclass
    class Before:
        width: int = 4
        codes: int = 16

    @dataclass
    class After:  # one field renamed (codes → num_codes), one added, one bookkeeping field
        ALIASES: ClassVar[dict[str, str]] = {"codes": "num_codes"}
        width: int = 4
        num_codes: int = field(default=16, metadata={"hash_name": "codes"})
        temperature: float = added(1.0)
        log_every: int = bookkeeping(10)

    assert hashed(After()) == hashed(Before())
    assert hashed(After(log_every=3)) == hashed(Before())
    assert hashed(After(temperature=0.5)) != hashed(Before())
    assert hashed(After(num_codes=8)) == hashed(Before(codes=8))
    assert _build(After, {"codes": 8}, "", "test.yaml").num_codes == 8  # the old key is an alias
    with pytest.raises(ConfigError, match="codes: an old name of num_codes"):
        _build(After, {"codes": 8, "num_codes": 8}, "", "test.yaml")
