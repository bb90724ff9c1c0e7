"""A tiny 2-level stack + prior for tests: config, synthetic audio shards, untrained exports.

    cfg = tiny_stack(tmp_path)                    # configs/demo.yaml shrunk, everything under tmp_path
    make_audio(cfg)                               # train/valid/test audio shards
    export_untrained(cfg, "level1")               # a randomly initialised level written as its export

Exports are written where the stack expects them (:func:`largewave.stack.export_path`), with
``write_export`` as the engine writes them, so precompute and sampling load them like trained ones.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shardutil import make_audio_shards  # noqa: E402

from largewave import stack  # noqa: E402
from largewave.config import StackConfig, load_config  # noqa: E402
from largewave.engine.export import write_export  # noqa: E402
from largewave.models import build_level  # noqa: E402

TINY = [
    "level1.hop=4",
    "level1.encoder.channels=8", "level1.encoder.layers_per_stack=3", "level1.encoder.stacks=1",
    "level1.quantiser.codes=16", "level1.quantiser.dim=8",
    "level1.decoder.residual_channels=8", "level1.decoder.gate_channels=16", "level1.decoder.skip_channels=16",
    "level1.decoder.layers_per_stack=3", "level1.decoder.cond_channels=8", "level1.train.crop=256",
    "level2.hop=2",
    "level2.encoder.channels=8", "level2.encoder.layers_per_stack=2", "level2.encoder.input_embedding=4",
    "level2.quantiser.codes=8", "level2.quantiser.dim=4",
    "level2.decoder.residual_channels=8", "level2.decoder.gate_channels=16", "level2.decoder.skip_channels=16",
    "level2.decoder.layers_per_stack=3", "level2.decoder.cond_channels=4", "level2.train.crop=64",
    "prior.decoder.residual_channels=8", "prior.decoder.gate_channels=16", "prior.decoder.skip_channels=16",
    "prior.decoder.stacks=2", "prior.decoder.layers_per_stack=4", "prior.decoder.input_kernel_size=2",
    "prior.train.crop=32",
    # no quality figures at evaluations (they reconstruct seconds of audio sample by sample)
    "level1.train.eval_clips=0", "level2.train.eval_clips=0", "prior.train.eval_clips=0",
]


def tiny_stack(root: Path, *extra: str, name: str = "tiny") -> StackConfig:
    """The demo stack at test size (level 1 hop 4, K 16; level 2 hop 2, K 8; a small prior), with
    ``run.root``, ``data.shards`` and ``data.codes`` under ``root``."""
    root = Path(root)
    return load_config("demo", [f"stack={name}", f"run.root={root / 'runs'}", f"data.shards={root / 'audio'}",
                                f"data.codes={root / 'codes'}", *TINY, *extra])


def make_audio(cfg: StackConfig, pieces: int = 3, seconds: float = 1.5) -> None:
    """Audio shards in ``data.shards``: train (several shards, segments not multiples of any hop),
    valid and test."""
    root = cfg.path(cfg.data.shards)
    make_audio_shards(root, pieces=pieces, seconds=seconds, segment_seconds=0.6, per_shard=2, split="train")
    make_audio_shards(root, pieces=1, seconds=0.7, segment_seconds=1.0, per_shard=2, split="valid", seed=1)
    make_audio_shards(root, pieces=1, seconds=0.45, segment_seconds=1.0, per_shard=2, split="test", seed=2)


def untrained(cfg: StackConfig, level: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_level(cfg, level).eval()


def export_untrained(cfg: StackConfig, level: str, seed: int = 0) -> Path:
    """Write a randomly initialised ``level`` as its export; returns the path."""
    model = untrained(cfg, level, seed)
    path = stack.export_path(cfg, level)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_export(path, cfg=cfg, level=level, step=0, state_dict=model.state_dict(), signature="test")
