"""Audio items and spectrogram images logged during training.

* ADA levels: reconstructions of validation clips (encode → decode, sampled sample by sample with
  the decoder's incremental state) next to the originals. Above level 1 the level's tokens are
  codes of the level below; they become audio through the exports of the levels below
  (``runs/<stack>/<level>/<signature>/export.pt``) when those exist, otherwise no audio is made.
* Priors (and the plain WaveNet): short unconditional generations, decoded the same way.

Spectrograms are rendered with numpy and written as PNG with zlib (no plotting dependency);
wandb shows them when Pillow is installed (it needs Pillow to read images).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from largewave.config import StackConfig


def make_samples(cfg: StackConfig, level: str, model: torch.nn.Module, valid_root: Optional[str], *,
                 clips: int, seconds: float, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """A list of ``{"name", "wave": float32[N], "caption"}`` items (possibly empty)."""
    from largewave.engine.evaluate import tokens_to_audio as _to_audio  # the one decode cascade

    lv = cfg.level(level)
    rate = cfg.input_rate(level)
    n_tokens = max(lv.hop, int(round(seconds * rate)) // lv.hop * lv.hop)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    items: list[dict[str, Any]] = []
    if lv.kind in ("ada", "nsynth"):
        if valid_root is None:
            return items
        from largewave.data.loader import EvalLoader

        try:
            loader = EvalLoader(valid_root, "valid", crop=n_tokens, hop=lv.hop, batch_size=clips, max_batches=1,
                                mu=cfg.audio.mu)
        except ValueError:
            return items  # no valid segment is that long
        batch = next(iter(loader))
        keep = batch.mask.nonzero().flatten() if batch.mask is not None else torch.arange(len(batch))
        tokens = batch.tokens[keep].to(device)
        recon = model.decode(model.encode(tokens), generator=g, temperature=cfg.quality.temperature(level),
                             top_p=cfg.quality.nucleus(level))
        # originals and reconstructions down the levels below in one batch: one load of each export,
        # one sample-by-sample pass
        waves = _to_audio(cfg, level, torch.cat([tokens, recon]), g, device)
        if waves is None:
            return items
        orig_wave, recon_wave = waves[: len(tokens)], waves[len(tokens):]
        for i in range(len(keep)):
            key = batch.keys[int(keep[i])]
            off = int(batch.offsets[int(keep[i])])
            items.append({"name": f"recon_{i}", "wave": recon_wave[i], "caption": f"reconstruction of {key} @ {off}"})
            items.append({"name": f"orig_{i}", "wave": orig_wave[i], "caption": f"original {key} @ {off}"})
    else:
        gen = model.generate(n_tokens, batch=clips, generator=g, temperature=cfg.quality.temperature(level),
                             top_p=cfg.quality.nucleus(level))
        wave = _to_audio(cfg, level, gen, g, device)
        if wave is None:
            return items
        for i in range(clips):
            items.append({"name": f"gen_{i}", "wave": wave[i], "caption": f"generation {i}"})
    return items


def write_and_wrap(items: list[dict[str, Any]], out_dir: Path, sample_rate: int, wandb_logger) -> dict[str, Any]:
    """Write ``.wav`` + spectrogram ``.png`` per item; return the W&B media dict."""
    import soundfile as sf

    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    for it in items:
        wav = out_dir / f"{it['name']}.wav"
        sf.write(wav, np.clip(it["wave"], -1, 1), sample_rate, subtype="PCM_16")
        png = out_dir / f"{it['name']}.png"
        write_png(png, spectrogram_image(it["wave"], sample_rate))
        if wandb_logger is not None and wandb_logger.enabled:
            data[f"samples/{it['name']}"] = wandb_logger.audio(it["wave"], sample_rate, it["caption"])
            img = wandb_logger.image(png, it["caption"])
            if img is not None:
                data[f"spectrograms/{it['name']}"] = img
    return data


def spectrogram_image(wave: np.ndarray, sample_rate: int, n_fft: int = 512, hop: int = 128,
                      top_db: float = 80.0) -> np.ndarray:
    """Log-magnitude STFT as uint8[freq x time] (low frequencies at the bottom)."""
    x = np.asarray(wave, dtype=np.float32)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft)[None, :], axis=1)).T  # [F x frames]
    db = 20 * np.log10(np.maximum(spec, 1e-5))
    db = np.clip(db - db.max(), -top_db, 0)
    img = ((db + top_db) / top_db * 255).astype(np.uint8)
    return img[::-1]


def write_png(path: Path, gray: np.ndarray) -> None:
    """An 8-bit grayscale image (uint8[H x W]) as a PNG file, through Pillow."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).save(path, format="PNG")
