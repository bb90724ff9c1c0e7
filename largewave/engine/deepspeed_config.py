"""DeepSpeed configuration built from ours (there is no second JSON file that could drift).

The learning-rate schedule is a plain ``torch.optim.lr_scheduler.LambdaLR`` (linear warmup, then
cosine or linear decay to ``lr · min_lr_ratio``) handed to ``deepspeed.initialize``: DeepSpeed
steps it once per optimizer step and stores its state in the checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from largewave.config import LevelConfig


def deepspeed_config(lv: LevelConfig, world_size: int, precision: str, *,
                     load_universal: bool = False) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize(config=...)`` for one level."""
    t, o = lv.train, lv.optim
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # Keep partitioned parameters partitioned in checkpoints: consolidated weights come from
        # the fp32 partitions (export), so gathering 16-bit copies on every save is wasted work.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused / CPU Adam would compile C++ ops on first use
            # (~1 minute); torch's AdamW is what we want on CPU and is fine on GPU at our sizes.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8,
                       "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "checkpoint": {"load_universal": load_universal},
        # Our own console line and W&B logging replace DeepSpeed's periodic prints.
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def lr_lambda(lv: LevelConfig) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps: warmup, then decay."""
    o, total = lv.optim, lv.train.steps
    warmup = o.warmup_steps

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if o.decay == "none" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if o.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return f


def make_scheduler(lv: LevelConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """The callable DeepSpeed calls with its (possibly ZeRO-wrapped) optimizer."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(lv))


def memory_estimate(lv: LevelConfig, params: int, world_size: int, precision: str) -> dict[str, float]:
    """Rough per-rank memory (GiB) of model states and activations, to size crops and ZeRO stages.

    Model states: fp32 Adam keeps weights, gradients and two moments (16 bytes/parameter; bf16 adds
    2-byte working copies of weights and gradients), partitioned by ZeRO: stage 1 splits optimizer
    moments (and fp32 masters), stage 2 also gradients, stage 3 also weights. Activations: what a
    WaveNet layer keeps for backward per token — the dilated conv's output (gate channels), the
    gated output, residual and skip outputs and the conditioning projection — times layers, crop
    and micro-batch; activation checkpointing keeps only each layer's input.
    """
    d = lv.decoder
    bytes_act = 2 if precision == "bf16" else 4
    per_layer = d.gate_channels * 2 + d.gate_channels // 2 + d.residual_channels + d.skip_channels + d.cond_channels
    tokens = lv.train.micro_batch * lv.train.crop
    act_full = tokens * d.layers * per_layer * bytes_act
    act_ckpt = tokens * d.layers * d.residual_channels * bytes_act + tokens * per_layer * bytes_act
    w = 2 if precision == "bf16" else 0
    stage = lv.train.zero_stage
    weights = (4 + w) * params / (world_size if stage >= 3 else 1)
    grads = 4 * params / (world_size if stage >= 2 else 1)
    moments = 8 * params / (world_size if stage >= 1 else 1)
    gib = 1024 ** 3
    return {"model_states_gib": (weights + grads + moments) / gib,
            "activations_gib": act_full / gib, "activations_checkpointed_gib": act_ckpt / gib}
