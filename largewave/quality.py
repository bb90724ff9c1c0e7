"""Audio quality figures: how close a reconstruction is to its original, and how much a generated
clip looks like the corpus. One definition, used by the trainer's evaluation, the demo's quality
summary and gate, and ``bench/learn.py``, so that every number compares.

Everything is computed on 16 kHz mono audio, on the first ``min(len(a), len(b))`` samples of the
two signals, from the same spectra:

* a 1024-point Hann STFT with hop 256 (frames start at 0; no padding);
* power floored at −80 dB relative to the clip's own peak bin power;
* "loud" frames: those whose total power is within 40 dB of the *original's* loudest frame.

The figures, each over the loud frames:

* **LSD** (log-spectral distance, dB): per frame, the RMS over the 50 Hz–6 kHz bins of the dB
  difference between the two power spectra; the median over frames. 0 for the original itself.
* **Flatness excess** (dB): the other clip's minus the original's median spectral flatness in dB,
  where flatness is the geometric over the arithmetic mean of a frame's power (all bins). Noise is
  flat (≈ −2.5 dB for white noise), piano is peaky (≈ −30 dB): a positive excess means noisier
  than the original.
* **Pitch-class agreement**: the mean cosine between the two frames' 12-bin pitch-class profiles,
  where a profile is the square root of the summed power of the 60 Hz–4 kHz bins in each pitch
  class (bin frequency → nearest equal-tempered semitone, A = 440 Hz). 1 for the original itself.

Each figure is read against two baselines computed the same way (:func:`baselines`): another clip
of the same split ("chance": what a model that ignored its input could reach) and Gaussian noise
at the original's RMS ("noise"). A reconstruction is good where it beats both by a margin.

For clips with no original (prior samples), :func:`describe` gives the spectral centroid and the
median flatness, compared with the corpus'.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

RATE = 16000
N_FFT = 1024
HOP = 256
FLOOR_DB = 80.0  # power floor below the clip's peak bin
LOUD_DB = 40.0  # loud frames: within this of the original's loudest frame
LSD_BAND = (50.0, 6000.0)
PITCH_BAND = (60.0, 4000.0)


@dataclass(frozen=True)
class Figures:
    """The three reconstruction figures (see the module docstring)."""

    lsd_db: float
    flatness_excess_db: float
    pitch_class_agreement: float
    loud_frames: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def _power(x: np.ndarray) -> np.ndarray:
    """[frames x bins] power, floored at −80 dB below the clip's peak bin."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(x) < N_FFT:
        x = np.pad(x, (0, N_FFT - len(x)))
    n = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.fft.rfft(x[idx] * np.hanning(N_FFT)[None, :], axis=1)
    p = spec.real ** 2 + spec.imag ** 2
    peak = p.max()
    floor = peak * 10 ** (-FLOOR_DB / 10) if peak > 0 else 1e-30
    return np.maximum(p, max(floor, 1e-30))


def _freqs() -> np.ndarray:
    return np.fft.rfftfreq(N_FFT, 1.0 / RATE)


def _loud(p_orig: np.ndarray) -> np.ndarray:
    energy = p_orig.sum(axis=1)
    return energy >= energy.max() * 10 ** (-LOUD_DB / 10)


def _flatness_db(p: np.ndarray) -> np.ndarray:
    """Per-frame spectral flatness in dB (geometric / arithmetic mean of the power)."""
    return 10 * (np.log10(p).mean(axis=1) - np.log10(p.mean(axis=1)))


_PITCH_CLASS: Optional[np.ndarray] = None


def _pitch_profiles(p: np.ndarray) -> np.ndarray:
    """[frames x 12] square root of the summed 60 Hz–4 kHz power per pitch class."""
    global _PITCH_CLASS
    f = _freqs()
    if _PITCH_CLASS is None:
        with np.errstate(divide="ignore"):
            semis = np.round(12 * np.log2(np.maximum(f, 1e-9) / 440.0)).astype(np.int64)
        _PITCH_CLASS = np.mod(semis, 12)
    band = (f >= PITCH_BAND[0]) & (f <= PITCH_BAND[1])
    onehot = np.zeros((band.sum(), 12))
    onehot[np.arange(band.sum()), _PITCH_CLASS[band]] = 1.0
    return np.sqrt(p[:, band] @ onehot)


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError("an empty clip has no quality figures")
    return a[:n], b[:n]


def figures(original: np.ndarray, other: np.ndarray) -> Figures:
    """LSD, flatness excess and pitch-class agreement of ``other`` against ``original`` (16 kHz
    mono float arrays; the first min(len) samples of both)."""
    a, b = _same_length(original, other)
    if not np.any(a):
        raise ValueError("the original is silent: no loud frames to compare")
    pa, pb = _power(a), _power(b)
    loud = _loud(pa)
    f = _freqs()
    band = (f >= LSD_BAND[0]) & (f <= LSD_BAND[1])
    diff = 10 * np.log10(pb[loud][:, band]) - 10 * np.log10(pa[loud][:, band])
    lsd = float(np.median(np.sqrt(np.mean(diff ** 2, axis=1))))
    flat = float(np.median(_flatness_db(pb[loud])) - np.median(_flatness_db(pa[loud])))
    ca, cb = _pitch_profiles(pa[loud]), _pitch_profiles(pb[loud])
    cos = (ca * cb).sum(axis=1) / np.maximum(np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1), 1e-30)
    return Figures(lsd_db=lsd, flatness_excess_db=flat, pitch_class_agreement=float(np.mean(cos)),
                   loud_frames=int(loud.sum()))


def noise_like(original: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gaussian noise at the original's RMS (the "noise" baseline's signal)."""
    x = np.asarray(original, dtype=np.float64).reshape(-1)
    rms = math.sqrt(float(np.mean(x ** 2))) if len(x) else 0.0
    return np.random.default_rng(seed).standard_normal(len(x)) * rms


def baselines(original: np.ndarray, chance: np.ndarray, seed: int = 0) -> dict[str, Figures]:
    """The figures of another clip of the split ("chance") and of equal-RMS noise ("noise")."""
    return {"chance": figures(original, chance), "noise": figures(original, noise_like(original, seed))}


def mean_figures(items: list[Figures]) -> Figures:
    """Mean of each figure over clips (loud frames summed)."""
    if not items:
        raise ValueError("no figures to average")
    return Figures(lsd_db=float(np.mean([f.lsd_db for f in items])),
                   flatness_excess_db=float(np.mean([f.flatness_excess_db for f in items])),
                   pitch_class_agreement=float(np.mean([f.pitch_class_agreement for f in items])),
                   loud_frames=int(sum(f.loud_frames for f in items)))


def describe(wave: np.ndarray) -> dict[str, float]:
    """Spectral centroid (Hz, power-weighted over loud frames) and median flatness (dB, loud
    frames; loud relative to the clip itself) of one clip: for samples that have no original."""
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    if not np.any(x):
        return {"centroid_hz": 0.0, "flatness_db": 0.0}
    p = _power(x)
    loud = _loud(p)
    f = _freqs()
    w = p[loud]
    centroid = float((w * f).sum() / w.sum())
    return {"centroid_hz": centroid, "flatness_db": float(np.median(_flatness_db(w)))}
