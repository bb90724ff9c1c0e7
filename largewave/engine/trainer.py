"""Train one level of a stack with DeepSpeed ZeRO: ``train(cfg, "level1") -> TrainResult``.

The loop (:meth:`Trainer.run`) reads as a table of contents: set up → resume from the latest
complete checkpoint, if any → loop (stop request? step, log, evaluate, sample, save) → final
checkpoint and export.

Exit protocol (what ``largewave train`` returns to the shell / the cluster launcher):

``0``  :data:`EXIT_OK` — all ``train.steps`` done; the final checkpoint and ``export.pt`` exist.
``2``  :data:`EXIT_CONFIG` — the config or the data cannot be used (nothing started).
``3``  :data:`EXIT_STOPPED` — a stop request (SIGUSR2 / SIGTERM) was honoured: every rank saved a
       complete checkpoint; rerunning the same command resumes. Requeue on this code.
``4``  :data:`EXIT_NONFINITE` — ``train.max_nonfinite`` consecutive non-finite losses; the run
       stopped without saving the diverged state (the last checkpoint is intact).

Exact resume. A checkpoint holds DeepSpeed's sharded model/optimizer/scheduler states plus, per
rank, the RNG states, the loader position and the module buffers (some, like a quantiser's
reservoir of recent encoder outputs, are rank-local), and the common state (step, W&B run id, EMA,
counters). Resuming on the same world size continues bitwise identically to an uninterrupted run.
Evaluation and sampling run on a separate copy of the weights inside ``torch.random.fork_rng``
with their own generators, so they never touch training's random streams or buffers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from largewave import distributed
from largewave.config import ConfigError, StackConfig, _level_key, dump_yaml
from largewave.engine import checkpoint as ckpt
from largewave.engine import evaluate
from largewave.engine.deepspeed_config import deepspeed_config, make_scheduler, memory_estimate
from largewave.engine.export import write_export
from largewave.engine.run_folder import data_root, run_dir, signature, signature_payload, write_snapshot, write_state

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_NONFINITE = 4

_STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run diverged."""


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank."""

    run_dir: Path
    step: int
    steps: int
    stopped: bool = False  # a stop request was honoured (checkpoint saved; requeue)
    stop_signal: Optional[str] = None  # "SIGUSR2" / "SIGTERM"
    export: Optional[Path] = None
    checkpoint: Optional[Path] = None
    wandb: Optional[str] = None
    paused: bool = False  # stopped at ``train.pause_at`` (checkpoint saved, no export yet)
    eval: dict[str, float] = field(default_factory=dict)  # the last validation: bits_per_token, codes_used, …

    @property
    def exit_code(self) -> int:
        return EXIT_STOPPED if self.stopped else EXIT_OK

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step, "steps": self.steps, "stopped": self.stopped,
                "stop_signal": self.stop_signal, "export": str(self.export) if self.export else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "wandb": self.wandb,
                "paused": self.paused, "eval": dict(self.eval)}


def train(cfg: StackConfig, level: str | int, *, argv: Optional[list[str]] = None) -> TrainResult:
    """Train (or resume) ``level`` of ``cfg`` on this process's rank. See the module docstring.

    Raises :class:`~largewave.config.ConfigError` before anything starts when the config or the
    data cannot work, and :class:`NonFiniteLossError` when the loss diverged.
    """
    return Trainer(cfg, level, argv=argv).run()


# ---- checks that run before any process group, model or file exists -------------------------


def preflight(cfg: StackConfig, level: str) -> dict[str, Any]:
    """Validate what the config alone cannot: the data the level reads. Returns the manifest
    facts used later. Errors name the config key to change."""
    from largewave.data.manifest import ManifestError, read_manifest

    lv = cfg.level(level)
    key = f"levels.{level}"
    root = data_root(cfg, level)
    below = cfg.below(level)
    what = "data.shards" if below is None else "data.codes"
    try:
        m = read_manifest(root)
    except (ManifestError, FileNotFoundError, OSError) as e:
        from largewave.stack import shards_command

        hint = f"build the audio shards first ({shards_command(cfg)})" if below is None \
            else f"train {below} and precompute its codes first"
        raise ConfigError(f"{cfg.stack}: {what}: no usable shard set at {root!r} for {level} ({e}); {hint}") from None
    if below is None and m.kind != "audio":
        raise ConfigError(f"{cfg.stack}: {what}: {root} holds {m.kind} shards; {level} trains on audio")
    if below is not None:
        if m.kind != "codes":
            raise ConfigError(f"{cfg.stack}: {what}: {root} holds {m.kind} shards; {level} trains on codes of {below}")
        if m.codes is not None and m.codes != cfg.vocab(level):
            raise ConfigError(f"{cfg.stack}: levels.{below}.quantiser.codes: the codes at {root} have K={m.codes}, "
                              f"the config says {cfg.vocab(level)}; recompute the codes")
        from largewave.stack import check_codes

        # every shard agrees with the manifest, and the manifest with the export of the level
        # below when it is here (codes copied from elsewhere are checked against themselves)
        try:
            check_codes(cfg, level, require_export=False)
        except ConfigError as e:
            raise ConfigError(f"{cfg.stack}: {what}: {e} (recompute the codes of {below})") from None
    if below is None and m.sample_rate != cfg.audio.sample_rate:
        raise ConfigError(f"{cfg.stack}: audio.sample_rate: {cfg.audio.sample_rate} but the shards at {root} are "
                          f"{m.sample_rate} Hz")
    lengths = [n for s in m.shards("train") for n in s.lengths]
    if not lengths:
        raise ConfigError(f"{cfg.stack}: {what}: {root} has no train split")
    if max(lengths) < lv.train.crop:
        raise ConfigError(f"{cfg.stack}: {key}.train.crop: {lv.train.crop} tokens is longer than every train "
                          f"segment (longest {max(lengths)} tokens)")
    valid = [n for s in m.shards("valid") for n in s.lengths]
    return {"root": root, "manifest": m, "fingerprint": m.fingerprint if below is not None else None,
            "has_valid": bool(valid) and max(valid) >= lv.train.crop,
            "train_tokens": sum(lengths)}


# ---- stop requests -------------------------------------------------------------------------------


class StopFlag:
    """SIGUSR2 / SIGTERM set a flag; the loop agrees on it across ranks at the next step boundary.
    The handler does nothing else: a ZeRO save needs every rank, so it cannot run in a handler."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for s in _STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum


# ---- weights EMA ----------------------------------------------------------------------------------


class WeightEMA:
    """Exponential moving average of the (full) parameters, identical on every rank."""

    def __init__(self, decay: float, params: dict[str, torch.Tensor]):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for k, v in params.items():
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# ---- the trainer -------------------------------------------------------------------------------


def _as_objective(model: torch.nn.Module) -> None:
    """Make ``model(tokens)`` run the level's training objective.

    DeepSpeed drives the module through ``engine(tokens)`` → ``module.forward``; under ZeRO-3 that
    call is what gathers partitioned weights. Level modules expose ``loss(tokens) -> LossOutput``
    and have no ``forward`` of their own, so the instance's ``forward`` is bound to ``loss`` with
    the result as a (loss, terms, metrics) tuple — containers DeepSpeed's hooks traverse. The class
    and the parameter names are untouched, so checkpoints hold the plain module.
    """
    def forward(tokens: torch.Tensor):
        out = model.loss(tokens)
        return out.loss, dict(out.terms), dict(out.metrics)

    model.forward = forward  # type: ignore[method-assign]


def _register_zero3_external_parameters(model: torch.nn.Module, hop: int, crop: int) -> None:
    """Keep ZeRO-3 from releasing weights that backward still needs.

    ZeRO-3 gathers a module's weights before its forward and, for backward, re-gathers them from
    hooks it attaches to the tensors the module returns — but it only finds tensors inside
    tuples, lists and dicts. A module returning a dataclass (a quantiser's ``QuantiserOutput``)
    gets no such hook, so its own weights would be missing in backward. Those modules are found
    with one small forward pass (eval mode, no grad, training's RNG untouched) and their direct
    weights registered as external parameters of the root module, whose outputs are a tuple.
    """
    import deepspeed

    offenders: list[torch.nn.Module] = []

    def hook(mod, inputs, output):
        if dataclasses.is_dataclass(output):
            offenders.append(mod)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.random.fork_rng(), torch.no_grad():
            model.loss(torch.zeros(1, min(crop, 64 * hop), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for mod in offenders:
        for p in mod.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, p)


class Trainer:
    """One level's training on this rank. ``Trainer(cfg, level)`` checks config and data (no
    process group, model or file yet); :meth:`run` does the rest. The steps of :meth:`run` are
    public so that tests and tools can drive them (``setup``, ``resume``, ``train_step``, …)."""

    def __init__(self, cfg: StackConfig, level: str | int, *, argv: Optional[list[str]] = None):
        self.cfg = cfg
        self.level = _level_key(level)
        self.lv = cfg.level(self.level)
        self.argv = argv
        self.data = preflight(cfg, self.level)
        self.signature = signature(cfg, self.level)
        self.run_dir = run_dir(cfg, self.level)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self._step_base = self._samples_base = 0  # samples_seen() = base + steps since base × global batch
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.stop = StopFlag()
        self.ema: Optional[WeightEMA] = None
        self.wandb = None
        self._probe: Optional[evaluate.QualityProbe] = None  # the fixed clips of the quality figures
        self.engine = None
        self.last_saved_step = -1
        self._window: dict[str, float] = {}
        self._eval_model: Optional[torch.nn.Module] = None
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self._batches = None

    # -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            self.setup()
            self.resume()
            steps = self.lv.train.steps
            pause = self.lv.train.pause_at
            end = pause if 0 < pause < steps else steps
            while self.step < end:
                if self.stop_requested():
                    return self.stop_and_save()
                stats = self.train_step()
                self.step += 1
                self.log(stats)
                self.evaluate_if_due()
                self.sample_if_due()
                self.save_if_due()
            if end < steps:
                return self.pause()
            self.save()
            export = self.export()
            self._state("done", export=str(export))
            self.wandb.log_export(export, metadata={"stack": self.cfg.stack, "level": self.level,
                                                    "signature": self.signature, "step": self.step})
            return self.result(export=export)
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                print(f"[largewave] rank {getattr(self, 'rank', '?')}: a collective waited longer than "
                      f"run.collective_timeout_s = {self.cfg.run.collective_timeout_s:g} s — another rank died or "
                      f"hung. Complete checkpoints are intact; rerun the same command to resume.",
                      file=sys.stderr, flush=True)
            self._state("failed", error=str(e).strip().splitlines()[-1][:500] if str(e).strip() else repr(e))
            raise
        except KeyboardInterrupt:
            self._state("stopped", error="interrupted")
            raise
        except Exception as e:
            self._state("failed", error=f"{type(e).__name__}: {str(e).strip()[:500]}")
            raise
        finally:
            self.teardown()

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        t = self.lv.train
        self.stop.install()  # before loader workers fork: they inherit it instead of dying on SIGTERM
        # A resumed run keeps the precision its checkpoints were trained in: "auto" may resolve
        # differently on another node or after a library update, and a run must never switch.
        stored = ckpt.stored_precision(self.ckpt_root) if t.precision == "auto" else None
        self.rt = distributed.init(precision=stored or t.precision, timeout_s=self.cfg.run.collective_timeout_s)
        if stored:
            self.rt = dataclasses.replace(self.rt, precision_reason=f"auto, kept from the run's checkpoints ({stored})")
        self.rank, self.world = self.rt.rank, self.rt.world_size
        self.device = self.rt.device
        self._limit_threads()
        self.main = self.rt.is_main
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            (self.run_dir / "signature.json").write_text(json.dumps(signature_payload(self.cfg, self.level), indent=1))
            write_snapshot(self.run_dir, self.argv)
        self.plan_resume()
        self.build_engine()
        self.build_loaders()
        self.start_wandb()
        self._state("running", steps=self.lv.train.steps, wandb=self.wandb.location, wandb_path=self.wandb.path)
        self.print_banner()

    def _state(self, state: str, **fields) -> None:
        """``state.json`` of the run folder (rank 0; see largewave.engine.run_folder.write_state)."""
        if getattr(self, "main", False) and self.run_dir.exists():
            write_state(self.run_dir, state, step=self.step, **fields)

    def _limit_threads(self) -> None:
        if self.device.type != "cpu":
            return
        distributed.flush_denormals()  # a trained decoder makes subnormals: slow on x86
        # Several ranks on one CPU host must share its cores, not each grab all of them.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(distributed.cpu_threads_per_rank())

    def plan_resume(self) -> None:
        """Find the checkpoint to resume from, drop interrupted ones, convert for a new world size."""
        latest = ckpt.latest_complete(self.ckpt_root)
        distributed.barrier()  # everyone has looked before rank 0 deletes anything
        if self.main:
            for p in ckpt.remove_incomplete(self.ckpt_root):
                print(f"[largewave] removed incomplete checkpoint {p} (interrupted while saving)", flush=True)
        self.resume_from = latest
        self.warm_from: Optional[Path] = None
        if latest is None and self.lv.train.init_from:
            self.warm_from = self._check_warm_start(Path(self.lv.train.init_from))
        self.resume_universal = False
        self.common: dict[str, Any] = {}
        if latest is not None:
            self.common = torch.load(ckpt.common_state_path(latest.path), map_location="cpu", weights_only=False)
            if int(self.common["world_size"]) != self.world:
                self.resume_universal = True
                if self.main:
                    t0 = time.time()
                    print(f"[largewave] {latest.path} was written by {self.common['world_size']} ranks, this run has "
                          f"{self.world}: converting to a universal checkpoint", flush=True)
                    ckpt.ensure_universal(latest.path)
                    print(f"[largewave] converted in {time.time() - t0:.1f} s", flush=True)
        distributed.barrier()

    def build_engine(self) -> None:
        import logging

        import deepspeed

        # DeepSpeed's INFO lines (config dumps, per-step timers) drown our own console line.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

        from largewave.models import build_level

        t = self.lv.train
        # Identical initial weights on every rank (DeepSpeed does not broadcast them under ZeRO-3).
        torch.manual_seed(t.seed)
        model = build_level(self.cfg, self.level)
        self.n_params = sum(p.numel() for p in model.parameters())
        if t.activation_checkpointing:
            self._enable_activation_checkpointing(model)
        if t.zero_stage == 3:
            _register_zero3_external_parameters(model, self.lv.hop, t.crop)
        _as_objective(model)
        ds_cfg = deepspeed_config(self.lv, self.world, self.rt.precision, load_universal=self.resume_universal)
        self.ds_config = ds_cfg
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=ds_cfg, lr_scheduler=make_scheduler(self.lv))
        self.module = self.engine.module
        if self.lv.optim.ema > 0:
            self.ema = WeightEMA(self.lv.optim.ema, self.full_parameters())
        # Each rank's own stream for whatever the model samples during training (e.g. VQ restarts).
        self._seed_rank_rngs(t.seed, step=0)

    def _enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        hits = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
        for m in hits:
            m.activation_checkpointing = True
        if not hits and self.rt.is_main:
            print("[largewave] train.activation_checkpointing: this model has no checkpointable layers; "
                  "training without", flush=True)

    def _seed_rank_rngs(self, seed: int, step: int) -> None:
        s = (seed * 1_000_003 + self.rank * 7_919 + step) % (2 ** 31)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def build_loaders(self) -> None:
        from largewave.data.loader import TrainLoader

        t = self.lv.train
        self.loader = TrainLoader(self.data["root"], "train", crop=t.crop, hop=self.lv.hop,
                                  crops_per_segment=t.crops_per_segment, batch_size=t.micro_batch,
                                  seed=self.cfg.data.seed, rank=self.rank, world_size=self.world,
                                  num_workers=self.cfg.data.workers, mu=self.cfg.audio.mu,
                                  fingerprint=self.data["fingerprint"])
        self._batches = None  # the iterator starts after resume has positioned the loader

    def start_wandb(self) -> None:
        from largewave.engine.wandb_log import WandbLogger, new_run_id, resolve_mode

        mode = resolve_mode(self.cfg.run.wandb_mode)
        run_id = self.common.get("wandb_run_id")
        id_file = self.run_dir / "wandb" / "run_id"
        if self.main and run_id is None:
            # A run killed before its first checkpoint keeps its id too.
            run_id = id_file.read_text().strip() if id_file.exists() else (new_run_id() if mode != "disabled" else "")
        self.wandb_run_id = run_id
        if self.main and mode != "disabled":
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        config = {"stack": self.cfg.to_dict(), "level": self.level, "signature": self.signature,
                  "world_size": self.world, "derived": self.cfg.derived(self.level, self.world),
                  "parameters": self.n_params, "deepspeed": self.ds_config}
        self.wandb = WandbLogger(enabled=self.main, run_dir=self.run_dir, mode=mode, project=self.cfg.run.wandb_project,
                                 entity=self.cfg.run.wandb_entity, group=f"{self.cfg.stack}-{self.level}",
                                 name=f"{self.cfg.stack}/{self.level}/{self.signature}", run_id=run_id or "none",
                                 config=config, tags=[self.cfg.stack, self.level])

    def print_banner(self) -> None:
        if not self.main:
            return
        d = self.cfg.derived(self.level, self.world)
        mem = memory_estimate(self.lv, self.n_params, self.world, self.rt.precision)
        t = self.lv.train
        rate = d["input_rate_hz"]
        lines = [
            f"[largewave] {self.cfg.stack}/{self.level} ({self.lv.kind}) on {self.world} rank(s), "
            f"{self.device.type} {self.rt.backend} {self.rt.precision}, ZeRO-{t.zero_stage}",
            f"  precision         {self.rt.precision} ({self.rt.precision_reason})",
            f"  parameters        {self.n_params:,}",
            f"  vocabulary        {d['vocab']} tokens at {rate:g} Hz",
            f"  receptive field   {d['receptive_field_tokens']} tokens = {d['receptive_field_ms']:.1f} ms",
            f"  hop               {d['hop']} (= {d['hop_in_samples']} audio samples)"
            + (f", codes at {d['code_rate_hz']:g} Hz" if d["code_rate_hz"] else ""),
            f"  crop              {t.crop} tokens = {d['crop_seconds']:.3f} s",
            f"  effective batch   {d['effective_batch']} = {t.micro_batch} micro × {t.grad_accum} accum × {self.world} "
            f"ranks ({d['audio_seconds_per_step']:.2f} s of audio per step)",
            f"  memory / rank     model states {mem['model_states_gib']:.3f} GiB, activations "
            f"{mem['activations_gib']:.3f} GiB ({mem['activations_checkpointed_gib']:.3f} GiB with activation "
            f"checkpointing{', on' if t.activation_checkpointing else ''})",
            f"  data              {self.data['root']} ({self.data['train_tokens'] / rate / 3600:.2f} h train"
            f"{'' if self.data['has_valid'] else ', no usable valid split: no evaluation'})",
            f"  run folder        {self.run_dir}",
            f"  checkpoints       {self.ckpt_root} (every {t.save_every} steps, keep {t.keep_checkpoints})",
            f"  export            {self.run_dir / 'export.pt'} (at the end)",
            f"  W&B               {self.wandb.location}",
        ]
        if self.resume_from is not None:
            lines.append(f"  resuming from     {self.resume_from.path}"
                         + (" (universal: different world size)" if self.resume_universal else ""))
            before = self.common.get("global_batch")
            if before is not None and before != d["effective_batch"]:
                lines.append(f"  NOTE              the effective batch changes from {before} to {d['effective_batch']}; "
                             f"set levels.{self.level}.train.grad_accum / micro_batch to keep it")
        print("\n".join(lines), flush=True)

    # ---- resume ---------------------------------------------------------------------------------

    def _check_warm_start(self, path: Path) -> Path:
        key = f"levels.{self.level}.train.init_from"
        if not (path / ckpt.COMPLETE).exists():
            raise ConfigError(f"{self.cfg.stack}: {key}: {path} is not a complete checkpoint folder")
        common = torch.load(ckpt.common_state_path(path), map_location="cpu", weights_only=False)
        if int(common["world_size"]) != self.world:
            raise ConfigError(f"{self.cfg.stack}: {key}: {path} was written by {common['world_size']} ranks; a warm "
                              f"start needs the same number of ranks (this run has {self.world})")
        if common.get("level") != self.level:
            raise ConfigError(f"{self.cfg.stack}: {key}: {path} is a checkpoint of {common.get('level')}, not {self.level}")
        return path

    def warm_start(self) -> None:
        """Start from another run's checkpoint (a population member copying a better one): its
        weights, buffers and optimizer state, but this run's own learning-rate schedule (built from
        this run's config, at the checkpoint's step), W&B run, data order and random streams."""
        path = self.warm_from
        t0 = time.time()
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        common = torch.load(ckpt.common_state_path(path), map_location="cpu", weights_only=False)
        self.step = int(common["step"])
        t = self.lv.train
        self._step_base, self._samples_base = self.step, self.step * t.micro_batch * t.grad_accum * self.world
        if self.ema is not None and common.get("ema") is not None:
            self.ema.load_state_dict(common["ema"])
        state = torch.load(ckpt.rank_state_path(path, self.rank), map_location="cpu", weights_only=False)
        self._load_buffers(state["buffers"])
        position = self.loader.state_dict()
        position["epoch"], position["index"] = divmod(self.step * t.grad_accum, self.loader.batches_per_epoch)
        self.loader.load_state_dict(position)
        self._seed_rank_rngs(t.seed, self.step)
        sched = self.engine.lr_scheduler
        if sched is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
                sched.last_epoch = self.step - 1
                sched.step()
        if self.main:
            lr = self.engine.optimizer.param_groups[0]["lr"]
            print(f"[largewave] warm start at step {self.step} from {path} in {time.time() - t0:.2f} s "
                  f"(this run's lr schedule: {lr:.3g} now)", flush=True)

    def resume(self) -> None:
        c = self.resume_from
        if c is None:
            if self.warm_from is not None:
                self.warm_start()
            return
        t0 = time.time()
        if self.resume_universal:
            tag = ckpt.universal_dir(c.path).name
        else:
            tag = c.tag
        path, _ = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {self.ckpt_root / tag}")
        common = self.common
        self.step = int(common["step"])
        self._step_base, self._samples_base = self.step, int(common.get("samples_seen", 0))
        self.nonfinite_total = int(common.get("nonfinite_total", 0))
        self.nonfinite_run = int(common.get("nonfinite_run", 0))
        if self.ema is not None and common.get("ema") is not None:
            self.ema.load_state_dict(common["ema"])
        mine = ckpt.rank_state_path(c.path, self.rank)
        if not self.resume_universal and mine.exists():
            state = torch.load(mine, map_location="cpu", weights_only=False)
            ckpt.set_rng_state(state["rng"])
            self.loader.load_state_dict(state["loader"])
            self._load_buffers(state["buffers"])
        else:
            # A new world size: rank r continues from the old rank r's loader position when it
            # existed (the loader rescales it to the new world size), and gets a fresh RNG stream
            # derived from (seed, step, rank) — exactness is not possible across world sizes.
            old = ckpt.rank_state_path(c.path, min(self.rank, int(common["world_size"]) - 1))
            state = torch.load(old, map_location="cpu", weights_only=False)
            self.loader.load_state_dict(state["loader"])
            # module buffers (usage counts, VQ codebooks and their EMA statistics) are kept equal
            # on every rank, so the old rank's copy is everyone's
            self._load_buffers(state["buffers"])
            self._seed_rank_rngs(self.lv.train.seed, self.step)
        self.last_saved_step = self.step
        if self.main:
            print(f"[largewave] resumed at step {self.step} from {c.path} in {time.time() - t0:.2f} s "
                  f"(samples seen {common.get('samples_seen', '?')})", flush=True)

    def _load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        own = dict(self.module.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                if k in own:
                    own[k].copy_(v.to(own[k].device))

    # ---- the step -------------------------------------------------------------------------------

    def stop_requested(self) -> bool:
        """Agree across ranks (MAX) whether any rank got a stop signal."""
        flag = float(self.stop.signum or 0)
        agreed = distributed.all_reduce_max([flag], self.device)[0]
        if agreed and self.stop.signum is None:
            self.stop.signum = int(agreed)
        return bool(agreed)

    def _next_batch(self):
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: ``grad_accum`` micro-batches with a finite loss on every rank.

        A micro-batch whose loss is non-finite on any rank (agreed by a MAX all-reduce before
        backward) is dropped on every rank — no backward, no optimizer update from it — counted,
        and replaced by the next one. ``max_nonfinite`` in a row stop the run.
        """
        t = self.lv.train
        t0 = time.perf_counter()
        wait = 0.0
        sums: dict[str, float] = {}
        done = 0
        while done < t.grad_accum:
            tw = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - tw
            tokens = batch.tokens.to(self.device, non_blocking=True)
            with distributed.autocast(self.rt):
                loss, terms, metrics = self.engine(tokens)
            bad = distributed.all_reduce_max([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], self.device)[0]
            if bad:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                if self.main:
                    print(f"[largewave] step {self.step + 1}: non-finite loss on some rank; micro-batch skipped "
                          f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)", flush=True)
                if self.nonfinite_run >= t.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_run} consecutive non-finite losses at step {self.step + 1} "
                        f"(levels.{self.level}.train.max_nonfinite = {t.max_nonfinite}): the run diverged. "
                        f"Lower levels.{self.level}.optim.lr or raise warmup_steps; the last checkpoint is intact.")
                del loss, terms, metrics
                continue
            self.nonfinite_run = 0
            self.engine.backward(loss)
            self.engine.step()
            done += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[f"loss/{k}"] = sums.get(f"loss/{k}", 0.0) + float(v.detach())
            for k, v in metrics.items():
                sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        if self.ema is not None:
            self.ema.update(self.full_parameters())
        elapsed = time.perf_counter() - t0
        out = {k: v / t.grad_accum for k, v in sums.items()}
        out["_time"] = elapsed
        out["_wait"] = wait
        return out

    # ---- weights outside the step ---------------------------------------------------------------

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) parameters, on every rank; a collective under ZeRO-3."""
        params = dict(self.module.named_parameters())
        if self.lv.train.zero_stage != 3:
            return {k: v.detach() for k, v in params.items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in params.items()}

    def weights_copy(self, use_ema: bool = True) -> torch.nn.Module:
        """A plain module with the current (EMA) weights and this rank's buffers, in eval mode.
        Evaluation and sampling run on it so they cannot disturb training state."""
        from largewave.models import build_level

        if self._eval_model is None:
            with self._isolated_rng():  # its initial weights must not draw from training's streams
                self._eval_model = build_level(self.cfg, self.level).to(self.device)
        m = self._eval_model
        params = self.ema.shadow if (use_ema and self.ema is not None) else self.full_parameters()
        with torch.no_grad():
            own = dict(m.named_parameters())
            for k, v in params.items():
                own[k].copy_(v)
            own_b = dict(m.named_buffers())
            for k, v in self.module.named_buffers():
                own_b[k].copy_(v)
        return m.eval()

    # ---- logging --------------------------------------------------------------------------------

    def log(self, stats: dict[str, Any]) -> None:
        t = self.lv.train
        w = self._window
        for k, v in stats.items():
            w[k] = w.get(k, 0.0) + v
        w["_steps"] = w.get("_steps", 0) + 1
        if self.step % t.log_every and self.step != t.steps:
            return
        n = w.pop("_steps")
        elapsed, wait = w.pop("_time"), w.pop("_wait")
        keys = sorted(w)
        means = distributed.all_reduce_sum([w[k] / n for k in keys], self.device)
        avg = {k: v / self.world for k, v in zip(keys, means)}
        self._window = {}
        tokens = n * t.micro_batch * t.grad_accum * t.crop
        rate = self.cfg.input_rate(self.level)
        lr = self.engine.get_lr()[0]
        gnorm = self.engine.get_global_grad_norm()
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        data = {**avg, "lr": lr, "grad_norm": gnorm,
                "perf/tokens_per_s_per_rank": tokens / elapsed, "perf/audio_s_per_s_per_rank": tokens / rate / elapsed,
                "perf/audio_s_per_s": tokens / rate / elapsed * self.world,
                "perf/step_time_s": elapsed / n, "perf/data_wait_fraction": wait / max(elapsed, 1e-9),
                "perf/memory_gib": self._memory_gib(), "nonfinite/skipped_total": self.nonfinite_total,
                "progress/samples_seen": self.samples_seen(), **self.loader.stats()}
        if "train/bits_per_token" in data:
            data["train/bits_per_second"] = data["train/bits_per_token"] * rate
        if self.main:
            self.wandb.log(self.step, data)
            self._state("running")
            print(f"[{self.cfg.stack}/{self.level}] step {self.step:>7d}/{t.steps} | loss {avg.get('loss', float('nan')):.4f}"
                  f" | {avg.get('train/bits_per_token', float('nan')):.3f} bits/tok | lr {lr:.2e} | gnorm {gnorm:.3f}"
                  f" | {tokens / elapsed:,.0f} tok/s/rank | {tokens / rate / elapsed:.2f} audio-s/s/rank"
                  f" | data {100 * wait / max(elapsed, 1e-9):.0f}% | {elapsed / n:.3f} s/step | {self._memory_gib():.2f} GiB",
                  flush=True)

    def samples_seen(self) -> int:
        """Training examples consumed by all ranks so far (carried across world-size changes)."""
        t = self.lv.train
        return self._samples_base + (self.step - self._step_base) * t.micro_batch * t.grad_accum * self.world

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
        except OSError:
            return float("nan")

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate_if_due(self) -> None:
        t = self.lv.train
        if self.data["has_valid"] and (self.step % t.eval_every == 0 or self.step == t.steps):
            self.evaluate()

    @contextlib.contextmanager
    def _isolated_rng(self):
        """Evaluation and sampling draw nothing from training's generators, whatever they call."""
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            try:
                yield
            finally:
                random.setstate(py)
                np.random.set_state(npy)

    def evaluate(self) -> dict[str, float]:
        """Validation NLL (bits/token and bits/second of audio), quantiser metrics, the
        "uses the codes" gap (NLL with shuffled minus true codes) and code usage."""
        from largewave.data.loader import EvalLoader

        t = self.lv.train
        t0 = time.perf_counter()
        model = self.weights_copy()
        loader = EvalLoader(self.data["root"], "valid", crop=t.crop, hop=self.lv.hop, batch_size=t.micro_batch,
                            rank=self.rank, world_size=self.world, num_workers=0, mu=self.cfg.audio.mu,
                            max_batches=t.eval_batches, fingerprint=self.data["fingerprint"])
        has_codes = self.lv.kind in ("ada", "nsynth")
        discrete = self.lv.kind == "ada"
        K = self.lv.quantiser.codes
        sums: dict[str, float] = {}
        usage = torch.zeros(K, dtype=torch.float64)
        g = torch.Generator(device="cpu")
        g.manual_seed(self.lv.train.seed * 7_919 + self.step)
        with self._isolated_rng(), torch.no_grad():
            for batch in loader:
                mask = batch.mask if batch.mask is not None else torch.ones(len(batch), dtype=torch.bool)
                keep = mask.nonzero().flatten()
                if len(keep) == 0:
                    continue
                tokens = batch.tokens[keep].to(self.device)
                n = float(len(keep))
                out = model.loss(tokens)
                sums["n"] = sums.get("n", 0.0) + n
                for k, v in out.terms.items():
                    sums[f"loss/{k}"] = sums.get(f"loss/{k}", 0.0) + n * float(v)
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + n * float(v)
                if has_codes:
                    shuffled = model.nll(tokens, shuffle_codes=True, generator=g)
                    sums["nll_shuffled"] = sums.get("nll_shuffled", 0.0) + n * float(shuffled)
                if discrete:
                    usage += torch.bincount(model.encode(tokens).flatten().cpu(), minlength=K).double()
        keys = sorted(sums)
        tot = dict(zip(keys, distributed.all_reduce_sum([sums[k] for k in keys], self.device)))
        usage = torch.tensor(distributed.all_reduce_sum(usage.tolist(), self.device)) if discrete else usage
        n = max(tot.pop("n", 0.0), 1.0)
        res = {f"valid/{k}": v / n for k, v in tot.items()}
        rate = self.cfg.input_rate(self.level)
        ln2 = math.log(2.0)
        if "valid/loss/nll" in res:
            res["valid/bits_per_token"] = res["valid/loss/nll"] / ln2
            res["valid/bits_per_second"] = res["valid/bits_per_token"] * rate
        if "valid/nll_shuffled" in res:
            res["valid/bits_per_token_shuffled_codes"] = res.pop("valid/nll_shuffled") / ln2
            res["valid/uses_codes_gap_bits"] = res["valid/bits_per_token_shuffled_codes"] - res["valid/bits_per_token"]
        res["perf/eval_time_s"] = time.perf_counter() - t0
        if discrete and usage.sum() > 0:
            res["valid/codes_used"] = float((usage > 0).sum())
        if self.main and t.eval_clips > 0:
            res.update(self._quality(model))
        self.last_eval = {k.removeprefix("valid/"): float(v) for k, v in res.items() if k.startswith("valid/")}
        self.last_eval_step = self.step
        if self.main:
            data: dict[str, Any] = dict(res)
            if discrete and usage.sum() > 0:
                data["valid/code_usage"] = self.wandb.histogram(usage.numpy())
                p = usage / usage.sum()
                data["valid/code_perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
            self.wandb.log(self.step, data)
            gap = res.get("valid/uses_codes_gap_bits")
            print(f"[{self.cfg.stack}/{self.level}] eval step {self.step}: {res.get('valid/bits_per_token', float('nan')):.3f}"
                  f" bits/tok, {res.get('valid/bits_per_second', float('nan')):,.0f} bits/s"
                  + (f", uses-the-codes gap {gap:.3f} bits/tok" if gap is not None else "")
                  + (f", {int(data['valid/codes_used'])}/{K} codes used" if "valid/codes_used" in data else "")
                  + f" ({res['perf/eval_time_s']:.1f} s)", flush=True)
            line = evaluate.format_figures({k.removeprefix("valid/"): v for k, v in res.items()})
            if line:
                print(f"[{self.cfg.stack}/{self.level}] eval step {self.step}: {line}", flush=True)
        return res

    def _quality(self, model: torch.nn.Module) -> dict[str, Any]:
        """Quality figures on the level's fixed valid clips (rank 0; see largewave.engine.evaluate),
        with the original-vs-output spectrogram of the first clip."""
        t = self.lv.train
        t0 = time.perf_counter()
        if self._probe is None:
            self._probe = evaluate.QualityProbe(self.cfg, self.level, t.eval_clips, t.eval_clip_seconds)
        with self._isolated_rng():
            top_p = t.eval_top_p if t.eval_top_p is not None else self.cfg.quality.nucleus(self.level)
            figs, pairs = self._probe.run(model, self.device, t.eval_temperature, seed=t.seed, top_p=top_p)
        if not figs:
            return {}
        out: dict[str, Any] = {f"valid/{k}": v for k, v in figs.items()}
        name, original, output = pairs[0]
        png = evaluate.write_comparison(self.run_dir / "samples" / ckpt.tag_for(self.step) / f"quality-{name}.png",
                                        original, output, self.cfg.audio.sample_rate)
        if self.wandb.enabled:
            img = self.wandb.image(png, f"{name}: original (top) and {'reconstruction' if 'valid/recon_lsd_db' in out else 'a generation'}")
            if img is not None:
                out["quality/spectrogram"] = img
        out["perf/quality_time_s"] = time.perf_counter() - t0
        return out

    # ---- audio samples ---------------------------------------------------------------------------

    def sample_if_due(self) -> None:
        t = self.lv.train
        if t.sample_clips > 0 and (self.step % t.sample_every == 0 or self.step == t.steps):
            self.sample()

    def sample(self) -> None:
        """Audio items for W&B and ``samples/step-XXXXXXXX/``: reconstructions of valid clips
        (ADA levels; above level 1 decoded to audio through the exports of the levels below when
        they exist) or generations (priors). Rank 0 generates; the weights copy is collective."""
        from largewave.engine import media

        t0 = time.perf_counter()
        model = self.weights_copy()
        if not self.main:
            return
        t = self.lv.train
        with self._isolated_rng(), torch.no_grad():
            items = media.make_samples(self.cfg, self.level, model, self.data["root"] if self.data["has_valid"] else None,
                                       clips=t.sample_clips, seconds=t.sample_seconds, seed=t.seed + self.step,
                                       device=self.device)
        if not items:
            return
        out_dir = self.run_dir / "samples" / ckpt.tag_for(self.step)
        data = media.write_and_wrap(items, out_dir, self.cfg.audio.sample_rate, self.wandb)
        self.wandb.log(self.step, data)
        print(f"[{self.cfg.stack}/{self.level}] samples step {self.step}: {len(items)} item(s) in {out_dir} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_if_due(self) -> None:
        if self.step % self.lv.train.save_every == 0:
            self.save()

    def save(self) -> Path:
        """Every rank writes its shard; marked complete only after all ranks have written."""
        path = self.ckpt_root / ckpt.tag_for(self.step)
        if self.last_saved_step == self.step and (path / ckpt.COMPLETE).exists():
            return path
        t0 = time.perf_counter()
        t = self.lv.train
        common = {"step": self.step, "samples_seen": self.samples_seen(), "world_size": self.world,
                  "global_batch": t.micro_batch * t.grad_accum * self.world,
                  "zero_stage": self.lv.train.zero_stage, "precision": self.rt.precision,
                  "config": self.cfg.to_dict(), "level": self.level,
                  "signature": self.signature, "wandb_run_id": self.wandb_run_id,
                  "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                  "ema": self.ema.state_dict() if self.ema is not None else None}
        small = {k: v for k, v in common.items() if k not in ("ema", "config")}
        self.engine.save_checkpoint(str(self.ckpt_root), tag=path.name, client_state={"largewave": small},
                                    save_latest=False)
        ckpt.atomic_torch_save({"rank": self.rank, "world_size": self.world, "step": self.step,
                                "rng": ckpt.rng_state(), "loader": self.loader.state_dict(),
                                "buffers": {k: v.detach().cpu().clone() for k, v in self.module.named_buffers()}},
                               ckpt.rank_state_path(path, self.rank))
        if self.main:
            ckpt.atomic_torch_save(common, ckpt.common_state_path(path))
        distributed.barrier()  # every rank's files are on disk
        if self.main:
            ckpt.write_complete(path, self.step, self.world, self.lv.train.zero_stage)
            ckpt.prune(self.ckpt_root, self.lv.train.keep_checkpoints)
            size = ckpt.checkpoint_bytes(path)
            print(f"[largewave] saved {path} ({size / 2 ** 20:.1f} MiB) in {time.perf_counter() - t0:.2f} s", flush=True)
            self.wandb.log(self.step, {"perf/checkpoint_save_s": time.perf_counter() - t0,
                                       "perf/checkpoint_mib": size / 2 ** 20})
        distributed.barrier()  # nobody exits (and gets requeued) before the marker exists
        self.last_saved_step = self.step
        return path

    def stop_and_save(self) -> TrainResult:
        name = signal.Signals(self.stop.signum).name if self.stop.signum else None
        if self.main:
            print(f"[largewave] stop requested ({name}) — saving step {self.step} on all ranks", flush=True)
        path = self.save()
        if self.main:
            print(f"[largewave] stopped at step {self.step}; rerun the same command to resume from {path} "
                  f"(exit code {EXIT_STOPPED})", flush=True)
        self._state("stopped", error=f"stop requested ({name})")
        return self.result(stopped=True, stop_signal=name)

    def pause(self) -> TrainResult:
        """``train.pause_at`` reached: a validation for whoever schedules rounds, and a checkpoint."""
        if self.data["has_valid"] and self.last_eval_step != self.step:
            self.evaluate()
        path = self.save()
        if self.main:
            print(f"[largewave] paused at step {self.step} (train.pause_at); checkpoint {path}", flush=True)
        self._state("paused")
        return self.result(paused=True)

    def export(self) -> Optional[Path]:
        """``export.pt`` from the final checkpoint's fp32 weights (rank 0)."""
        out = self.run_dir / "export.pt"
        if self.main:
            t0 = time.perf_counter()
            weights = consolidated_weights(self.ckpt_root / ckpt.tag_for(self.step), self.lv.train.zero_stage)
            ema = None
            if self.ema is not None:
                ema = dict(weights)
                ema.update(self.ema.shadow)
            write_export(out, cfg=self.cfg, level=self.level, step=self.step, signature=self.signature,
                         state_dict=ema if ema is not None else weights,
                         train_state_dict=weights if ema is not None else None)
            print(f"[largewave] export {out} ({out.stat().st_size / 2 ** 20:.1f} MiB) in "
                  f"{time.perf_counter() - t0:.2f} s", flush=True)
        distributed.barrier()
        return out

    def result(self, **kw) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, step=self.step, steps=self.lv.train.steps,
                           checkpoint=self.ckpt_root / ckpt.tag_for(self.step) if self.last_saved_step == self.step else None,
                           wandb=self.wandb.location if self.wandb else None, eval=dict(self.last_eval), **kw)

    def teardown(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self._batches = None  # shuts loader workers down
        self.stop.uninstall()


def consolidated_weights(path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (parameters and buffers) of a DeepSpeed checkpoint folder."""
    if zero_stage == 0:
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return dict(sd)
