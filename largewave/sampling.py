"""Audio from a trained stack: cascade sampling, reconstructions through each level, continuations.

Sampling is a cascade of the models' incremental generation: the prior samples the top codes,
each level's decoder samples the token stream of the level below conditioned on them, and the
level-1 decoder's mu-law tokens become a 16 kHz waveform::

    prior ──codes L2──► level2.decode ──codes L1──► level1.decode ──mu-law──► waveform

For notebooks::

    from largewave.sampling import Stack
    s = Stack.load("demo")                      # a config name, a StackConfig, or run folders
    g = s.sample(seconds=4, count=2, temperatures={"prior": 0.9}, seed=0)
    g.waves                                     # float32[2 x 64000] in [-1, 1]
    r = s.reconstruct(wave)                     # r.waves["level1"], r.waves["level2"]: what each level keeps
    codes = s.encode(wave)                      # {"audio": mu-law [N], "level1": [N/8], "level2": [N/64]}

From a shell (see ``largewave sample --help``)::

    largewave sample --stack demo --seconds 4 --count 2
    largewave sample --stack demo --reconstruct recording.wav
    largewave sample --stack demo --prompt opening.wav --seconds 8

:func:`sample_stack`, :func:`reconstruct_stack` and :func:`continue_stack` write WAV files to
``runs/<stack>/samples/<time>-seed<seed>/`` (and to W&B when a run is active), print a summary
and return it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from largewave import distributed
from largewave.audio import mulaw_decode, mulaw_encode
from largewave.config import ConfigError, StackConfig, _level_key, load_config

Temperatures = Union[None, float, Mapping[str, float]]


class StackError(RuntimeError):
    """A stack that cannot do what was asked (a level not trained yet, no prior, bad input)."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """Sampled audio.

    Attributes:
        waves: float32[count x N] waveforms in [-1, 1] at ``sample_rate``.
        sample_rate: Hz.
        timings: wall seconds spent in each level, top first (``{"prior": …, "level2": …, "level1": …}``).
        tokens: each level's sampled output stream, LongTensor[count x T_level] on the CPU
            (the prior's: the top codes; a decoder's: the tokens of the level below it).
        prompt_samples: samples at the start of every wave that are the (mu-law quantised) prompt.
    """

    waves: np.ndarray
    sample_rate: int
    timings: dict[str, float]
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_samples: int = 0


@dataclass
class Reconstruction:
    """A recording encoded through the levels and decoded back from each.

    Attributes:
        original: float32[N], the input as the stack sees it (mu-law quantised).
        waves: ``{level: float32[N]}``: decoded from that level's codes down to audio.
        codes: ``{level: int64[N / hop_1 / … / hop_level]}``: each level's codes.
        timings: wall seconds in each decoder, top first (every reconstruction that passes
            through a decoder is decoded there in one batch).
    """

    original: np.ndarray
    waves: dict[str, np.ndarray]
    codes: dict[str, np.ndarray]
    timings: dict[str, float]
    sample_rate: int = 16000


@dataclass
class SampleSummary:
    """What :func:`sample_stack` (and the reconstruct / continue variants) made (picklable)."""

    mode: str  # "sample" | "reconstruct" | "continue"
    stack: str
    out_dir: str
    paths: list[str]
    seconds: float  # length of every written WAV
    count: int
    seed: int
    temperatures: dict[str, float]
    wall_s: float  # generation only (loading excluded)
    level_s: dict[str, float]  # wall seconds per level, top first
    rtf: dict[str, float]  # level_s / seconds of audio made (count × seconds); < 1 is faster than real time
    prior_receptive_field_s: Optional[float] = None
    wandb: bool = False
    top_p: dict[str, float] = field(default_factory=dict)  # nucleus cut-off per level (1 = none)

    def __str__(self) -> str:
        audio = self.count * self.seconds
        lines = [f"{self.mode} · stack {self.stack} · {self.count} × {self.seconds:g} s of audio · seed {self.seed} "
                 f"· {self.wall_s:.1f} s ({self.wall_s / max(audio, 1e-9):.2f} s per second of audio)"]
        if self.prior_receptive_field_s is not None:
            lines.append(f"  prior receptive field: {self.prior_receptive_field_s:.3f} s of audio")
        for name, sec in self.level_s.items():
            t, p = self.temperatures.get(name), self.top_p.get(name, 1.0)
            lines.append(f"  {name:>16}: {sec:8.2f} s   real-time factor {self.rtf[name]:8.3f}"
                         + (f"   temperature {t:g}" if t is not None else "")
                         + (f"   top-p {p:g}" if p < 1 else ""))
        lines += [f"  {p}" for p in self.paths]
        if self.wandb:
            lines.append("  (also logged to the active W&B run)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: Optional[int], device: torch.device):
    """Run with ``n`` torch threads on CPU (None: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None and device.type == "cpu" and n != before:
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        yield


def _device(device: Optional[str | torch.device]) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _find_export(path: Path) -> Path:
    """An export file, or the export.pt of a run folder."""
    if path.is_file():
        return path
    if (path / "export.pt").is_file():
        return path / "export.pt"
    raise StackError(f"{path}: neither an export file nor a run folder with an export.pt")


def _newest_exports(stack_root: Path) -> list[Path]:
    """``runs/<stack>``: the newest ``<level>/<signature>/export.pt`` of every level."""
    found = []
    for level_dir in sorted(p for p in stack_root.iterdir() if p.is_dir()):
        exports = sorted(level_dir.glob("*/export.pt"), key=lambda p: p.stat().st_mtime)
        if exports:
            found.append(exports[-1])
    if not found:
        raise StackError(f"{stack_root}: no <level>/<signature>/export.pt below it")
    return found


class Stack:
    """The trained levels of a stack, loaded from their exports, for sampling and reconstruction.

    Use :meth:`load`. ``models`` maps level names to modules in eval mode; a level whose export
    does not exist yet is absent, and only what needs it fails (with the command that trains it).

    ``threads``: torch threads for sample-by-sample generation on CPU (default 1: one step's
    operations are far too small to split, and a second thread only adds synchronisation — on a
    busy machine it can make generation many times slower). None leaves torch's setting.
    """

    def __init__(self, cfg: StackConfig, models: dict[str, torch.nn.Module], device: torch.device,
                 exports: Optional[dict[str, str]] = None, threads: Optional[int] = 1):
        self.threads = threads
        self.progress = True  # progress bars on terminals during generation (False: none)
        self.cfg = cfg
        self.models = models
        self.device = device
        if device.type == "cpu":
            distributed.flush_denormals()  # trained decoders make subnormals: many times slower steps
        self.exports = exports or {}
        names = cfg.level_names()
        self.ada_levels = [n for n in names if cfg.level(n).kind in ("ada", "nsynth")]  # bottom → top
        top = names[-1]
        self.top: Optional[str] = top if cfg.level(top).kind in ("prior", "wavenet") else None
        self.sample_rate = cfg.audio.sample_rate
        self.mu = cfg.audio.mu

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: Union[StackConfig, str, os.PathLike, Sequence[Union[str, os.PathLike]]], *,
             device: Optional[str | torch.device] = None, overrides: Optional[list[str]] = None,
             threads: Optional[int] = 1, verbose: bool = False, precision: str = "fp32") -> "Stack":
        """Load a stack's exports (fp32, no DeepSpeed).

        Args:
            source: a :class:`StackConfig` (exports at :func:`largewave.stack.export_path`); a
                config name or YAML path (loaded with ``overrides``); a stack's run root
                ``runs/<stack>`` (the newest export of each level); or a list of run folders /
                export files, one per level (the config is taken from the top-most export).
            device: where to run (default: CUDA when present).
            threads: torch threads for generation on CPU (see the class docstring).
            precision: the weights of every generation step: "fp32" (exact) or "bf16" (rounded to
                bfloat16 with fp32 accumulation: faster on CPU, per-step KL ~1e-6 nats against
                fp32 on the reference decoder; see bench/sampling.py).
        """
        if precision not in ("fp32", "bf16"):
            raise StackError(f"precision={precision!r}: choose fp32 or bf16")
        from largewave import stack as stk
        from largewave.engine.export import load_export, read_export

        dev = _device(device)
        if isinstance(source, StackConfig):
            cfg, paths = source, None
        elif isinstance(source, (str, os.PathLike)) and not Path(source).exists():
            cfg, paths = load_config(source, overrides), None
        elif isinstance(source, (str, os.PathLike)) and Path(source).suffix in (".yaml", ".yml"):
            cfg, paths = load_config(source, overrides), None
        else:
            paths = []
            for p in [source] if isinstance(source, (str, os.PathLike)) else source:
                p = Path(p)
                paths += [_find_export(p)] if (p / "export.pt").exists() or p.is_file() else _newest_exports(p)
            cfg = None
        models: dict[str, torch.nn.Module] = {}
        exports: dict[str, str] = {}
        if paths is None:
            for name in cfg.level_names():
                path = stk.export_path(cfg, name)
                if path.exists():
                    models[name], _ = load_export(path, device=dev)
                    exports[name] = str(path)
        else:
            payloads = {}
            for path in paths:
                payload = read_export(path)
                if payload["level"] in payloads:
                    raise StackError(f"two exports of {payload['level']}: {exports[payload['level']]} and {path}")
                payloads[payload["level"]] = payload
                exports[payload["level"]] = str(path)
            from largewave.config import from_dict

            top_cfgs = [from_dict(p["config"], source=exports[n]) for n, p in payloads.items()]
            cfg = max(top_cfgs, key=lambda c: len(c.levels))
            for name in payloads:
                if name not in cfg.levels:
                    raise StackError(f"{exports[name]}: level {name} is not part of stack {cfg.stack}")
                models[name], _ = load_export(exports[name], device=dev)
        s = cls(cfg, models, dev, exports, threads=threads)
        for model in models.values():
            for m in model.modules():
                if hasattr(m, "generation_precision"):  # every WaveNet: decoders and the prior
                    m.generation_precision = precision
        s._check_vocabularies()
        if verbose:
            for name, path in exports.items():
                print(f"# {name}: {path}")
        return s

    def _check_vocabularies(self) -> None:
        names = self.cfg.level_names()
        for lower, upper in zip(names, names[1:]):
            if lower in self.models and upper in self.models:
                k = getattr(self.models[lower], "quantiser", None)
                k = getattr(k, "codes", None)
                if k is not None and self.models[upper].vocab != k:
                    raise StackError(f"{upper} ({self.exports.get(upper)}) models {self.models[upper].vocab} tokens, "
                                     f"but {lower} ({self.exports.get(lower)}) makes {k} codes: not one stack")

    def _need(self, names: Sequence[str]) -> None:
        from largewave import stack as stk

        missing = [n for n in names if n not in self.models]
        if missing:
            n = missing[0]
            where = stk.export_path(self.cfg, n)
            raise StackError(f"{n} of stack {self.cfg.stack} has no export ({where}): train it first "
                             f"({stk.train_command(self.cfg, n)})")

    # -- geometry -----------------------------------------------------------------------------

    @property
    def hop(self) -> int:
        """Audio samples per top-level token: the product of the ADA levels' hops."""
        return math.prod(self.cfg.level(n).hop for n in self.ada_levels)

    def receptive_field_seconds(self, level: Optional[str] = None) -> float:
        """Seconds of audio one output of ``level``'s WaveNet sees (default: the top level):
        receptive field tokens / the level's token rate."""
        name = _level_key(level) if level is not None else (self.top or self.cfg.level_names()[-1])
        rf = self.cfg.level(name).decoder.receptive_field()
        return rf / self.cfg.input_rate(name)

    # -- encoding -----------------------------------------------------------------------------

    def _tokens(self, wave: np.ndarray | torch.Tensor, pad_to: int = 1) -> tuple[np.ndarray, int]:
        """float[N] waveform → (mu-law int64[N'], N) with N' ≥ N the next multiple of ``pad_to``
        (padded with silence)."""
        w = np.asarray(wave.detach().cpu() if isinstance(wave, torch.Tensor) else wave, dtype=np.float32)
        if w.ndim != 1:
            raise StackError(f"expected a mono waveform float[N], got shape {w.shape}")
        if not np.all(np.isfinite(w)):
            raise StackError("the waveform has NaN or infinite samples")
        n = len(w)
        padded = np.zeros(-(-n // pad_to) * pad_to, dtype=np.float32)
        padded[:n] = w
        return mulaw_encode(padded, self.mu), n

    def _encode_tokens(self, tokens: np.ndarray, levels: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """Encode mu-law tokens through ``levels`` (a bottom prefix of the ADA levels; default all)."""
        from largewave.codes import encode_sequence, set_fp32_exact

        levels = list(self.ada_levels if levels is None else levels)
        self._need(levels)
        set_fp32_exact()
        out = {"audio": tokens}
        for name in levels:
            model = self.models[name]
            if not getattr(model, "discrete", True):
                raise StackError(f"{name} has a continuous embedding: there are no codes to stack or store")
            tokens = encode_sequence(model, tokens, device=self.device)
            out[name] = tokens
        return out

    def encode(self, wave: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Encode a waveform through every ADA level.

        Args:
            wave: float[N] mono waveform in [-1, 1] at the stack's sample rate.
        Returns:
            ``{"audio": mu-law int64[N], "level1": int64[N / hop1], "level2": …}``; each level
            drops the input tokens that make no full frame.
        """
        tokens, _ = self._tokens(wave)
        return self._encode_tokens(tokens)

    # -- decoding -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _bar(self, level: str, positions: int, streams: int):
        """A progress bar (tqdm, on terminals) for one level's generation of ``positions`` tokens per
        stream, counted in audio samples (a token of a level's input stands for
        ``samples_per_token`` samples), so that its rate reads against real time (the sample rate
        per second) and its ETA is the level's; yields the ``update`` to give the model."""
        if not self.progress:
            yield None
            return
        from tqdm import tqdm

        per = self.cfg.samples_per_token(level)
        import shutil

        # size from shutil: a terminal that reports 0 x 0 (some ptys) gets 80 x 24, not a hidden bar
        cols, rows = shutil.get_terminal_size()
        with tqdm(total=positions * per, unit="sample", unit_scale=True, mininterval=0.5, leave=True, disable=None,
                  ncols=cols, nrows=rows,
                  desc=level + (f" ×{streams}" if streams > 1 else ""),
                  postfix=f"real time {self.sample_rate / 1000:g}k/s", file=sys.stderr) as bar:
            yield lambda n: bar.update(n * per)

    def _cascade(self, level: str, tokens: torch.Tensor, temps: dict[str, float], nuclei: dict[str, float],
                 generator: torch.Generator, timings: dict[str, float],
                 prompts: Optional[dict[str, torch.Tensor]] = None,
                 keep: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Decode the codes of ADA level ``level`` (LongTensor[B x T]) down to mu-law tokens
        LongTensor[B x T·hop_level·…·hop_1], through every decoder below."""
        i = self.ada_levels.index(level)
        for name in reversed(self.ada_levels[: i + 1]):
            below = self.cfg.below(name)
            prompt = None if prompts is None else prompts.get(below or "audio")
            t0 = time.perf_counter()
            with _threads(self.threads, self.device), self._bar(name, tokens.shape[1] * self.cfg.level(name).hop,
                                                                tokens.shape[0]) as bar:
                tokens = self.models[name].decode(tokens.to(self.device), temperature=temps[name], prompt=prompt,
                                                  generator=generator, top_p=nuclei[name], progress=bar)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            if keep is not None:
                keep[name] = tokens.cpu()
        return tokens

    def _per_level(self, given: Temperatures, default: Callable[[str], float], what: str,
                   valid: Callable[[float], bool], rule: str) -> dict[str, float]:
        """Per-level values from one number (every level), a partial mapping (the rest from
        ``default(level)``) or None (all from ``default``); ``rule`` words the error when a value
        is not ``valid``."""
        names = self.cfg.level_names()
        if isinstance(given, (int, float)):
            out = {n: float(given) for n in names}
        else:
            out = {n: default(n) for n in names}
            for k, v in (given or {}).items():
                key = _level_key(k)
                if key not in out:
                    raise StackError(f"{what} for {k!r}: stack {self.cfg.stack} has {', '.join(names)}")
                out[key] = float(v)
        bad = {k: v for k, v in out.items() if not valid(v)}
        if bad:
            raise StackError(f"{rule}: {bad}")
        return out

    def temperatures(self, temperatures: Temperatures = None) -> dict[str, float]:
        """Per-level temperatures from one number (every level), a partial mapping (the rest from
        the config) or None (all from the config's ``quality.temperatures``, 1.0 where it names
        none). 0 means greedy."""
        return self._per_level(temperatures, self.cfg.quality.temperature, "temperature",
                               lambda v: v >= 0 and math.isfinite(v), "temperatures must be finite and >= 0")

    def nuclei(self, top_p: Temperatures = None) -> dict[str, float]:
        """Per-level nucleus cut-offs (``top_p``), given like :meth:`temperatures`: one number, a
        partial mapping (the rest from the config's ``quality.top_p``) or None; 1 = no cut-off."""
        return self._per_level(top_p, self.cfg.quality.nucleus, "top_p", lambda v: 0 < v <= 1, "top_p must be in (0, 1]")

    def _generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        return g

    @torch.no_grad()
    def sample(self, seconds: float, count: int = 1, temperatures: Temperatures = None, seed: int = 0,
               prompt: Optional[np.ndarray | torch.Tensor] = None, top_p: Temperatures = None) -> Generation:
        """Sample ``count`` waveforms of exactly ``round(seconds · sample_rate)`` samples.

        Args:
            seconds: length of every output (the prompt included, when given).
            count: waveforms sampled together (one batch).
            temperatures: one number for every level, or ``{level: T}`` (others from the config's
                ``quality.temperatures``, else 1.0); 0 = greedy.
            seed: seeds the one generator the whole cascade draws from.
            prompt: float[P] waveform to continue: it is encoded through the levels (its first
                ``P // hop · hop`` samples, whole top-level frames), the prior continues its top
                codes and every decoder is primed with its tokens.
            top_p: nucleus cut-offs, given like ``temperatures`` (default: ``quality.top_p``, else 1).
        Returns:
            :class:`Generation` (``waves``: float32[count x N]).
        """
        if self.top is None:
            raise StackError(f"stack {self.cfg.stack} has no prior on top ({', '.join(self.cfg.level_names())}): "
                             f"it can reconstruct but not sample")
        self._need([self.top, *self.ada_levels])
        n = int(round(seconds * self.sample_rate))
        if n < 1 or count < 1:
            raise StackError(f"nothing to sample: seconds={seconds}, count={count}")
        temps, nuclei = self.temperatures(temperatures), self.nuclei(top_p)
        hop = self.hop
        n_top = -(-n // hop)
        prompts: Optional[dict[str, torch.Tensor]] = None
        p_samples = 0
        if prompt is not None:
            tokens, p = self._tokens(prompt)
            p_samples = p // hop * hop
            if p_samples == 0:
                raise StackError(f"the prompt ({p} samples) is shorter than one top-level frame ({hop} samples)")
            if p_samples >= n:
                raise StackError(f"the prompt ({p_samples / self.sample_rate:.3f} s usable) is not shorter than "
                                 f"the requested {seconds:g} s: nothing left to generate")
            enc = self._encode_tokens(tokens[:p_samples]) if self.ada_levels else {"audio": tokens[:p_samples]}
            prompts = {k: torch.as_tensor(v, dtype=torch.long, device=self.device)[None].repeat(count, 1)
                       for k, v in enc.items()}
        g = self._generator(seed)
        timings: dict[str, float] = {}
        kept: dict[str, torch.Tensor] = {}
        top_in = self.cfg.below(self.top) or "audio"
        t0 = time.perf_counter()
        with _threads(self.threads, self.device), self._bar(self.top, n_top, count) as bar:
            tokens = self.models[self.top].generate(n_top, batch=count, temperature=temps[self.top], generator=g,
                                                    prompt=None if prompts is None else prompts[top_in],
                                                    top_p=nuclei[self.top], progress=bar)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[self.top] = time.perf_counter() - t0
        kept[self.top] = tokens.cpu()
        if self.ada_levels:
            tokens = self._cascade(self.ada_levels[-1], tokens, temps, nuclei, g, timings, prompts, kept)
        waves = mulaw_decode(tokens[:, :n].cpu().numpy(), self.mu)
        return Generation(waves=np.ascontiguousarray(waves, dtype=np.float32), sample_rate=self.sample_rate,
                          timings=timings, tokens=kept, prompt_samples=p_samples)

    def trained_levels(self) -> list[str]:
        """The ADA levels, bottom up, as far as each has an export: what can reconstruct now
        (level 1 alone as soon as it is trained, before any level above exists)."""
        out = []
        for name in self.ada_levels:
            if name not in self.models:
                break
            out.append(name)
        return out

    @torch.no_grad()
    def reconstruct(self, wave: np.ndarray | torch.Tensor, temperatures: Temperatures = None,
                    seed: int = 0, levels: Optional[Sequence[str]] = None, top_p: Temperatures = None
                    ) -> Reconstruction:
        """Encode ``wave`` (float[N]) through the levels, then decode it back from each level's codes.

        The input is padded with silence to whole frames of the highest level used and every
        output cut back to N samples. ``levels`` picks which reconstructions to make (default:
        every ADA level trained so far, bottom up: see :meth:`trained_levels`); a level needs the
        exports of itself and of every level below it, not of the levels above.
        """
        if not self.ada_levels:
            raise StackError(f"stack {self.cfg.stack} has no level with codes to reconstruct through")
        if levels:
            wanted = [_level_key(x) for x in levels]
            for name in wanted:
                if name not in self.ada_levels:
                    raise StackError(f"no ADA level {name!r} to reconstruct from (have {', '.join(self.ada_levels)})")
        else:
            wanted = self.trained_levels()
            if not wanted:
                self._need(self.ada_levels[:1])  # raises: the bottom level has no export
        used = self.ada_levels[: max(self.ada_levels.index(n) for n in wanted) + 1]
        self._need(used)
        temps, nuclei = self.temperatures(temperatures), self.nuclei(top_p)
        tokens, n = self._tokens(wave, pad_to=math.prod(self.cfg.level(x).hop for x in used))
        enc = self._encode_tokens(tokens, used)
        g = self._generator(seed)
        # Top-down, one batched decode per level: the reconstructions from every level at or above
        # it go through each decoder together (their streams have equal length: the input was
        # padded to whole top-level frames).
        streams: dict[str, torch.Tensor] = {}
        timings: dict[str, float] = {}
        for name in reversed(used):
            if name in wanted:
                streams[name] = torch.as_tensor(enc[name], dtype=torch.long, device=self.device)[None]
            if not streams:
                continue
            keys = list(streams)
            t0 = time.perf_counter()
            batch = torch.cat([streams[k] for k in keys])
            with _threads(self.threads, self.device), self._bar(name, batch.shape[1] * self.cfg.level(name).hop,
                                                                len(keys)) as bar:
                out = self.models[name].decode(batch, temperature=temps[name], generator=g, top_p=nuclei[name],
                                               progress=bar)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[name] = time.perf_counter() - t0
            streams = {k: out[i:i + 1] for i, k in enumerate(keys)}
        waves = {k: mulaw_decode(streams[k][0, :n].cpu().numpy(), self.mu).astype(np.float32) for k in wanted}
        return Reconstruction(original=mulaw_decode(tokens[:n], self.mu).astype(np.float32), waves=waves,
                              codes={k: v for k, v in enc.items() if k != "audio"}, timings=timings,
                              sample_rate=self.sample_rate)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def load_key(cfg: StackConfig, key: str) -> np.ndarray:
    """The float32[N] waveform of sample ``key`` of the stack's audio shard set (any split)."""
    from largewave.audio import decode_flac, pcm16_to_float
    from largewave.data.loader import ShardSamples
    from largewave.data.manifest import ManifestError, read_manifest

    root = cfg.path(cfg.data.shards)
    try:
        m = read_manifest(root)
    except ManifestError as e:
        raise StackError(f"{key!r} is not a file, and the audio shards to look it up in are not ready: {e}") from None
    for split in m.splits:
        keys = m.keys(split)
        if key in keys:
            pcm, rate = decode_flac(ShardSamples(root, split).members(keys.index(key), ("flac",))["flac"])
            if rate != cfg.audio.sample_rate:
                raise StackError(f"{root}: {key} is at {rate} Hz, the stack at {cfg.audio.sample_rate} Hz")
            return pcm16_to_float(pcm)
    example = next((k for s in m.splits for k in m.keys(s)), None)
    raise StackError(f"{key!r} is neither an audio file nor a key of {root}"
                     + (f" (keys look like {example!r}; the valid split has {len(m.keys('valid'))})" if example else ""))


def load_input(cfg: StackConfig, source: str | os.PathLike, seconds: Optional[float] = None,
               start: float = 0.0) -> tuple[np.ndarray, str]:
    """A recording (an audio file, or a key of the audio shard set) as float32[N] at the stack's
    rate, from ``start`` seconds, at most ``seconds`` long; and a short name for it."""
    from largewave.audio import AudioError, load_audio

    p = Path(os.path.expanduser(str(source)))
    if p.exists():
        try:
            wave, _ = load_audio(p, cfg.audio.sample_rate)
        except AudioError as e:
            raise StackError(f"{p}: {e}") from None
        name = p.stem
    else:
        wave, name = load_key(cfg, str(source)), str(source)
    a = int(round(start * cfg.audio.sample_rate))
    b = len(wave) if seconds is None else a + int(round(seconds * cfg.audio.sample_rate))
    if a >= len(wave):
        raise StackError(f"{source}: starts at {start:g} s but is {len(wave) / cfg.audio.sample_rate:.2f} s long")
    return np.ascontiguousarray(wave[a:b], dtype=np.float32), name


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int) -> Path:
    """float[N] in [-1, 1] → 16-bit mono WAV."""
    import soundfile as sf

    w = np.asarray(wave, dtype=np.float32)
    if w.ndim != 1 or not np.all(np.isfinite(w)):
        raise StackError(f"{path}: refusing to write a waveform of shape {w.shape} with non-finite samples")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(w, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def _wandb_log(items: list[tuple[str, np.ndarray]], sample_rate: int) -> bool:
    """Log audio to the active W&B run, if there is one (never starts a run)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.log({f"samples/{name}": wandb.Audio(w, sample_rate=sample_rate, caption=name) for name, w in items})
    return True


def samples_dir(cfg: StackConfig, seed: int) -> Path:
    """``runs/<stack>/samples/<YYYYmmdd-HHMMSS>-seed<seed>`` (a new folder per call)."""
    base = Path(cfg.run.root) / cfg.stack / "samples"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = base / f"{stamp}-seed{seed}"
    n = 1
    while out.exists():
        out = base / f"{stamp}-seed{seed}-{n}"
        n += 1
    return out


def _default_seed(seed: Optional[int]) -> int:
    return int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _summarise(mode: str, cfg: StackConfig, s: Stack, out: Path, items: list[tuple[str, np.ndarray]],
               seconds: float, count: int, seed: int, temps: dict[str, float], nuclei: dict[str, float],
               level_s: dict[str, float], audio_seconds: float, log) -> SampleSummary:
    paths = [str(write_wav(out / f"{name}.wav", w, s.sample_rate)) for name, w in items]
    logged = _wandb_log(items, s.sample_rate)
    summary = SampleSummary(
        mode=mode, stack=cfg.stack, out_dir=str(out), paths=paths, seconds=seconds, count=count, seed=seed,
        temperatures=temps, wall_s=sum(level_s.values()), level_s=level_s,
        rtf={k: v / max(audio_seconds, 1e-9) for k, v in level_s.items()},
        prior_receptive_field_s=s.receptive_field_seconds() if s.top else None, wandb=logged, top_p=nuclei)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
    if log is not None:
        log(str(summary))
    return summary


def _load(cfg: StackConfig, device, stack: Optional[Stack], log) -> Stack:
    from largewave import stack as stk

    if log is not None:
        stk.print_receptive_fields(cfg, log=log)
    return stack if stack is not None else Stack.load(cfg, device=device)


def sample_stack(cfg: StackConfig, seconds: float = 4.0, count: int = 1, *, temperatures: Temperatures = None,
                 seed: Optional[int] = None, out_dir: Optional[str | os.PathLike] = None,
                 device: Optional[str] = None, stack: Optional[Stack] = None, log=print,
                 top_p: Temperatures = None) -> SampleSummary:
    """Sample ``count`` clips of ``seconds`` from the trained stack and write ``sample-NNN.wav``
    (16 kHz mono PCM16, exactly ``round(seconds · rate)`` samples) and ``summary.json`` to
    ``out_dir`` (default :func:`samples_dir`). Prints the receptive fields and a summary
    (time per level and real-time factors) unless ``log`` is None."""
    s = _load(cfg, device, stack, log)
    seed = _default_seed(seed)
    gen = s.sample(seconds, count, temperatures, seed, top_p=top_p)
    out = Path(out_dir) if out_dir is not None else samples_dir(cfg, seed)
    items = [(f"sample-{i:03d}", w) for i, w in enumerate(gen.waves)]
    return _summarise("sample", cfg, s, out, items, seconds, count, seed, s.temperatures(temperatures),
                      s.nuclei(top_p), gen.timings, seconds * count, log)


def continue_stack(cfg: StackConfig, prompt: str | os.PathLike, seconds: float = 8.0, count: int = 1, *,
                   prompt_seconds: Optional[float] = None, temperatures: Temperatures = None,
                   seed: Optional[int] = None, out_dir: Optional[str | os.PathLike] = None,
                   device: Optional[str] = None, stack: Optional[Stack] = None, log=print,
                   top_p: Temperatures = None) -> SampleSummary:
    """Continue a recording (file or audio-shard key; its first ``prompt_seconds``, default all):
    ``count`` clips of ``seconds`` in total, the prompt first. Writes ``prompt.wav`` and
    ``continuation-NNN.wav``."""
    s = _load(cfg, device, stack, log)
    seed = _default_seed(seed)
    wave, _ = load_input(cfg, prompt, prompt_seconds)
    gen = s.sample(seconds, count, temperatures, seed, prompt=wave, top_p=top_p)
    out = Path(out_dir) if out_dir is not None else samples_dir(cfg, seed)
    items = [("prompt", wave[: gen.prompt_samples])] + [(f"continuation-{i:03d}", w) for i, w in enumerate(gen.waves)]
    return _summarise("continue", cfg, s, out, items, seconds, count, seed, s.temperatures(temperatures),
                      s.nuclei(top_p), gen.timings, seconds * count, log)


def reconstruct_stack(cfg: StackConfig, source: str | os.PathLike, seconds: Optional[float] = 4.0,
                      start: float = 0.0, *, temperatures: Temperatures = None, seed: Optional[int] = None,
                      out_dir: Optional[str | os.PathLike] = None, device: Optional[str] = None,
                      stack: Optional[Stack] = None, log=print, top_p: Temperatures = None) -> SampleSummary:
    """Encode a recording (file or audio-shard key; ``seconds`` from ``start``, None = all)
    through the levels and decode it back from each: writes ``original.wav`` (mu-law quantised,
    what the stack sees) and ``from-level1.wav``, ``from-level2.wav``, …"""
    s = _load(cfg, device, stack, log)
    seed = _default_seed(seed)
    wave, _ = load_input(cfg, source, seconds, start)
    rec = s.reconstruct(wave, temperatures, seed, top_p=top_p)
    out = Path(out_dir) if out_dir is not None else samples_dir(cfg, seed)
    items = [("original", rec.original)] + [(f"from-{name}", w) for name, w in rec.waves.items()]
    n = len(wave) / s.sample_rate
    return _summarise("reconstruct", cfg, s, out, items, n, 1, seed, s.temperatures(temperatures), s.nuclei(top_p),
                      rec.timings, n, log)


def parse_temperatures(specs: Sequence[str], what: str = "temperature") -> Temperatures:
    """Command-line temperatures (or, with ``what="top-p"``, nucleus cut-offs): ``["0.9"]``
    (every level) or ``["prior=0.9", "level1=1.0,level2=0.95"]``."""
    if not specs:
        return None
    out: dict[str, float] = {}
    everything: Optional[float] = None
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "=" in part:
                    k, v = part.split("=", 1)
                    out[_level_key(k.strip())] = float(v)
                else:
                    everything = float(part)
            except ValueError:
                raise ConfigError(f"{what} {part!r}: expected a number or level=number") from None
    if everything is not None and not out:
        return everything
    if everything is not None:
        raise ConfigError(f"give one {what} for every level, or level=value pairs, not both")
    return out
