"""Audio quality of a level during training, with the figures of :mod:`largewave.quality`.

* An ADA level reconstructs a fixed set of validation clips from their true codes: encode →
  decode by sampling through its own decoder (temperature ``train.eval_temperature``, nucleus
  cut-off ``train.eval_top_p``), then down to audio through the exports of the levels below
  (above level 1), each at its ``quality.temperatures`` / ``quality.top_p``. The reconstruction is scored
  against the original audio of the same clip, and so are the two baselines: another clip of the
  split ("chance") and equal-RMS noise ("noise").
* A prior (or plain WaveNet) generates as many clips, decoded to audio the same way, and reports
  their spectral centroid and flatness beside the corpus' (the same validation clips).

The clips are the same at every evaluation and in every run of the level: ``train.eval_clips``
clips of ``train.eval_clip_seconds`` each, taken from the validation segments in manifest order,
round robin, at evenly spaced positions inside each segment (never at its very start, where
rendered pieces are silent). The originals are the mu-law decoded tokens: what the stack models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from largewave import quality
from largewave.audio import mulaw_decode
from largewave.config import StackConfig


@dataclass
class Clip:
    key: str
    offset: int  # in tokens of the level's input
    tokens: torch.Tensor  # LongTensor[T]: the level's input tokens
    audio: np.ndarray  # float32[T · samples per token]: the same stretch of audio, mu-law decoded


def fixed_clips(cfg: StackConfig, level: str, count: int, seconds: float) -> list[Clip]:
    """The validation clips that ``level`` is scored on (empty when no valid segment is long
    enough or the data is missing)."""
    from largewave import stack
    from largewave.data.loader import ShardSamples

    lv = cfg.level(level)
    rate = cfg.input_rate(level)
    n_tokens = max(lv.hop, int(round(seconds * rate)) // lv.hop * lv.hop)
    spt = cfg.samples_per_token(level)
    try:
        inp = ShardSamples(stack.input_dir(cfg, level), "valid")
        audio = inp if cfg.below(level) is None else ShardSamples(cfg.path(cfg.data.shards), "valid")
    except Exception:  # no valid split, no manifest: nothing to score on
        return []
    audio_index = {k: i for i, k in enumerate(audio.keys)}
    usable = [i for i in range(len(inp)) if int(inp.lengths[i]) >= n_tokens and inp.keys[i] in audio_index]
    if not usable or count < 1:
        return []
    per_segment = [0] * len(usable)
    for j in range(count):
        per_segment[j % len(usable)] += 1
    clips = []
    for r in range(max(per_segment)):  # round robin: the first clips come from different segments
        for slot, i in enumerate(usable):
            m = per_segment[slot]
            if r >= m:
                continue
            off = int((int(inp.lengths[i]) - n_tokens) * (r + 1) / (m + 1)) // lv.hop * lv.hop
            tokens = torch.as_tensor(inp.crops(i, [off], n_tokens, cfg.audio.mu)[0], dtype=torch.long)
            a = audio_index[inp.keys[i]]
            wave_tokens = audio.crops(a, [off * spt], n_tokens * spt, cfg.audio.mu)[0]
            clips.append(Clip(inp.keys[i], off, tokens, mulaw_decode(wave_tokens, cfg.audio.mu).astype(np.float32)))
    return clips


def tokens_to_audio(cfg: StackConfig, level: str, tokens: torch.Tensor, generator: torch.Generator,
                    device: torch.device) -> Optional[np.ndarray]:
    """Tokens of ``level``'s input stream → float32[B x N] audio, decoded through the exports of
    the levels below (None when one of them has no export yet), each sampled at its own
    ``quality.temperatures`` and ``quality.top_p``."""
    from largewave import stack
    from largewave.engine.export import load_export

    names = cfg.level_names()
    for name in reversed(names[: names.index(level)]):
        path = stack.export_path(cfg, name)
        if not path.exists():
            return None
        lower, _ = load_export(path, device=device)
        lower.eval()
        tokens = lower.decode(tokens.to(device), temperature=cfg.quality.temperature(name), generator=generator,
                              top_p=cfg.quality.nucleus(name))
    return np.asarray(mulaw_decode(tokens.cpu().numpy(), cfg.audio.mu), dtype=np.float32)


class QualityProbe:
    """Scores one level on its fixed clips; the clips and the baselines are computed once."""

    def __init__(self, cfg: StackConfig, level: str, count: int, seconds: float):
        self.cfg, self.level = cfg, level
        self.kind = cfg.level(level).kind
        self.clips = fixed_clips(cfg, level, count, seconds)
        self.seconds = seconds
        self.count = count
        self._baselines: Optional[dict[str, float]] = None

    @property
    def ready(self) -> bool:
        return bool(self.clips)

    def baselines(self) -> dict[str, float]:
        """Mean figures of the chance and noise baselines over the clips."""
        if self._baselines is None:
            out: dict[str, float] = {}
            n = len(self.clips)
            if n >= 2:
                chance = quality.mean_figures([quality.figures(c.audio, self.clips[(j + 1) % n].audio)
                                               for j, c in enumerate(self.clips)])
                out.update(chance.as_dict("chance_"))
            noise = quality.mean_figures([quality.figures(c.audio, quality.noise_like(c.audio, seed=j))
                                          for j, c in enumerate(self.clips)])
            out.update(noise.as_dict("noise_"))
            corpus = [quality.describe(c.audio) for c in self.clips]
            out["corpus_centroid_hz"] = float(np.mean([d["centroid_hz"] for d in corpus]))
            out["corpus_flatness_db"] = float(np.mean([d["flatness_db"] for d in corpus]))
            self._baselines = {k: v for k, v in out.items() if not k.endswith("loud_frames")}
        return self._baselines

    @torch.no_grad()
    def run(self, model: torch.nn.Module, device: torch.device, temperature: float, seed: int,
            top_p: float = 1.0) -> tuple[dict[str, float], list[tuple[str, np.ndarray, np.ndarray]]]:
        """``(figures, [(name, original, output)])``: reconstructions for an ADA level, generations
        (original = a corpus clip, for the picture) for a prior, sampled at ``temperature`` and
        nucleus cut-off ``top_p``. Figures are empty when the levels below have no exports yet."""
        if not self.clips:
            return {}, []
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        if self.kind in ("ada", "nsynth"):
            tokens = torch.stack([c.tokens for c in self.clips]).to(device)
            out_tokens = model.decode(model.encode(tokens), temperature=temperature, generator=g, top_p=top_p)
        else:
            n = self.clips[0].tokens.numel()
            out_tokens = model.generate(n, batch=len(self.clips), temperature=temperature, generator=g, top_p=top_p)
        waves = tokens_to_audio(self.cfg, self.level, out_tokens, g, device)
        if waves is None:
            return {}, []
        res = dict(self.baselines())
        pairs = [(f"clip{j}", c.audio, waves[j]) for j, c in enumerate(self.clips)]
        if self.kind in ("ada", "nsynth"):
            figs = quality.mean_figures([quality.figures(c.audio, waves[j]) for j, c in enumerate(self.clips)])
            res.update({k: v for k, v in figs.as_dict("recon_").items() if not k.endswith("loud_frames")})
        described = [quality.describe(w) for w in waves]
        res["output_centroid_hz"] = float(np.mean([d["centroid_hz"] for d in described]))
        res["output_flatness_db"] = float(np.mean([d["flatness_db"] for d in described]))
        res["output_dbfs"] = float(np.mean([20 * math.log10(max(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))),
                                                                 1e-12)) for w in waves]))
        return res, pairs


def comparison_image(original: np.ndarray, output: np.ndarray, sample_rate: int) -> np.ndarray:
    """uint8[H x W]: the original's spectrogram above the output's, a white line between."""
    from largewave.engine.media import spectrogram_image

    a = spectrogram_image(original, sample_rate)
    b = spectrogram_image(output, sample_rate)
    w = min(a.shape[1], b.shape[1])
    return np.concatenate([a[:, :w], np.full((3, w), 255, np.uint8), b[:, :w]], axis=0)


def format_figures(res: dict[str, Any]) -> str:
    """One console line of figures against their baselines."""
    if "recon_lsd_db" in res:
        parts = []
        for key, name, fmt in (("lsd_db", "LSD", "{:.1f} dB"), ("flatness_excess_db", "flatness excess", "{:+.1f} dB"),
                               ("pitch_class_agreement", "pitch-class", "{:.3f}")):
            base = "/".join(fmt.format(res[f"{b}_{key}"]) for b in ("chance", "noise") if f"{b}_{key}" in res)
            parts.append(f"{name} {fmt.format(res[f'recon_{key}'])} (chance/noise {base})")
        return "reconstruction " + ", ".join(parts)
    if "output_centroid_hz" in res:
        return (f"samples: centroid {res['output_centroid_hz']:.0f} Hz (corpus {res['corpus_centroid_hz']:.0f}), "
                f"flatness {res['output_flatness_db']:.1f} dB (corpus {res['corpus_flatness_db']:.1f})")
    return ""


def write_comparison(path: Path, original: np.ndarray, output: np.ndarray, sample_rate: int) -> Path:
    from largewave.engine.media import write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, comparison_image(original, output, sample_rate))
    return path
