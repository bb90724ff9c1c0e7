"""Typed configuration: YAML files under ``configs/`` → dataclasses, validated before any work.

A config file describes one *stack*: the audio format, the data, and the levels trained on it
(``level1``, ``level2``, … on codes of the level below, and optionally a ``prior`` on top).

    cfg = load_config("demo", ["level1.optim.lr=3e-4", "data.demo_minutes=2"])

Every key is checked: an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` with the file and the dotted key, e.g.
``configs/demo.yaml: levels.level1.train.crop: 1001 is not a multiple of the level's hop (8)``.

Overrides use dotted keys; a level name may be used without the ``levels.`` prefix
(``level1.optim.lr=1e-4`` is ``levels.level1.optim.lr=1e-4``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when running from one


def _config_dir() -> Path:
    """The shipped stack configs: ``largewave/configs/`` once installed (package data built from
    the checkout's ``configs/``), the checkout's ``configs/`` when running from one."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else REPO_ROOT / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Invalid(ValueError):
    """Raised by ``__post_init__`` checks; the loader adds the file and the full key path."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


# --------------------------------------------------------------------------------------------
# What signatures and fingerprints hash
#
# Run folders are keyed by a hash of a level's config and code sets by a fingerprint of their
# encoder's config: both are promises ("rerun = resume", "these codes belong to that encoder"), so
# adding or renaming a field must not move them. Three field markers keep that promise:
#
#   bookkeeping()        the field never changes what is computed (logging cadence, how the batch
#                        is split over ranks, …): never hashed.
#   added(default)       a field added after signatures were first given out: hashed only when it
#                        differs from its default (which must reproduce the old computation).
#   metadata hash_name   a renamed field is hashed under its old name; the old key stays accepted
#                        as an alias (a class's ``ALIASES``: old name → new name).
# --------------------------------------------------------------------------------------------


def bookkeeping(default: Any = dataclasses.MISSING, **kw) -> Any:
    """A config field that changes no computation: left out of run signatures and fingerprints."""
    return field(default=default, metadata={"bookkeeping": True}, **kw)


def added(default: Any = dataclasses.MISSING, **kw) -> Any:
    """A config field added after signatures were pinned: hashed only when not at its default."""
    return field(default=default, metadata={"omit_default": True}, **kw)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def hashed(obj: Any) -> Any:
    """The view of a config value that run signatures and code fingerprints hash: plain data, each
    field under its hash name, without bookkeeping fields, and without fields added later while
    they hold their default. For the fields that existed when signatures were pinned this equals
    ``dataclasses.asdict``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("bookkeeping"):
                continue
            if f.metadata.get("omit_default") and value == _default_of(f):
                continue
            out[f.metadata.get("hash_name", f.name)] = hashed(value)
        return out
    if isinstance(obj, dict):
        return {k: hashed(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [hashed(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AudioConfig:
    sample_rate: int = 16000  # Hz; every input is resampled to this rate, mono
    mu: int = 255  # mu-law parameter; level-1 tokens have mu + 1 classes (256 for 8 bit)

    def __post_init__(self):
        _require(self.sample_rate >= 1000, "sample_rate", f"{self.sample_rate} Hz is too low (need >= 1000)")
        _require(1 <= self.mu <= 65535, "mu", f"{self.mu} must be in 1..65535")

    @property
    def classes(self) -> int:
        return self.mu + 1


@dataclass
class DataConfig:
    # Where recordings come from: "demo" renders solo piano from MIDI (see largewave shards render),
    # anything else is a folder (searched recursively) of wav/flac/ogg/mp3/... files.
    source: str = "demo"
    demo_minutes: float = 20.0  # minutes of piano the demo corpus renders
    raw_dir: str = "data/{stack}/raw"  # rendered demo FLACs (demo source only)
    shards: str = "data/{stack}/audio"  # audio shard folder (local path, or a URL WebDataset opens)
    codes: str = "data/{stack}/codes"  # code shards of level k go to {codes}/level{k}
    segment_seconds: float = 60.0  # pieces are cut into contiguous segments of at least this long
    shard_mb: float = 256.0  # target size of one shard
    valid_fraction: float = 0.1  # fraction of pieces held out for validation (split by piece)
    test_fraction: float = 0.0  # fraction of pieces held out for test
    split_file: Optional[str] = None  # optional CSV/JSON giving each piece's split (e.g. MAESTRO's)
    seed: int = 0  # split and data order seed
    workers: int = 2  # decoding processes / loader workers

    def __post_init__(self):
        _require(self.demo_minutes > 0, "demo_minutes", f"{self.demo_minutes} must be > 0")
        _require(self.segment_seconds > 0, "segment_seconds", f"{self.segment_seconds} must be > 0")
        _require(self.shard_mb > 0, "shard_mb", f"{self.shard_mb} must be > 0")
        _require(0 <= self.valid_fraction < 1, "valid_fraction", f"{self.valid_fraction} must be in [0, 1)")
        _require(0 <= self.test_fraction < 1, "test_fraction", f"{self.test_fraction} must be in [0, 1)")
        _require(self.valid_fraction + self.test_fraction < 1, "test_fraction",
                 "valid_fraction + test_fraction must leave some pieces for training")
        _require(self.workers >= 0, "workers", f"{self.workers} must be >= 0")


@dataclass
class WaveNetConfig:
    """The WaveNet decoder of a level (or the prior). Dilations 1, 2, … 2^(layers_per_stack-1),
    repeated ``stacks`` times, each capped at ``max_dilation`` (a *local* decoder), unless an
    explicit ``dilations`` list is given."""

    residual_channels: int = 64
    gate_channels: int = 128  # each dilated conv maps residual → gate channels (tanh | sigmoid halves)
    skip_channels: int = 256
    kernel_size: int = 2
    stacks: int = 3
    layers_per_stack: int = 10
    max_dilation: Optional[int] = None
    dilations: Optional[list[int]] = None  # explicit schedule; overrides stacks/layers_per_stack
    input_kernel_size: int = 1  # the causal input convolution (1 = a plain embedding)
    cond_channels: int = 64  # conditioning embedding size (0 = unconditioned)
    upsample: Literal["repeat", "transposed"] = "repeat"  # code rate → token rate

    def __post_init__(self):
        for name in ("residual_channels", "skip_channels", "kernel_size", "input_kernel_size"):
            _require(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        _require(self.gate_channels >= 2 and self.gate_channels % 2 == 0, "gate_channels",
                 f"{self.gate_channels} must be even (tanh and sigmoid halves)")
        _require(self.kernel_size >= 2, "kernel_size", f"{self.kernel_size} must be >= 2")
        _require(self.cond_channels >= 0, "cond_channels", f"{self.cond_channels} must be >= 0")
        if self.dilations is not None:
            _require(len(self.dilations) > 0, "dilations", "dilation schedule is empty")
            _require(all(d >= 1 for d in self.dilations), "dilations", f"{self.dilations}: every dilation must be >= 1")
        else:
            _require(self.stacks >= 1, "stacks", f"{self.stacks}: dilation schedule is empty (need >= 1 stack)")
            _require(self.layers_per_stack >= 1, "layers_per_stack",
                     f"{self.layers_per_stack}: dilation schedule is empty (need >= 1 layer)")
        if self.max_dilation is not None:
            _require(self.max_dilation >= 1, "max_dilation", f"{self.max_dilation} must be >= 1")

    def dilation_schedule(self) -> list[int]:
        if self.dilations is not None:
            return list(self.dilations)
        cap = self.max_dilation or 2 ** 62
        return [min(2 ** i, cap) for _ in range(self.stacks) for i in range(self.layers_per_stack)]

    def receptive_field(self) -> int:
        """Tokens that one output sees (the current one included): (k−1)·Σ dilations + input conv."""
        return (self.kernel_size - 1) * sum(self.dilation_schedule()) + self.input_kernel_size

    @property
    def layers(self) -> int:
        return len(self.dilation_schedule())


@dataclass
class EncoderConfig:
    """Non-causal dilated residual conv stack (NSynth-style), downsampled by the level's hop."""

    channels: int = 64
    layers_per_stack: int = 10
    stacks: int = 1
    kernel_size: int = 3
    downsample: Literal["strided", "pool"] = "strided"
    input_embedding: int = 32  # embedding size of level-below codes (levels > 1)

    def __post_init__(self):
        for name in ("channels", "layers_per_stack", "stacks", "input_embedding"):
            _require(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size",
                 f"{self.kernel_size} must be odd (non-causal, centred)")


@dataclass
class QuantiserConfig:
    kind: Literal["amae", "vqvae", "continuous"] = "amae"
    codes: int = 2048  # K
    dim: int = 64  # embedding dimension given to the decoder (and VQ codebook dim)
    # argmax autoencoder
    normalise: Literal["sum", "softmax"] = "sum"  # paper: ReLU then divide by the sum
    diversity_weight: float = 0.1
    # VQ-VAE
    ema: bool = True  # EMA codebook updates (else codebook + commitment losses)
    decay: float = 0.99
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0  # only without EMA
    restart_threshold: float = 1.0  # a code used < this many times (EMA count) is restarted
    usage_window: int = 100  # steps over which "codes used" is counted

    def __post_init__(self):
        _require(self.codes >= 2, "codes", f"K = {self.codes} must be >= 2")
        _require(self.dim >= 1, "dim", f"{self.dim} must be >= 1")
        _require(0 < self.decay < 1, "decay", f"{self.decay} must be in (0, 1)")
        _require(self.diversity_weight >= 0, "diversity_weight", f"{self.diversity_weight} must be >= 0")
        _require(self.commitment_weight >= 0, "commitment_weight", f"{self.commitment_weight} must be >= 0")
        _require(self.usage_window >= 1, "usage_window", f"{self.usage_window} must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    decay: Literal["cosine", "linear", "none"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr · min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    ema: float = 0.0  # EMA of the weights for evaluation and sampling (0 = off, e.g. 0.999)

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"{self.lr} must be > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"{self.betas} must be two numbers in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0")
        _require(self.warmup_steps >= 0, "warmup_steps", f"{self.warmup_steps} must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1]")
        _require(self.grad_clip >= 0, "grad_clip", f"{self.grad_clip} must be >= 0")
        _require(0 <= self.ema < 1, "ema", f"{self.ema} must be in [0, 1)")


@dataclass
class TrainConfig:
    steps: int = 100_000  # optimizer steps (0: export the initialised model, an untrained baseline)
    crop: int = 16384  # tokens of this level's input per training example (multiple of hop)
    crops_per_segment: int = 4  # crops taken from one decoded segment (shares decode cost)
    # How the batch is split over resources is not hashed: a run moved to fewer or more ranks can
    # keep its effective batch and still resume.
    micro_batch: int = bookkeeping(8)  # examples per rank per forward
    grad_accum: int = bookkeeping(1)
    zero_stage: int = 2
    # auto: bf16 on a GPU; on a CPU bf16 only with bf16 matrix units where a cached probe measured it
    # faster (distributed.resolve_precision), else fp32; a resumed run keeps its checkpoints' precision
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = bookkeeping(False)  # same math, less memory
    log_every: int = bookkeeping(50)
    eval_every: int = bookkeeping(2000)
    eval_batches: int = bookkeeping(50)
    sample_every: int = bookkeeping(10000)  # audio items (reconstructions, generations) to W&B
    save_every: int = bookkeeping(1000)
    keep_checkpoints: int = bookkeeping(3)
    max_nonfinite: int = bookkeeping(20)  # consecutive non-finite losses before the run stops
    seed: int = 0
    # > 0: save, evaluate and return at this step (population rounds); rerun continues
    pause_at: int = bookkeeping(0)
    init_from: Optional[str] = None  # warm start (weights, buffers, optimizer) from this checkpoint folder
    # valid clips reconstructed (level 1) / sequences generated per sample event
    sample_clips: int = bookkeeping(2)
    sample_seconds: float = bookkeeping(1.0)  # length of each logged audio item (generation is sample by sample)
    # At each evaluation: quality figures (largewave.quality) on this many fixed valid clips of
    # eval_clip_seconds, reconstructed (ADA levels) or generated (priors) at eval_temperature
    eval_clips: int = bookkeeping(4)
    eval_clip_seconds: float = bookkeeping(1.0)
    eval_temperature: float = bookkeeping(1.0)
    eval_top_p: Optional[float] = bookkeeping(None)  # nucleus cut-off (None: the stack's quality.top_p)

    def __post_init__(self):
        _require(self.steps >= 0, "steps", f"{self.steps} must be >= 0 (0: export the initialised model, "
                 "an untrained baseline)")
        for name in ("crop", "crops_per_segment", "micro_batch", "grad_accum", "log_every",
                     "eval_every", "eval_batches", "sample_every", "save_every", "keep_checkpoints",
                     "max_nonfinite"):
            _require(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"{self.zero_stage} must be 0, 1, 2 or 3")
        _require(self.sample_clips >= 0, "sample_clips", f"{self.sample_clips} must be >= 0")
        _require(self.pause_at >= 0, "pause_at", f"{self.pause_at} must be >= 0 (0: never)")
        _require(self.sample_seconds > 0, "sample_seconds", f"{self.sample_seconds} must be > 0")
        _require(self.eval_clips >= 0, "eval_clips", f"{self.eval_clips} must be >= 0 (0: no quality figures)")
        _require(self.eval_clip_seconds > 0, "eval_clip_seconds", f"{self.eval_clip_seconds} must be > 0")
        _require(self.eval_temperature >= 0 and math.isfinite(self.eval_temperature), "eval_temperature",
                 f"{self.eval_temperature} must be >= 0 (0: greedy)")
        if self.eval_top_p is not None:
            _require(0 < self.eval_top_p <= 1, "eval_top_p", f"{self.eval_top_p} must be in (0, 1]")


@dataclass
class LevelConfig:
    """One level of the stack.

    kind: ``ada`` (encoder → quantiser → WaveNet decoder), ``prior`` (an unconditioned WaveNet
    over the codes of the level below), ``wavenet`` (an unconditioned WaveNet over audio tokens,
    a baseline) or ``nsynth`` (an ADA with a continuous embedding, the NSynth baseline).
    """

    kind: Literal["ada", "prior", "wavenet", "nsynth"] = "ada"
    hop: int = 8  # downsampling of the encoder: codes per input token = 1/hop
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantiser: QuantiserConfig = field(default_factory=QuantiserConfig)
    decoder: WaveNetConfig = field(default_factory=WaveNetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _require(self.hop >= 1, "hop", f"{self.hop} must be >= 1")
        if self.kind in ("prior", "wavenet"):
            _require(self.hop == 1, "hop", f"a {self.kind} has no encoder: hop must be 1, not {self.hop}")
        _require(self.train.crop % self.hop == 0, "train.crop",
                 f"{self.train.crop} is not a multiple of the level's hop ({self.hop})")
        if self.kind == "nsynth":
            self.quantiser.kind = "continuous"

    @property
    def has_codes(self) -> bool:
        """Does this level produce discrete codes that a level above can train on?"""
        return self.kind == "ada"


@dataclass
class LevelGate:
    """Floors one level must reach in the quality summary (``largewave demo``; exit 1 when one is
    missed). Unset floors are not checked. Figures as defined in :mod:`largewave.quality`."""

    gap_bits: Optional[float] = None  # the uses-the-codes gap (bits/token) must exceed this
    lsd_db: Optional[float] = None  # reconstruction LSD at most
    flatness_excess_db: Optional[float] = None  # reconstruction flatness excess at most
    pitch_class: Optional[float] = None  # reconstruction pitch-class agreement at least
    beat_noise: bool = False  # every reconstruction figure better than the equal-RMS noise baseline
    beat_chance: bool = False  # reconstruction LSD and pitch-class agreement better than chance
    lsd_beats_noise: bool = False  # reconstruction LSD better than the noise baseline (a smoke-scale floor)
    centroid_ratio: Optional[float] = None  # generated samples: spectral centroid within ×this of the corpus
    flatness_db: Optional[float] = None  # generated samples: median flatness within this many dB of the corpus

    def __post_init__(self):
        if self.centroid_ratio is not None:
            _require(self.centroid_ratio >= 1, "centroid_ratio", f"{self.centroid_ratio} must be >= 1")
        if self.pitch_class is not None:
            _require(0 <= self.pitch_class <= 1, "pitch_class", f"{self.pitch_class} must be in [0, 1]")


@dataclass
class QualityConfig:
    """How the quality summary measures a trained stack (never part of a run signature)."""

    clips: int = 4  # fixed valid clips each ADA level reconstructs
    clip_seconds: float = 2.0
    # sampling temperature of each level's decoder for reconstructions and generations (default 1.0)
    temperatures: dict[str, float] = field(default_factory=dict)
    # nucleus cut-off of each level's decoder: sample among the most likely tokens holding this
    # much probability (default 1.0: the whole distribution); see WaveNet.generate
    top_p: dict[str, float] = field(default_factory=dict)
    gate: dict[str, LevelGate] = field(default_factory=dict)  # level name → its floors

    def __post_init__(self):
        _require(self.clips >= 1, "clips", f"{self.clips} must be >= 1")
        _require(self.clip_seconds > 0, "clip_seconds", f"{self.clip_seconds} must be > 0")
        for k, v in self.temperatures.items():
            _require(v >= 0, f"temperatures.{k}", f"{v} must be >= 0 (0: greedy)")
        for k, v in self.top_p.items():
            _require(0 < v <= 1, f"top_p.{k}", f"{v} must be in (0, 1] (1: the whole distribution)")

    def temperature(self, level: str) -> float:
        return float(self.temperatures.get(level, 1.0))

    def nucleus(self, level: str) -> float:
        """The level's nucleus cut-off (``top_p``; 1.0 where the config names none)."""
        return float(self.top_p.get(level, 1.0))


@dataclass
class RunConfig:
    root: str = "runs"  # run folders: {root}/{stack}/{level}/...
    wandb_project: str = "largewave"
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online if logged in
    wandb_entity: Optional[str] = None  # W&B team or user (None: the logged-in default)
    collective_timeout_s: float = 1800.0  # a collective waiting longer than this raises (hung peer)

    def __post_init__(self):
        _require(self.collective_timeout_s > 0, "collective_timeout_s",
                 f"{self.collective_timeout_s} must be > 0")


@dataclass
class StackConfig:
    stack: str = "demo"
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    levels: dict[str, LevelConfig] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self):
        _require(bool(self.stack) and "/" not in self.stack, "stack", f"{self.stack!r} is not a valid stack name")
        names = list(self.levels)
        for i, name in enumerate(names):
            if name == "prior":
                _require(i == len(names) - 1, "levels.prior", "the prior must be the last (top) level")
                _require(self.levels[name].kind == "prior", "levels.prior.kind", "the level named prior must have kind: prior")
                _require(i >= 1, "levels.prior", "a prior needs a level with codes below it")
            else:
                _require(name == f"level{i + 1}", f"levels.{name}",
                         f"levels are named level1, level2, … in order (and prior last); expected level{i + 1}")
            if i >= 1:
                below = self.levels[names[i - 1]]
                _require(below.has_codes, f"levels.{name}",
                         f"{names[i - 1]} (kind {below.kind}) makes no discrete codes to stack on")
            lv = self.levels[name]
            _require(lv.kind != "prior" or i >= 1, f"levels.{name}.kind", "a prior must sit on a level with codes")
        for section in ("gate", "temperatures", "top_p"):
            for key in getattr(self.quality, section):
                _require(key in self.levels, f"quality.{section}.{key}",
                         f"no level {key!r} in this stack ({', '.join(names)})")

    # ---- derived quantities --------------------------------------------------------------

    def level_names(self) -> list[str]:
        return list(self.levels)

    def level(self, name: str | int) -> LevelConfig:
        key = _level_key(name)
        if key not in self.levels:
            raise ConfigError(f"{self.stack}: no level {name!r}; this stack has {', '.join(self.levels)}")
        return self.levels[key]

    def below(self, name: str | int) -> Optional[str]:
        names = self.level_names()
        i = names.index(_level_key(name))
        return names[i - 1] if i > 0 else None

    def input_rate(self, name: str | int) -> float:
        """Tokens per second of audio at this level's input."""
        rate = float(self.audio.sample_rate)
        for n in self.level_names():
            if n == _level_key(name):
                return rate
            rate /= self.levels[n].hop
        raise ConfigError(f"no level {name!r}")

    def samples_per_token(self, name: str | int) -> int:
        return int(round(self.audio.sample_rate / self.input_rate(name)))

    def vocab(self, name: str | int) -> int:
        """Vocabulary of the tokens this level models: mu-law classes or the codes of the level below."""
        below = self.below(name)
        return self.audio.classes if below is None else self.levels[below].quantiser.codes

    def path(self, template: str) -> str:
        return template.format(stack=self.stack)

    def derived(self, name: str | int, world_size: int = 1) -> dict[str, Any]:
        lv = self.level(name)
        rate = self.input_rate(name)
        rf = lv.decoder.receptive_field()
        out = {
            "level": _level_key(name),
            "vocab": self.vocab(name),
            "input_rate_hz": rate,
            "hop": lv.hop,
            "code_rate_hz": rate / lv.hop if lv.has_codes else None,
            "hop_in_samples": self.samples_per_token(name) * lv.hop,
            "receptive_field_tokens": rf,
            "receptive_field_ms": 1000.0 * rf / rate,
            "crop_tokens": lv.train.crop,
            "crop_seconds": lv.train.crop / rate,
            "effective_batch": lv.train.micro_batch * lv.train.grad_accum * world_size,
            "audio_seconds_per_step": lv.train.crop / rate * lv.train.micro_batch * lv.train.grad_accum * world_size,
        }
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _level_key(name: str | int) -> str:
    s = str(name)
    return f"level{s}" if s.isdigit() else s


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        return p
    candidate = CONFIG_DIR / f"{p}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no config named {str(name_or_path)!r} (in {CONFIG_DIR}: {known})")


def load_config(name_or_path: str | os.PathLike, overrides: Optional[list[str]] = None) -> StackConfig:
    """Load a stack config by name (``configs/<name>.yaml``) or path, apply ``key=value`` overrides,
    and validate everything. Raises :class:`ConfigError` naming the file and key on any problem."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("stack", path.stem)
    for ov in overrides or []:
        apply_override(raw, ov, source=str(path))
    return from_dict(raw, source=str(path))


def from_dict(raw: dict, source: str = "<dict>") -> StackConfig:
    return _build(StackConfig, raw, "", source)


def apply_override(raw: dict, override: str, source: str = "<overrides>") -> None:
    """Apply one ``a.b.c=value`` override to a raw (YAML-level) dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {override!r}: empty key")
    top = {f.name for f in dataclasses.fields(StackConfig)}
    if parts[0] not in top and (parts[0].startswith("level") or parts[0] == "prior"):
        parts = ["levels"] + parts
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        if p not in node or node[p] is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{source}: override {key}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str):
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        last: Optional[ConfigError] = None
        for a in inner:
            try:
                return _coerce(a, value, key, source)
            except ConfigError as e:
                last = e
        raise last  # type: ignore[misc]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            bad(f"a section (mapping) of {tp.__name__}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            bad("a list")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            bad("a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                bad("a finite number")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                v = float(value)
                if math.isfinite(v):
                    return v
            except ValueError:
                pass
        bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        bad("a string")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    if any(old in raw for old in aliases):
        raw = dict(raw)
        for old, new in aliases.items():
            if old in raw:
                where = f"{prefix}." if prefix else ""
                if new in raw:
                    raise ConfigError(f"{source}: {where}{old}: an old name of {where}{new}; give only one of them")
                raw[new] = raw.pop(old)
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: {where}{unknown[0]}: unknown key (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key, source)
    try:
        return cls(**kwargs)
    except _Invalid as e:
        key = f"{prefix}.{e.key}" if prefix else e.key
        raise ConfigError(f"{source}: {key}: {e.message}") from None


def dump_yaml(cfg: StackConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
