"""The training engine: DeepSpeed ZeRO training, checkpoints, W&B logging and exports.

Only this package (and the launchers) import deepspeed and wandb; model code never does.
``load_export`` needs neither.
"""
from largewave.engine.export import load_export, read_export  # noqa: F401
