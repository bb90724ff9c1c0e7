"""Audio I/O and the 8-bit mu-law token format.

Everything that touches waveforms goes through here:

* :func:`load_audio` decodes anything libsndfile reads (wav, flac, ogg/vorbis/opus, mp3, aiff, …),
  downmixes to mono and resamples to the stack's rate with soxr (a band-limited resampler), block
  by block so that a long recording never sits in memory at its original rate and width.
  Broken inputs raise :class:`AudioError` with a short, human-readable reason.
* :func:`encode_flac` / :func:`decode_flac` convert 16-bit PCM to and from FLAC bytes (what the
  audio shards store).
* :func:`mulaw_encode` / :func:`mulaw_decode` implement the WaveNet companding
  ``f(x) = sign(x)·ln(1 + mu|x|)/ln(1 + mu)`` quantised to ``mu + 1`` classes (256 for mu = 255).
  They accept numpy arrays or torch tensors and give identical classes for both.
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from typing import Union

import sys
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16000
PCM16_SCALE = 32768.0  # int16 → float in [-1, 1)

ArrayLike = Union[np.ndarray, "torch.Tensor"]


def _is_tensor(x) -> bool:
    # torch is only consulted when the caller already imported it (a tensor exists), so that
    # decoding workers of the shard builder do not pay for importing torch.
    t = sys.modules.get("torch")
    return t is not None and isinstance(x, t.Tensor)


class AudioError(Exception):
    """An input that cannot be used; ``str(e)`` is a short reason fit for a report."""


# --------------------------------------------------------------------------------------------
# mu-law
# --------------------------------------------------------------------------------------------


def mulaw_encode(x: ArrayLike, mu: int = 255) -> ArrayLike:
    """Waveform → mu-law classes.

    Args:
        x: float waveform in [-1, 1] (values outside are clipped), or int16 PCM; any shape.
            numpy array or torch tensor.
        mu: companding parameter; the output has ``mu + 1`` classes.

    Returns:
        Classes in ``0..mu``, same shape as ``x``: ``np.int64`` for numpy input, ``torch.long``
        (on x's device) for torch input. Class ``c`` covers companded values around
        ``2c/mu − 1``, so silence maps to the middle class (128 for mu = 255).

    Both backends compute in float64, so numpy and torch agree class for class.
    """
    if _is_tensor(x):
        import torch

        y = x.to(torch.float64)
        if not x.is_floating_point():
            y = y / PCM16_SCALE
        y = y.clamp(-1.0, 1.0)
        f = torch.sign(y) * torch.log1p(mu * y.abs()) / math.log1p(mu)
        return torch.floor((f + 1.0) / 2.0 * mu + 0.5).to(torch.long).clamp_(0, mu)
    a = np.asarray(x)
    y = a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        y = y / PCM16_SCALE
    y = np.clip(y, -1.0, 1.0)
    f = np.sign(y) * np.log1p(mu * np.abs(y)) / math.log1p(mu)
    return np.clip(np.floor((f + 1.0) / 2.0 * mu + 0.5), 0, mu).astype(np.int64)


def mulaw_decode(c: ArrayLike, mu: int = 255) -> ArrayLike:
    """mu-law classes → waveform in [-1, 1] (the inverse of :func:`mulaw_encode` up to quantisation).

    Args:
        c: integer classes in ``0..mu``, any shape; numpy array or torch tensor.

    Returns:
        ``float32`` waveform of the same shape (numpy in, numpy out; torch in, torch out).
    """
    if _is_tensor(c):
        import torch

        f = c.to(torch.float64) * (2.0 / mu) - 1.0
        x = torch.sign(f) * torch.expm1(f.abs() * math.log1p(mu)) / mu
        return x.to(torch.float32)
    f = np.asarray(c).astype(np.float64) * (2.0 / mu) - 1.0
    x = np.sign(f) * np.expm1(np.abs(f) * math.log1p(mu)) / mu
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# PCM16 and FLAC bytes
# --------------------------------------------------------------------------------------------


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float waveform (nominally [-1, 1]) → int16, rounded and clipped.

    Clipping is done here rather than by libsndfile, which wraps out-of-range floats around
    when it writes integer PCM; a band-limited resampler can overshoot full scale slightly.
    """
    # float32 is exact here (scaling by 2^15 only shifts the exponent) and halves the memory of
    # converting an hour-long piece.
    y = np.asarray(x, dtype=np.float32) * np.float32(PCM16_SCALE)
    return np.clip(np.rint(y, out=y), -32768, 32767, out=y).astype(np.int16)


def pcm16_to_float(x: np.ndarray) -> np.ndarray:
    """int16 → float32 in [-1, 1)."""
    return np.asarray(x, dtype=np.int16).astype(np.float32) / PCM16_SCALE


def encode_flac(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono int16 PCM ``[T]`` → FLAC file bytes (lossless; deterministic for the same input)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"encode_flac expects mono int16 samples [T], got {pcm.dtype} {pcm.shape}")
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes → (mono int16 PCM ``[T]``, sample rate). Multi-channel input is refused."""
    pcm, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    if pcm.shape[1] != 1:
        raise AudioError(f"expected mono FLAC, got {pcm.shape[1]} channels")
    return pcm[:, 0], rate


# --------------------------------------------------------------------------------------------
# Decoding arbitrary files
# --------------------------------------------------------------------------------------------


@dataclass
class AudioInfo:
    """What the original file was, kept with every segment cut from it."""

    orig_rate: int
    orig_channels: int
    orig_frames: int  # frames decoded at the original rate
    format: str  # libsndfile's container name, e.g. "WAV", "FLAC", "MP3"


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono float signal ``[T] → [T·out/in]`` (soxr, high quality)."""
    if in_rate == out_rate:
        return np.asarray(x, dtype=np.float32)
    return soxr.resample(np.asarray(x, dtype=np.float32), in_rate, out_rate, quality="HQ")


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
               block_seconds: float = 30.0) -> tuple[np.ndarray, AudioInfo]:
    """Decode a file to mono float32 at ``sample_rate``.

    Returns:
        ``(x, info)`` with ``x: float32[T]`` at ``sample_rate`` and :class:`AudioInfo` of the
        original.

    Raises:
        AudioError: the file cannot be opened or is not audio, holds no frames, contains
            NaN/inf samples, or is shorter than its header says (truncated).
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioError(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        f = sf.SoundFile(path)
    except sf.LibsndfileError as e:
        msg = str(e.error_string if hasattr(e, "error_string") else e)
        if "not recognised" in msg.lower() or "unknown format" in msg.lower():
            raise AudioError(f"not an audio file libsndfile can read ({msg.strip()})") from None
        raise AudioError(f"unreadable: {msg.strip()}") from None
    except (OSError, RuntimeError) as e:
        raise AudioError(f"unreadable: {e}") from None
    with f:
        info = AudioInfo(orig_rate=int(f.samplerate), orig_channels=int(f.channels), orig_frames=0,
                         format=str(f.format))
        if f.samplerate <= 0 or f.channels <= 0:
            raise AudioError(f"bad header: {f.samplerate} Hz, {f.channels} channels")
        declared = int(f.frames)
        # Streaming resampler: the result is a function of the input and the block size only.
        stream = None if f.samplerate == sample_rate else soxr.ResampleStream(
            f.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
        block = max(1, int(block_seconds * f.samplerate))
        out: list[np.ndarray] = []
        read = 0
        while True:
            try:
                chunk = f.read(block, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioError(f"decode error after {read} frames (truncated or corrupt?): {e}") from None
            n = chunk.shape[0]
            if n and not np.isfinite(chunk).all():
                bad = int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0]) + read
                raise AudioError(f"non-finite samples (NaN/inf), first at {bad / f.samplerate:.3f} s")
            mono = chunk.mean(axis=1, dtype=np.float32) if n else np.zeros(0, np.float32)
            read += n
            last = n < block
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            if mono.size:
                out.append(mono)
            if last:
                break
        log = f.extra_info
    info.orig_frames = read
    if read == 0:
        raise AudioError("no audio frames (zero-length audio)")
    _check_complete(info, declared, read, log)
    x = np.concatenate(out) if out else np.zeros(0, np.float32)
    if x.size == 0:
        raise AudioError("no audio frames after resampling (too short)")
    return x, info


# Chunk sizes that streaming writers put in a header when the length is not known yet; a file
# with one of these is not truncated just because the data ends before the "declared" size.
_UNKNOWN_CHUNK_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 8, 0x7FFFFFFF - 8}
_CHUNK_SHORT = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _check_complete(info: AudioInfo, declared: int, read: int, log: str) -> None:
    """Raise if the file holds less audio than its header promises (a cut-off download or copy).

    For chunked formats (WAV, AIFF, W64, …) libsndfile silently shrinks the frame count to what is
    present and notes the real size in its log, so the header's data-chunk size is compared
    instead. FLAC raises while decoding. For MP3/OGG the count comes from a Xing/Info header or
    the last page and can be slightly off, so only a clear shortfall counts.
    """
    m = _CHUNK_SHORT.search(log or "")
    if m:
        said, real = int(m.group(2)), int(m.group(3))
        if said not in _UNKNOWN_CHUNK_SIZES and real < said:
            raise AudioError(f"truncated: the {m.group(1)} chunk should hold {said} bytes, "
                             f"the file has {real}")
    if declared <= 0:
        return
    if info.format in ("MP3", "MPEG", "OGG"):
        slack = max(0.02 * declared, 4 * 1152)
        if read < declared - slack:
            raise AudioError(f"truncated: header says {declared} frames, only {read} could be decoded")
    elif read < declared:
        raise AudioError(f"truncated: header says {declared} frames, only {read} could be decoded")
