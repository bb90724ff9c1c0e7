"""Consolidated single-file export of a trained level: fp32 weights + resolved config.

This is what code precompute and sampling load. It needs neither DeepSpeed nor a GPU::

    model, cfg = load_export("runs/demo/level1/<signature>/export.pt")
    codes = model.encode(tokens)

File format (a ``torch.save`` dict, written atomically):

``format``       ``"largewave-export"``
``version``      1
``stack``        stack name
``level``        level name (``level1`` … ``prior``)
``step``         optimizer steps the weights were trained for
``config``       the resolved :class:`~largewave.config.StackConfig` as a plain dict
``state_dict``   fp32 weights and buffers of the level module — the EMA weights when
                 ``optim.ema > 0`` (those are the ones to sample from)
``train_state_dict``  the raw (non-EMA) weights, only when an EMA is kept
``signature``    the run signature (see :mod:`largewave.engine.run_folder`)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from largewave.config import StackConfig, from_dict

EXPORT_FORMAT = "largewave-export"
EXPORT_VERSION = 1


def write_export(path: str | os.PathLike, *, cfg: StackConfig, level: str, step: int,
                 state_dict: dict[str, torch.Tensor], signature: str,
                 train_state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write an export atomically (tmp + rename), so a reader never sees half a file."""
    path = Path(path)
    payload: dict[str, Any] = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "stack": cfg.stack, "level": level,
        "step": int(step), "config": cfg.to_dict(), "signature": signature,
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                       for k, v in state_dict.items()},
    }
    if train_state_dict is not None:
        payload["train_state_dict"] = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                                       for k, v in train_state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """The raw export dict (see the module docstring), checked for format and version."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a largewave export")
    if payload.get("version") != EXPORT_VERSION:
        raise ValueError(f"{path}: export version {payload.get('version')} (this code reads {EXPORT_VERSION})")
    return payload


def load_export(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                use_ema: bool = True) -> tuple[torch.nn.Module, StackConfig]:
    """Rebuild the level module from an export: ``(model in eval mode, resolved StackConfig)``.

    ``use_ema=False`` loads the raw training weights when the run kept an EMA.
    """
    from largewave.models import build_level  # models import neither deepspeed nor wandb

    payload = read_export(path)
    cfg = from_dict(payload["config"], source=f"{path}:config")
    model = build_level(cfg, payload["level"])
    weights = payload["state_dict"]
    if not use_ema and "train_state_dict" in payload:
        weights = payload["train_state_dict"]
    model.load_state_dict(weights, strict=True)
    model.to(device).eval()
    return model, cfg
