"""Tiny synthetic shard sets for tests, written exactly as ``docs/interfaces.md`` specifies.

    audio = make_audio_shards(tmp_path / "audio", pieces=3, seconds=2.0, per_shard=2)
    audio.data["p000-ab12cd-s000"]   # int16[N], the PCM16 stored in that sample's FLAC
    codes = make_code_shards(tmp_path / "codes", pieces=3, seconds=2.0, hop=8, K=64)

Each call writes the shards of one split and (re)writes ``manifest.json`` last, keeping the
other splits already listed there, so several calls build a train/valid/test set in one folder.
``corrupt={key: what}`` stores a broken member for that key (``"flac"``/``"npy"`` garbage,
``"json"`` not JSON, ``"missing"`` no payload member, ``"truncated"`` half a FLAC) while the
manifest still lists it — as a bad disk or a half-copied shard would leave it.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import soundfile as sf
import webdataset as wds

from largewave.data.manifest import write_manifest

SAMPLE_RATE = 16000


@dataclass
class ShardSet:
    root: Path
    split: str
    keys: list[str]  # in shard order
    data: dict[str, np.ndarray] = field(default_factory=dict)  # key → int16 PCM or codes
    shards: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def lengths(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.data.items()}


def _piece_slug(i: int, split: str) -> str:
    h = hashlib.sha1(f"{split}/piece{i}".encode()).hexdigest()[:6]
    return f"{split}{i:03d}-{h}"


def _segments(total: int, segment: int) -> list[tuple[int, int]]:
    """(start, length) of contiguous segments of at least ``segment`` tokens (the tail joins the
    last segment), like the shard builder cuts pieces."""
    if total <= segment:
        return [(0, total)]
    n = total // segment
    bounds = [i * segment for i in range(n)] + [total]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def _synthetic_pcm(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(110, 880)
    x = 0.4 * np.sin(2 * np.pi * f0 * t) * np.exp(-(t % 0.5) * 3) + 0.05 * rng.standard_normal(n)
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def _flac_bytes(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_split(root: Path, split: str, samples: list[dict], per_shard: int,
                 payload_ext: str) -> list[dict]:
    """Write ``samples`` (dicts with key, payload bytes, meta dict, length, seconds) into
    ``{split}-{i:06d}.tar`` shards; return the manifest entries."""
    entries = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start:start + per_shard]
        name = f"{split}-{s:06d}.tar"
        path = root / name
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="", group="", mode=0o644, mtime=0) as tw:
            for smp in chunk:
                obj = {"__key__": smp["key"], "json": smp["json"]}
                if smp["payload"] is not None:
                    obj[payload_ext] = smp["payload"]
                tw.write(obj)
        data = buf.getvalue()
        path.write_bytes(data)
        entries.append({
            "name": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "samples": len(chunk),
            "keys": [smp["key"] for smp in chunk],
            "lengths": [smp["length"] for smp in chunk],
            "seconds": float(sum(smp["seconds"] for smp in chunk)),
        })
    return entries


def _write_manifest(root: Path, split: str, entries: list[dict], base: dict) -> dict:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update({k: v for k, v in base.items()})
    splits = manifest.setdefault("splits", {})
    splits[split] = entries
    for name in ("train", "valid", "test"):
        splits.setdefault(name, [])
    manifest["hours"] = {name: sum(e["seconds"] for e in es) / 3600.0 for name, es in splits.items()}
    write_manifest(root, manifest)  # last and atomically: only now is the set complete
    return manifest


def _corrupt(payload: bytes, json_bytes: bytes, what: Optional[str]) -> tuple[Optional[bytes], bytes]:
    if what is None:
        return payload, json_bytes
    if what in ("flac", "npy"):
        return b"\x00garbage" * 64, json_bytes
    if what == "truncated":
        return payload[: len(payload) // 2], json_bytes
    if what == "json":
        return payload, b"{not json"
    if what == "missing":
        return None, json_bytes
    raise ValueError(f"unknown corruption {what!r}")


def make_audio_shards(root: Union[str, Path], pieces: int = 3, seconds: Union[float, Sequence[float]] = 2.0,
                      segment_seconds: float = 1.0, per_shard: int = 2, split: str = "train",
                      corrupt: Optional[dict[str, str]] = None, seed: int = 0) -> ShardSet:
    """Write an audio shard set: ``pieces`` pieces of ``seconds`` (one value or one per piece) of
    synthetic 16 kHz PCM16, cut into segments of >= ``segment_seconds``, ``per_shard`` samples per
    tar. Returns the keys and the exact PCM of every sample."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    durations = [seconds] * pieces if isinstance(seconds, (int, float)) else list(seconds)
    assert len(durations) == pieces
    rng = np.random.default_rng([seed, len(split)])
    corrupt = corrupt or {}
    samples, out = [], ShardSet(root=root, split=split, keys=[])
    for p, dur in enumerate(durations):
        piece = _piece_slug(p, split)
        pcm = _synthetic_pcm(rng, int(round(dur * SAMPLE_RATE)))
        for seg, (start, n) in enumerate(_segments(len(pcm), int(round(segment_seconds * SAMPLE_RATE)))):
            key = f"{piece}-s{seg:03d}"
            x = pcm[start:start + n]
            meta = {"key": key, "piece": piece, "segment": seg, "start": start, "samples": n,
                    "seconds": n / SAMPLE_RATE, "source": f"{piece}.wav", "orig_rate": SAMPLE_RATE,
                    "orig_channels": 1, "split": split}
            payload, js = _corrupt(_flac_bytes(x), json.dumps(meta).encode(), corrupt.get(key))
            samples.append({"key": key, "payload": payload, "json": js, "length": n, "seconds": n / SAMPLE_RATE})
            out.keys.append(key)
            out.data[key] = x
    unknown = set(corrupt) - set(out.keys)
    assert not unknown, f"corrupt names unknown keys {unknown}"
    entries = _write_split(root, split, samples, per_shard, "flac")
    out.shards = [e["name"] for e in entries]
    out.manifest = _write_manifest(root, split, entries, {
        "format": "largewave-shards", "version": 1, "kind": "audio",
        "sample_rate": SAMPLE_RATE, "token_rate": float(SAMPLE_RATE)})
    return out


def make_code_shards(root: Union[str, Path], pieces: int = 3, seconds: Union[float, Sequence[float]] = 2.0,
                     segment_seconds: float = 1.0, per_shard: int = 2, split: str = "train",
                     level: int = 1, hop: int = 8, K: int = 64, token_rate: float = 2000.0,
                     fingerprint: str = "0123456789abcdef", corrupt: Optional[dict[str, str]] = None,
                     seed: int = 0) -> ShardSet:
    """Write a code shard set (level ``level``, codes at ``token_rate`` Hz with vocabulary ``K``):
    same layout and keys as an audio set, ``{key}.codes.npy`` in the smallest unsigned dtype."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    durations = [seconds] * pieces if isinstance(seconds, (int, float)) else list(seconds)
    assert len(durations) == pieces
    dtype = np.uint8 if K <= 256 else (np.uint16 if K <= 65536 else np.uint32)
    rng = np.random.default_rng([seed, len(split), 7])
    corrupt = corrupt or {}
    samples, out = [], ShardSet(root=root, split=split, keys=[])
    per_second = token_rate
    for p, dur in enumerate(durations):
        piece = _piece_slug(p, split)
        codes = rng.integers(0, K, int(round(dur * per_second))).astype(dtype)
        for seg, (start, n) in enumerate(_segments(len(codes), int(round(segment_seconds * per_second)))):
            key = f"{piece}-s{seg:03d}"
            x = codes[start:start + n]
            meta = {"key": key, "piece": piece, "segment": seg, "start": int(start * SAMPLE_RATE / token_rate),
                    "samples": int(n * SAMPLE_RATE / token_rate), "seconds": n / token_rate,
                    "source": f"{piece}.wav", "orig_rate": SAMPLE_RATE, "orig_channels": 1, "split": split,
                    "level": level, "hop": hop, "codes": K, "dtype": np.dtype(dtype).name,
                    "fingerprint": fingerprint, "source_shard": ""}
            payload, js = _corrupt(_npy_bytes(x), json.dumps(meta).encode(), corrupt.get(key))
            samples.append({"key": key, "payload": payload, "json": js, "length": n, "seconds": n / token_rate})
            out.keys.append(key)
            out.data[key] = x
    entries = _write_split(root, split, samples, per_shard, "codes.npy")
    out.shards = [e["name"] for e in entries]
    out.manifest = _write_manifest(root, split, entries, {
        "format": "largewave-shards", "version": 1, "kind": "codes",
        "sample_rate": SAMPLE_RATE, "token_rate": float(token_rate),
        "level": level, "hop": hop, "codes": K, "dtype": np.dtype(dtype).name, "fingerprint": fingerprint})
    return out
