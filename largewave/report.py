"""The quality summary of a trained stack, and its gate: does each level use its codes, how close
are its reconstructions to the input, and do the prior's samples look like the corpus?

- per level: validation bits/token; per ADA level the "uses the codes" gap (bits/token with the
  code frames shuffled across batch and time, minus with the true ones; a decoder that ignores its
  codes has gap ≈ 0) and the share of its K codes used;
- per ADA level: the figures of :mod:`largewave.quality` (LSD, flatness excess, pitch-class
  agreement) of its reconstructions of ``quality.clips`` fixed valid clips (decoded through the
  levels below), each against the chance (another clip) and noise (equal-RMS noise) baselines;
- the prior: its samples' spectral centroid and flatness against the corpus';
- every sampled WAV: finite, the requested length, not silent.

Every figure is printed against its floor (``quality.gate.<level>`` in the stack config) and its
baselines; a missed floor is a FAIL and :attr:`Report.ok` is False (the demo exits 1). Figures
without a floor are printed as information.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile as sf
import torch

from largewave.config import LevelGate, StackConfig

SILENCE_DBFS = -60.0
USAGE_AIM = 0.9


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed required check fails the run; the others are information


@dataclass
class Report:
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    audio: dict[str, dict[str, float]] = field(default_factory=dict)
    corpus_centroid_hz: float = float("nan")
    corpus_flatness_db: float = float("nan")
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
            if "recon_lsd_db" in m:
                lines.append(f"          reconstruction of {int(m['clips'])} valid clips × {m['clip_seconds']:g} s "
                             f"(temperature {m['temperature']:g}, top-p {m.get('top_p', 1.0):g}):   ours | chance | noise")
                for key, label, fmt in FIGURES:
                    lines.append(f"            {label:<22} {fmt.format(m['recon_' + key]):>9} | "
                                 f"{fmt.format(m.get('chance_' + key, float('nan'))):>9} | "
                                 f"{fmt.format(m['noise_' + key]):>9}")
        for name, a in self.audio.items():
            lines.append(f"  {name:<28} {a['seconds']:.2f} s, {a['dbfs']:.1f} dBFS, spectral centroid "
                         f"{a['centroid_hz']:.0f} Hz, flatness {a['flatness_db']:.1f} dB")
        lines.append(f"  corpus (valid audio)         spectral centroid {self.corpus_centroid_hz:.0f} Hz, "
                     f"flatness {self.corpus_flatness_db:.1f} dB")
        for c in self.checks:
            mark = "info" if not c.required else ("ok  " if c.ok else "FAIL")
            lines.append(f"  [{mark}] {c.name}: {c.detail}")
        return "\n".join(lines)


FIGURES = (("lsd_db", "LSD (dB)", "{:.2f}"), ("flatness_excess_db", "flatness excess (dB)", "{:+.2f}"),
           ("pitch_class_agreement", "pitch-class agreement", "{:.3f}"))


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


def _corpus(cfg: StackConfig, seconds: float = 30.0) -> tuple[float, float]:
    """(spectral centroid, median flatness in dB) of up to ``seconds`` of valid audio, from the
    middle of each valid segment (rendered pieces begin and end in silence)."""
    from largewave import quality
    from largewave.audio import mulaw_decode
    from largewave.data.loader import ShardSamples

    r = ShardSamples(cfg.path(cfg.data.shards), "valid")
    rate = cfg.audio.sample_rate
    per = int(seconds * rate / max(1, len(r)))
    waves = []
    for i in range(len(r)):
        n = int(min(r.lengths[i], per))
        off = (int(r.lengths[i]) - n) // 2
        if n > 0:
            waves.append(mulaw_decode(r.crops(i, [off], n, mu=cfg.audio.mu)[0], cfg.audio.mu))
    if not waves:
        return float("nan"), float("nan")
    x = np.concatenate(waves)
    return spectral_centroid(x, rate), quality.describe(x)["flatness_db"]


def reconstruction_figures(cfg: StackConfig, level: str, seed: int = 0) -> dict[str, float]:
    """The figures of ``level``'s reconstructions of the fixed valid clips (``quality.clips`` ×
    ``quality.clip_seconds``) and of the two baselines, decoded through the exports below."""
    from largewave import stack
    from largewave.engine.evaluate import QualityProbe
    from largewave.engine.export import load_export

    q = cfg.quality
    probe = QualityProbe(cfg, level, q.clips, q.clip_seconds)
    if not probe.ready:
        return {}
    model, _ = load_export(stack.export_path(cfg, level))
    model.eval()
    from largewave.distributed import flush_denormals

    flush_denormals()  # a trained decoder makes subnormals, which are slow on CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # sample by sample: one thread is fastest (see sampling.Stack)
    try:
        figs, _ = probe.run(model, torch.device("cpu"), q.temperature(level), seed=seed, top_p=q.nucleus(level))
    finally:
        torch.set_num_threads(before)
    if figs:
        figs.update(clips=len(probe.clips), clip_seconds=q.clip_seconds, temperature=q.temperature(level),
                    top_p=q.nucleus(level))
    return figs


def _floor_checks(rep: Report, name: str, m: dict[str, float], gate: LevelGate) -> None:
    def check(label: str, ok: bool, detail: str) -> None:
        rep.checks.append(Check(f"{name} {label}", bool(ok), detail))

    if gate.gap_bits is not None and "gap_bits" in m:
        check("uses its codes", m["gap_bits"] > gate.gap_bits,
              f"shuffled-codes gap {m['gap_bits']:+.3f} bits/token (floor > {gate.gap_bits:g})")
    if "recon_lsd_db" not in m:
        if any(v for v in (gate.lsd_db, gate.flatness_excess_db, gate.pitch_class, gate.beat_noise, gate.beat_chance,
                           gate.lsd_beats_noise)):
            check("reconstruction", False, "no reconstruction figures (no valid clip long enough, or no export)")
        return
    lsd, flat, pcs = m["recon_lsd_db"], m["recon_flatness_excess_db"], m["recon_pitch_class_agreement"]
    base = f"chance {m.get('chance_lsd_db', float('nan')):.2f}, noise {m['noise_lsd_db']:.2f}"
    if gate.lsd_db is not None:
        check("reconstruction LSD", lsd <= gate.lsd_db, f"{lsd:.2f} dB (floor <= {gate.lsd_db:g}; {base})")
    if gate.flatness_excess_db is not None:
        check("reconstruction flatness excess", flat <= gate.flatness_excess_db,
              f"{flat:+.2f} dB (floor <= {gate.flatness_excess_db:+g}; noise {m['noise_flatness_excess_db']:+.2f})")
    if gate.pitch_class is not None:
        check("reconstruction pitch-class agreement", pcs >= gate.pitch_class,
              f"{pcs:.3f} (floor >= {gate.pitch_class:g}; chance {m.get('chance_pitch_class_agreement', float('nan')):.3f}, "
              f"noise {m['noise_pitch_class_agreement']:.3f})")
    if gate.lsd_beats_noise or gate.beat_noise:
        check("reconstruction LSD beats noise", lsd < m["noise_lsd_db"], f"{lsd:.2f} < {m['noise_lsd_db']:.2f} dB")
    if gate.beat_noise:
        check("reconstruction flatness beats noise", flat < m["noise_flatness_excess_db"],
              f"{flat:+.2f} < {m['noise_flatness_excess_db']:+.2f} dB")
        check("reconstruction pitch class beats noise", pcs > m["noise_pitch_class_agreement"],
              f"{pcs:.3f} > {m['noise_pitch_class_agreement']:.3f}")
    if gate.beat_chance:
        if "chance_lsd_db" not in m:
            check("reconstruction beats chance", False, "one clip only: no chance baseline (quality.clips >= 2)")
        else:
            check("reconstruction LSD beats chance", lsd < m["chance_lsd_db"], f"{lsd:.2f} < {m['chance_lsd_db']:.2f} dB")
            check("reconstruction pitch class beats chance", pcs > m["chance_pitch_class_agreement"],
                  f"{pcs:.3f} > {m['chance_pitch_class_agreement']:.3f}")


def stack_report(cfg: StackConfig, wavs: Sequence[str | Path] = (), *, expected_seconds: Optional[float] = None,
                 eval_batches: int = 8, figures: bool = True, levels: Optional[Sequence[str]] = None) -> Report:
    """Measure a trained stack and the WAVs it sampled, and check them against ``quality.gate``.

    Args:
        wavs: sampled WAVs (checked: finite, length, not silent; the prior's gate compares their
            spectrum with the corpus'). Reconstructions are made here from the fixed clips.
        figures: compute the reconstruction figures of every trained ADA level.
        levels: measure only these levels (default: all; e.g. level 1 before level 2 exists).
    """
    from largewave import quality, stack

    rep = Report()
    rep.corpus_centroid_hz, rep.corpus_flatness_db = _corpus(cfg)
    for name in cfg.level_names():
        if levels is not None and name not in levels:
            continue
        lv = cfg.level(name)
        if not stack.export_path(cfg, name).exists():
            rep.checks.append(Check(f"{name} is trained", False, f"no export at {stack.export_path(cfg, name)}"))
            continue
        m = _valid_nll(cfg, name, eval_batches)
        if lv.has_codes:
            if stack.codes_status(cfg, name)[0]:  # usage over the whole code set, once it is computed
                used, k = _code_usage(stack.codes_dir(cfg, name))
                m.update(codes_used=used, codes=k, usage=used / k)
                rep.checks.append(Check(f"{name} codebook usage", m["usage"] >= USAGE_AIM,
                                        f"{used}/{k} codes used (aim >= {100 * USAGE_AIM:.0f}%)", required=False))
            if figures:
                m.update(reconstruction_figures(cfg, name))
        rep.levels[name] = m
        _floor_checks(rep, name, m, cfg.quality.gate.get(name, LevelGate()))
    samples = []
    for p in map(Path, wavs):
        wave, rate = sf.read(str(p), dtype="float32")
        a = {"seconds": len(wave) / rate, "dbfs": dbfs(wave), "rate": rate,
             **(quality.describe(wave) if len(wave) else {"centroid_hz": 0.0, "flatness_db": 0.0})}
        rep.audio[p.name] = a
        samples.append(a)
        finite = bool(np.isfinite(wave).all())
        length_ok = expected_seconds is None or abs(len(wave) - round(expected_seconds * rate)) == 0
        rep.checks.append(Check(f"{p.name} is valid audio", finite and rate == cfg.audio.sample_rate and length_ok,
                                f"{'finite' if finite else 'NON-FINITE'}, {rate} Hz, {len(wave)} samples"))
        rep.checks.append(Check(f"{p.name} is not silent", a["dbfs"] > SILENCE_DBFS,
                                f"{a['dbfs']:.1f} dBFS (> {SILENCE_DBFS:.0f})"))
    top = cfg.level_names()[-1]
    gate = cfg.quality.gate.get(top, LevelGate())
    if samples and cfg.level(top).kind in ("prior", "wavenet"):
        cent = float(np.mean([a["centroid_hz"] for a in samples]))
        flat = float(np.mean([a["flatness_db"] for a in samples]))
        ratio = cent / rep.corpus_centroid_hz if rep.corpus_centroid_hz > 0 else float("nan")
        within = max(ratio, 1 / ratio) if ratio > 0 else float("inf")
        rep.checks.append(Check(f"{top} samples' spectral centroid", gate.centroid_ratio is None or within <= gate.centroid_ratio,
                                f"{cent:.0f} Hz vs corpus {rep.corpus_centroid_hz:.0f} Hz (×{ratio:.2f}; "
                                + (f"floor within ×{gate.centroid_ratio:g})" if gate.centroid_ratio else "no floor)"),
                                required=gate.centroid_ratio is not None))
        rep.checks.append(Check(f"{top} samples' flatness", gate.flatness_db is None
                                or abs(flat - rep.corpus_flatness_db) <= gate.flatness_db,
                                f"{flat:.1f} dB vs corpus {rep.corpus_flatness_db:.1f} dB ("
                                + (f"floor within {gate.flatness_db:g} dB)" if gate.flatness_db is not None else "no floor)"),
                                required=gate.flatness_db is not None))
    return rep
