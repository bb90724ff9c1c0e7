"""A quality summary of a trained stack: does each level use its codes, and does the audio it makes
look like the corpus?

- per ADA level: the share of its K codes used over its whole code set, validation bits per token
  with its true codes, and the "uses the codes" gap (bits per token with the code frames shuffled
  across batch and time, minus with the true ones; a decoder that ignores its codes has gap ≈ 0);
- the prior: validation bits per token;
- per sampled or reconstructed WAV: finite, length, loudness (dBFS) and spectral centroid, against
  the spectral centroid of the validation audio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile as sf
import torch

from largewave.config import StackConfig

SILENCE_DBFS = -60.0
USAGE_AIM = 0.9


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed required check fails the run; the others are aims


@dataclass
class Report:
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    audio: dict[str, dict[str, float]] = field(default_factory=dict)
    corpus_centroid_hz: float = float("nan")
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def format(self) -> str:
        lines = ["quality summary"]
        for name, m in self.levels.items():
            parts = [f"{m['bits_per_token']:.3f} bits/token on valid"]
            if "gap_bits" in m:
                parts.append(f"shuffled-codes gap {m['gap_bits']:+.3f} bits/token")
            if "codes_used" in m:
                parts.append(f"codes used {int(m['codes_used'])}/{int(m['codes'])} ({100 * m['usage']:.0f}%)")
            lines.append(f"  {name:<7} " + ", ".join(parts))
        for name, a in self.audio.items():
            lines.append(f"  {name:<28} {a['seconds']:.2f} s, {a['dbfs']:.1f} dBFS, spectral centroid "
                         f"{a['centroid_hz']:.0f} Hz")
        lines.append(f"  corpus (valid audio)         spectral centroid {self.corpus_centroid_hz:.0f} Hz")
        for c in self.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "aim ")
            lines.append(f"  [{mark}] {c.name}: {c.detail}")
        return "\n".join(lines)


def spectral_centroid(wave: np.ndarray, rate: int, frame: int = 1024, hop: int = 512) -> float:
    """Energy-weighted mean spectral centroid (Hz) of a mono waveform."""
    x = np.asarray(wave, dtype=np.float64)
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    n = 1 + (len(x) - frame) // hop
    frames = np.lib.stride_tricks.as_strided(x, shape=(n, frame), strides=(x.strides[0] * hop, x.strides[0]))
    mag = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1))
    freqs = np.fft.rfftfreq(frame, 1.0 / rate)
    energy = mag.sum(axis=1)
    keep = energy > 1e-9
    if not keep.any():
        return 0.0
    cent = (mag[keep] * freqs).sum(axis=1) / energy[keep]
    return float((cent * energy[keep]).sum() / energy[keep].sum())


def dbfs(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(np.asarray(wave, dtype=np.float64))))) if len(wave) else 0.0
    return 20 * math.log10(max(rms, 1e-12))


def _code_usage(root: str) -> tuple[int, int]:
    """(distinct codes used over every split, K) of a code set."""
    from largewave.data.loader import ShardSamples
    from largewave.data.manifest import read_manifest

    m = read_manifest(root)
    seen = np.zeros(int(m.codes), dtype=bool)
    for split, shards in m.splits.items():
        if not shards:
            continue
        r = ShardSamples(root, split)
        for i in range(len(r)):
            codes = r.crops(i, [0], int(r.lengths[i]))[0]
            seen[np.unique(codes)] = True
    return int(seen.sum()), int(m.codes)


@torch.no_grad()
def _valid_nll(cfg: StackConfig, level: str, batches: int, seed: int = 0) -> dict[str, float]:
    """Validation bits/token with true and with shuffled codes, from the level's export."""
    from largewave import stack
    from largewave.data.loader import EvalLoader
    from largewave.engine.export import load_export

    lv = cfg.level(level)
    model, _ = load_export(stack.export_path(cfg, level))
    model.eval()
    loader = EvalLoader(stack.input_dir(cfg, level), "valid", crop=lv.train.crop, hop=lv.hop,
                        batch_size=lv.train.micro_batch, mu=cfg.audio.mu, max_batches=batches)
    g = torch.Generator().manual_seed(seed)
    true = shuffled = n = 0.0
    for batch in loader:
        keep = batch.mask if batch.mask is not None else torch.ones(len(batch.tokens), dtype=torch.bool)
        if not keep.any():
            continue
        tokens = batch.tokens[keep]
        k = float(len(tokens))
        true += k * float(model.nll(tokens))
        if lv.kind in ("ada", "nsynth"):
            shuffled += k * float(model.nll(tokens, shuffle_codes=True, generator=g))
        n += k
    if n == 0:
        raise RuntimeError(f"{level}: the validation split has no crop of {lv.train.crop} tokens")
    out = {"bits_per_token": true / n / math.log(2)}
    if lv.kind in ("ada", "nsynth"):
        out["gap_bits"] = (shuffled - true) / n / math.log(2)
    return out


def _corpus_centroid(cfg: StackConfig, seconds: float = 30.0) -> float:
    from largewave.audio import mulaw_decode
    from largewave.data.loader import ShardSamples

    r = ShardSamples(cfg.path(cfg.data.shards), "valid")
    rate = cfg.audio.sample_rate
    waves, total = [], 0
    for i in range(len(r)):
        n = int(min(r.lengths[i], seconds * rate - total))
        if n <= 0:
            break
        waves.append(mulaw_decode(r.crops(i, [0], n, mu=cfg.audio.mu)[0], cfg.audio.mu))
        total += n
    return spectral_centroid(np.concatenate(waves), rate) if waves else float("nan")


def stack_report(cfg: StackConfig, wavs: Sequence[str | Path], *, expected_seconds: Optional[float] = None,
                 eval_batches: int = 8, strict: bool = True) -> Report:
    """Measure a trained stack and the WAVs it made. ``strict``: a non-positive codes gap fails."""
    from largewave import stack

    rep = Report()
    for name in cfg.level_names():
        lv = cfg.level(name)
        m = _valid_nll(cfg, name, eval_batches)
        if lv.has_codes:
            used, k = _code_usage(stack.codes_dir(cfg, name)) if stack.codes_status(cfg, name)[0] else (0, lv.quantiser.codes)
            m.update(codes_used=used, codes=k, usage=used / k)
            rep.checks.append(Check(f"{name} uses its codes", m["gap_bits"] > 0,
                                    f"shuffled-codes gap {m['gap_bits']:+.3f} bits/token (must be > 0)", required=strict))
            rep.checks.append(Check(f"{name} codebook usage", m["usage"] >= USAGE_AIM,
                                    f"{used}/{k} codes used (aim >= {100 * USAGE_AIM:.0f}%)", required=False))
        rep.levels[name] = m
    rep.corpus_centroid_hz = _corpus_centroid(cfg)
    for p in map(Path, wavs):
        wave, rate = sf.read(str(p), dtype="float32")
        a = {"seconds": len(wave) / rate, "dbfs": dbfs(wave), "centroid_hz": spectral_centroid(wave, rate),
             "rate": rate}
        rep.audio[p.name] = a
        finite = bool(np.isfinite(wave).all())
        length_ok = expected_seconds is None or abs(len(wave) - round(expected_seconds * rate)) == 0 \
            or not p.name.startswith("sample")
        rep.checks.append(Check(f"{p.name} is valid audio", finite and rate == cfg.audio.sample_rate and length_ok,
                                f"{'finite' if finite else 'NON-FINITE'}, {rate} Hz, {len(wave)} samples"))
        rep.checks.append(Check(f"{p.name} is not silent", a["dbfs"] > SILENCE_DBFS,
                                f"{a['dbfs']:.1f} dBFS (> {SILENCE_DBFS:.0f})"))
        ratio = a["centroid_hz"] / rep.corpus_centroid_hz if rep.corpus_centroid_hz > 0 else float("nan")
        rep.checks.append(Check(f"{p.name} spectrum", 0.5 <= ratio <= 2.0,
                                f"centroid {a['centroid_hz']:.0f} Hz vs corpus {rep.corpus_centroid_hz:.0f} Hz "
                                f"(×{ratio:.2f}; aim within ×2)", required=False))
    return rep
