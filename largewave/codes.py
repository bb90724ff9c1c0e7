"""Code precompute: a level's frozen encoder + quantiser over every shard of the level below.

    precompute_codes(cfg, "level1")                         # all shards, this process
    precompute_codes(cfg, "level1", task_index=3, task_count=8)   # array task 3 of 8

Reads the level's consolidated export (no DeepSpeed), and writes a code set with the same shard
names, the same keys in the same order: ``{key}.codes.npy`` (the smallest unsigned dtype that
holds K) + ``{key}.json`` (the source json plus level, hop, K, dtype, fingerprint, source shard).

Long segments are encoded in overlapping chunks that give exactly the codes of a whole-sequence
encoding: the encoder has no normalisation over time, so a code frame depends only on the input
within ``encoder.context`` tokens of its own hop; chunks are extended by that context (rounded up
to the hop) on both sides and only their interior frames are kept. Encoding runs in fp32 with
TF32 off, so GPU and CPU agree.

Restartable and parallel: task r of N takes every N-th shard; a finished shard is a renamed tar
plus a small ``.{name}.done.json`` receipt with the fingerprint, so a rerun skips it (and redoes
it if the fingerprint changed); whichever task finds every receipt present writes the manifest,
last and atomically. A code set made by another encoder is invalidated first (its manifest
removed) so a half-rebuilt set never passes for complete.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from largewave.config import StackConfig, _level_key
from largewave.data.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_file, write_manifest

CHUNK_FRAMES = 2048  # code frames per encoder chunk (before context)
BATCH_CHUNKS = 16  # equal-length chunks encoded together


class CodesError(RuntimeError):
    pass


def code_dtype(k: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if k - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _set_fp32_exact() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@torch.no_grad()
def encode_sequence(model, tokens: np.ndarray | torch.Tensor, chunk_frames: int = CHUNK_FRAMES,
                    batch_chunks: int = BATCH_CHUNKS, device: str | torch.device = "cpu") -> np.ndarray:
    """Codes of one whole token sequence, computed in overlapping chunks.

    Args:
        model: an ADA level (``encoder``, ``quantiser``, ``encode``).
        tokens: int[T] token stream; its last ``T % hop`` tokens make no full frame and are dropped.
    Returns:
        int64[T // hop] codes, identical to ``model.encode`` of the whole sequence.
    """
    hop = model.hop
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    frames = t.shape[0] // hop
    if frames == 0:
        return np.zeros(0, dtype=np.int64)
    t = t[: frames * hop]
    ctx = math.ceil(model.encoder.context / hop) * hop  # context in tokens, hop-aligned
    windows = []  # (frame0, frame1, token0, token1)
    for f0 in range(0, frames, chunk_frames):
        f1 = min(frames, f0 + chunk_frames)
        windows.append((f0, f1, max(0, f0 * hop - ctx), min(frames * hop, f1 * hop + ctx)))
    out = np.empty(frames, dtype=np.int64)
    by_len: dict[int, list[tuple[int, int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[3] - w[2], []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_chunks):
            part = group[i:i + batch_chunks]
            x = torch.stack([t[w[2]:w[3]] for w in part]).to(device)
            codes = model.encode(x).cpu().numpy()
            for (f0, f1, s0, _), c in zip(part, codes):
                first = (f0 * hop - s0) // hop
                out[f0:f1] = c[first:first + (f1 - f0)]
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _receipt(out: Path, name: str) -> Path:
    return out / f".{name}.done.json"


@dataclass
class PrecomputeResult:
    level: str
    out: str
    fingerprint: str
    shards_done: int
    shards_skipped: int
    seconds_of_audio: float
    wall_s: float
    manifest_written: bool

    def __str__(self) -> str:
        rate = self.seconds_of_audio / 3600 / max(self.wall_s / 60, 1e-9)
        return (f"{self.level} codes → {self.out}: {self.shards_done} shard(s) encoded, {self.shards_skipped} "
                f"already done, {self.seconds_of_audio / 3600:.2f} h of audio in {self.wall_s:.1f} s "
                f"({rate:.2f} h of audio per minute){'; manifest written' if self.manifest_written else ''}")


def precompute_codes(cfg: StackConfig, level: str, task_index: int = 0, task_count: int = 1,
                     device: Optional[str] = None, progress: bool = True,
                     export: Optional[str | os.PathLike] = None) -> PrecomputeResult:
    """Encode the input shard set of ``level`` into its code set (this task's share of shards)."""
    from largewave import stack
    from largewave.data.loader import ShardSamples
    from largewave.engine.export import load_export, read_export

    level = _level_key(level)
    if not (0 <= task_index < task_count):
        raise CodesError(f"task {task_index} of {task_count}: index must be in 0..{task_count - 1}")
    lv = cfg.level(level)
    if not lv.has_codes:
        raise CodesError(f"{level} is a {lv.kind} level: it makes no discrete codes")
    export = Path(export) if export is not None else stack.export_path(cfg, level)
    if not export.exists():
        raise CodesError(f"{level} has no export at {export}: train it first (python launch/slurm.py --level "
                         f"{level.removeprefix('level')})")
    _set_fp32_exact()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = read_export(export)
    model, _ = load_export(export, device=dev)
    model.eval()
    src_root = stack.input_dir(cfg, level)
    src = read_manifest(src_root)
    input_fp = getattr(src, "fingerprint", None) if src.kind == "codes" else None
    fingerprint = stack.encoder_fingerprint(payload, input_fp)
    k = lv.quantiser.codes
    dtype = code_dtype(k)
    out = Path(stack.codes_dir(cfg, level))
    out.mkdir(parents=True, exist_ok=True)
    _invalidate_if_foreign(out, fingerprint)

    jobs = [(split, i, s) for split in src.splits for i, s in enumerate(src.splits[split])]
    mine = [j for n, j in enumerate(jobs) if n % task_count == task_index]
    extra = {"level": int(level.removeprefix("level")), "hop": lv.hop, "codes": k, "dtype": dtype.name,
             "fingerprint": fingerprint}
    t0 = time.time()
    done = skipped = 0
    seconds = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.seconds for _, _, s in mine), unit="s", unit_scale=True,
                   desc=f"{level} codes [{task_index + 1}/{task_count}]", dynamic_ncols=True)
    readers: dict[str, ShardSamples] = {}
    for split, si, shard in mine:
        receipt = _receipt(out, shard.name)
        if receipt.exists() and (out / shard.name).exists():
            try:
                if json.loads(receipt.read_text()).get("fingerprint") == fingerprint:
                    skipped += 1
                    if bar:
                        bar.update(shard.seconds)
                    continue
            except json.JSONDecodeError:
                pass  # a receipt cut mid-write: redo the shard
        reader = readers.get(split) or readers.setdefault(split, ShardSamples(src_root, split))
        first = sum(s.samples for s in src.splits[split][:si])
        tmp = out / f".{shard.name}.{os.getpid()}.tmp"
        keys, lengths = [], []
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j, key in enumerate(shard.keys):
                i = first + j
                length = int(reader.lengths[i])
                tokens = reader.crops(i, [0], length, mu=cfg.audio.mu)[0]
                codes = encode_sequence(model, tokens, device=dev).astype(dtype)
                meta = json.loads(reader.members(i, ("json",))["json"])
                meta.update(extra, key=key, length=int(len(codes)), source_shard=shard.name)
                for name, data in ((f"{key}.codes.npy", _npy_bytes(codes)),
                                   (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                keys.append(key)
                lengths.append(int(len(codes)))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / shard.name)
        info = {"name": shard.name, "split": split, "sha256": sha256_file(out / shard.name),
                "bytes": (out / shard.name).stat().st_size, "samples": len(keys), "keys": keys,
                "lengths": lengths, "seconds": shard.seconds, "fingerprint": fingerprint}
        rtmp = receipt.with_name(receipt.name + f".{os.getpid()}.tmp")
        rtmp.write_text(json.dumps(info))
        os.replace(rtmp, receipt)
        done += 1
        seconds += shard.seconds
        if bar:
            bar.update(shard.seconds)
    if bar:
        bar.close()
    written = _write_manifest_if_complete(out, src, fingerprint, extra, lv.hop)
    return PrecomputeResult(level=level, out=str(out), fingerprint=fingerprint, shards_done=done,
                            shards_skipped=skipped, seconds_of_audio=seconds, wall_s=time.time() - t0,
                            manifest_written=written)


def _invalidate_if_foreign(out: Path, fingerprint: str) -> None:
    mp = out / MANIFEST_NAME
    if not mp.exists():
        return
    try:
        have = json.loads(mp.read_text()).get("fingerprint")
    except json.JSONDecodeError:
        have = None
    if have != fingerprint:
        mp.unlink(missing_ok=True)  # the set is now incomplete until every shard is redone


def _write_manifest_if_complete(out: Path, src, fingerprint: str, extra: dict, hop: int) -> bool:
    splits: dict[str, list[dict]] = {}
    for split, shards in src.splits.items():
        splits[split] = []
        for s in shards:
            r = _receipt(out, s.name)
            if not r.exists() or not (out / s.name).exists():
                return False
            try:
                info = json.loads(r.read_text())
            except json.JSONDecodeError:
                return False
            if info.get("fingerprint") != fingerprint or info.get("keys") != list(s.keys):
                return False
            splits[split].append({k: info[k] for k in ("name", "sha256", "bytes", "samples", "keys", "lengths",
                                                       "seconds")})
    write_manifest(out, {"kind": "codes", "sample_rate": src.sample_rate, "token_rate": src.token_rate / hop,
                         "splits": splits, "hours": dict(src.hours), **extra})
    return True


def code_set_ready(root: str) -> bool:
    try:
        read_manifest(root)
        return True
    except (ManifestError, OSError):
        return False
