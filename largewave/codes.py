"""Code precompute: a level's frozen encoder + quantiser over every shard of the level below.

    precompute_codes(cfg, "level1")                               # all shards, this process
    precompute_codes(cfg, "level1", task_index=3, task_count=8)   # array task 3 of 8
    largewave codes --stack demo --level 1          # the same from a shell

Reads the level's consolidated export (no DeepSpeed) and writes a code set with the same shard
names and the same keys in the same order: ``{key}.codes.npy`` (1-D, the smallest unsigned dtype
that holds K) + ``{key}.json`` (the source json plus ``level, hop, codes, dtype, fingerprint,
source_shard``), then ``manifest.json`` last.

Exact chunked encoding. The encoder has no normalisation over time and only zero padding at the
sequence edges, so code frame f depends only on the input tokens within ``encoder.context`` of
its own hop. A long segment is cut into windows of ``chunk_frames`` frames, each extended by that
context (rounded up to the hop) on both sides where the sequence allows; only each window's
interior frames are kept, and they equal the frames of a whole-sequence encoding. Equal-length
windows (of one segment or of several) are encoded together as one batch. Encoding runs in fp32
with TF32 off, so GPU and CPU agree.

Restartable and parallel. Task r of N takes every N-th shard of the source listing. A shard is
written to a temporary file and renamed, then a small ``.{name}.done.json`` receipt records its
checksum, keys, the source shard's checksum and the encoder fingerprint. A rerun skips a shard
whose receipt matches (and redoes it otherwise), so a precompute killed at any point and rerun
gives byte-identical shards to an uninterrupted one. Whichever task finds every receipt present
writes the manifest, atomically; a code set made by another encoder is invalidated first (its
manifest removed) so that a half-rebuilt set never passes for complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from largewave.config import StackConfig, _level_key
from largewave.data import storage
from largewave.data.shards import tar_member
from largewave.data.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_file, write_manifest
from largewave.stack import CodesError, CodesNotReady, FingerprintError  # noqa: F401  (re-exported)

CHUNK_FRAMES = 4096  # code frames per encoder window (before its context)
BATCH_CHUNKS = None  # equal-length windows per forward; None: as many as ACTIVATION_BYTES allows
# One activation tensor of a forward is kept under this many bytes. On CPU, below glibc's largest
# mmap threshold (32 MiB) the allocator reuses freed blocks; above it every forward maps fresh
# pages and the kernel spends as much time zeroing them as the convolutions take. On GPU the
# caching allocator has no such cost and larger batches fill the device.
ACTIVATION_BYTES = {"cpu": 24 << 20, "cuda": 1 << 30}
GROUP_TOKENS = 1 << 22  # source tokens of consecutive segments encoded together (bounds memory)
STALE_TMP_S = 6 * 3600  # a temporary shard file this old, from another host, is abandoned


def code_dtype(k: int) -> np.dtype:
    """The smallest unsigned numpy dtype that holds codes 0 … k−1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if k - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def set_fp32_exact() -> None:
    """fp32 matmuls and convolutions everywhere (no TF32), so codes do not depend on the device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _windows(frames: int, hop: int, ctx: int, chunk_frames: int) -> list[tuple[int, int, int, int]]:
    """(frame0, frame1, token0, token1) of each window: frames [frame0, frame1) are kept, tokens
    [token0, token1) are encoded (the frames' tokens plus up to ``ctx`` tokens each side)."""
    out = []
    for f0 in range(0, frames, chunk_frames):
        f1 = min(frames, f0 + chunk_frames)
        out.append((f0, f1, max(0, f0 * hop - ctx), min(frames * hop, f1 * hop + ctx)))
    return out


@torch.no_grad()
def encode_sequences(model, sequences: Sequence[np.ndarray | torch.Tensor], chunk_frames: int = CHUNK_FRAMES,
                     batch_chunks: Optional[int] = BATCH_CHUNKS,
                     device: Optional[str | torch.device] = None) -> list[np.ndarray]:
    """Codes of several whole token sequences, computed in overlapping windows batched together.

    Args:
        model: an ADA level in eval mode (``hop``, ``encoder.context``, ``encode``).
        sequences: each int[T_i], a token stream (mu-law classes or codes of the level below);
            the last ``T_i % hop`` tokens make no full frame and are dropped.
        chunk_frames: code frames each window contributes (memory ∝ batch_chunks × chunk_frames).
        batch_chunks: windows of equal length encoded in one forward (default: as many as keep
            one activation tensor under :data:`ACTIVATION_BYTES`).
        device: where to encode (default: the model's device).
    Returns:
        One int64[T_i // hop] array per sequence, identical to ``model.encode`` of that sequence
        whole.
    """
    if chunk_frames < 1 or (batch_chunks is not None and batch_chunks < 1):
        raise ValueError(f"chunk_frames={chunk_frames} and batch_chunks={batch_chunks} must be >= 1")
    hop = model.hop
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # floats per input token of the largest activation: the encoder's width, or the quantiser's
    # K (AMAE) / D (VQ) features per frame spread over the frame's hop tokens
    out = getattr(model.encoder, "out", None)
    width = max([m.out_channels for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d) and m is not out]
                + [getattr(model.quantiser, "input_dim", 1) / hop])
    budget = ACTIVATION_BYTES.get(device.type, ACTIVATION_BYTES["cuda"])
    ctx = math.ceil(model.encoder.context / hop) * hop  # context in tokens, hop-aligned
    tokens, outs = [], []
    by_len: dict[int, list[tuple[int, int, int, int, int]]] = {}  # length → (seq, f0, f1, s0, s1)
    for n, seq in enumerate(sequences):
        t = torch.as_tensor(np.asarray(seq) if not isinstance(seq, torch.Tensor) else seq).to(torch.long).reshape(-1)
        frames = t.shape[0] // hop
        tokens.append(t[: frames * hop])
        outs.append(np.empty(frames, dtype=np.int64))
        for w in _windows(frames, hop, ctx, chunk_frames):
            by_len.setdefault(w[3] - w[2], []).append((n, *w))
    for length in sorted(by_len):
        group = by_len[length]
        per = batch_chunks or max(1, int(budget // (4 * width * length)))
        for i in range(0, len(group), per):
            part = group[i:i + per]
            x = torch.stack([tokens[n][s0:s1] for n, _, _, s0, s1 in part]).to(device)
            codes = model.encode(x).cpu().numpy()
            for (n, f0, f1, s0, _), c in zip(part, codes):
                first = (f0 * hop - s0) // hop
                outs[n][f0:f1] = c[first:first + (f1 - f0)]
    return outs


def encode_sequence(model, tokens: np.ndarray | torch.Tensor, chunk_frames: int = CHUNK_FRAMES,
                    batch_chunks: Optional[int] = BATCH_CHUNKS,
                    device: Optional[str | torch.device] = None) -> np.ndarray:
    """Codes of one whole token sequence int[T] → int64[T // hop], computed in overlapping windows
    (see :func:`encode_sequences`); identical to ``model.encode`` of the whole sequence."""
    return encode_sequences(model, [tokens], chunk_frames, batch_chunks, device)[0]


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def receipt_name(name: str) -> str:
    """``.{name}.done.json``: written after shard ``name`` is complete (beside it, in the code set)."""
    return f".{name}.done.json"


def staging_dir(root: str) -> Path:
    """Where code shards bound for a remote set (``s3://``) are written before their upload:
    ``$LARGEWAVE_CACHE/staging/<hash of the root>``. Each shard is deleted once uploaded."""
    from largewave.cache import cache_dir

    return cache_dir() / "staging" / hashlib.sha1(root.encode()).hexdigest()[:16]


def _tmp_path(out: Path, name: str) -> Path:
    return out / f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def _remove_abandoned(out: Path, name: str) -> None:
    """Remove temporary files of shard ``name`` left by killed processes (same host: the pid is not
    alive; another host: older than :data:`STALE_TMP_S`)."""
    host = socket.gethostname()
    for p in out.glob(f".{name}.*.tmp"):
        parts = p.name[len(name) + 2:-len(".tmp")].rsplit(".", 1)
        try:
            if len(parts) == 2 and parts[0] == host:
                pid = int(parts[1])
                if pid != os.getpid():
                    try:
                        os.kill(pid, 0)
                        continue  # alive: another process of this host is writing it
                    except ProcessLookupError:
                        pass
                    except PermissionError:
                        continue
            elif time.time() - p.stat().st_mtime < STALE_TMP_S:
                continue
            p.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue


def _store_json(store, name: str) -> Optional[dict]:
    try:
        d = json.loads(store.read_bytes(name))
    except (storage.NotFound, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _receipt_ok(store, shard, fingerprint: str) -> Optional[dict]:
    """The receipt of a finished code shard for ``shard`` (a source ShardInfo) that this encoder
    made from the current source bytes, or None (then the shard is redone)."""
    info = _store_json(store, receipt_name(shard.name))
    if info is None:
        return None
    if (info.get("fingerprint") != fingerprint or info.get("source_sha256") != shard.sha256
            or info.get("keys") != list(shard.keys) or store.size(shard.name) != info.get("bytes")):
        return None
    return info


# --------------------------------------------------------------------------------------------
# Precompute
# --------------------------------------------------------------------------------------------


@dataclass
class PrecomputeResult:
    """What one task did (picklable: it is a submitit job's result)."""

    level: str
    out: str
    fingerprint: str
    task_index: int
    task_count: int
    shards_done: int
    shards_skipped: int
    seconds_of_audio: float  # audio duration this task encoded (skipped shards not counted)
    wall_s: float
    manifest_written: bool

    @property
    def hours_per_minute(self) -> float:
        """Hours of audio encoded per minute of wall time."""
        return self.seconds_of_audio / 3600 / max(self.wall_s / 60, 1e-9)

    def __str__(self) -> str:
        return (f"{self.level} codes → {self.out} [task {self.task_index + 1}/{self.task_count}]: "
                f"{self.shards_done} shard(s) encoded, {self.shards_skipped} already done, "
                f"{self.seconds_of_audio / 3600:.3f} h of audio in {self.wall_s:.1f} s "
                f"({self.hours_per_minute:.3f} h of audio per minute); fingerprint {self.fingerprint}"
                + ("; manifest written" if self.manifest_written else "; manifest not yet written "
                   "(other shards are still missing)"))


def _check_export(payload: dict, cfg: StackConfig, level: str, path: Path) -> None:
    """The export must be of ``level`` and have the model sections the config gives it."""
    if payload.get("level") != level:
        raise CodesError(f"{path} is an export of {payload.get('level')}, not {level}")
    mine = cfg.to_dict()["levels"][level]
    theirs = payload["config"]["levels"].get(level, {})
    for section in ("kind", "hop", "encoder", "quantiser"):
        if theirs.get(section) != mine[section]:
            raise CodesError(f"{path}: its {level}.{section} ({theirs.get(section)}) differs from the config's "
                             f"({mine[section]}); use the export of this config's run or fix the overrides")


def precompute_codes(cfg: StackConfig, level: str, task_index: int = 0, task_count: int = 1,
                     device: Optional[str] = None, progress: bool = True,
                     export: Optional[str | os.PathLike] = None, chunk_frames: int = CHUNK_FRAMES,
                     batch_chunks: Optional[int] = BATCH_CHUNKS, threads: Optional[int] = None,
                     log=print) -> PrecomputeResult:
    """Encode this task's share of the input shard set of ``level`` into its code set.

    Args:
        cfg: the stack config; the input is :func:`largewave.stack.input_dir`, the output
            :func:`largewave.stack.codes_dir`.
        level: ``"level1"``, ``"level2"``, … (or ``1``, ``"2"``); must be an ADA level.
        task_index, task_count: this task takes shards ``task_index, task_index + task_count, …``
            of the source listing (train, valid, test in manifest order).
        device: ``"cuda"``, ``"cpu"``, … (default: CUDA when present).
        progress: show a progress bar (audio seconds, with hours of audio per minute).
        export: the export to encode with (default: the level's run folder's ``export.pt``).
        threads: torch threads on CPU for this process (None: torch's default, every core; fewer
            when several tasks share a host, or when other work keeps the cores busy).
        log: where the summary line goes (``None``: nowhere).
    Raises:
        CodesError: no export, a level without codes, a source set that is incomplete or of the
            wrong kind, or a corrupt source sample (named).
        FingerprintError: the input codes (levels above 1) are not the level below's current codes.
    """
    from largewave import stack
    from largewave.data.loader import CorruptSample, ShardSamples
    from largewave.engine.export import load_export, read_export

    level = _level_key(level)
    if not (task_count >= 1 and 0 <= task_index < task_count):
        raise CodesError(f"task {task_index} of {task_count}: need task_count >= 1 and 0 <= index < task_count")
    lv = cfg.level(level)
    if not lv.has_codes:
        raise CodesError(f"{level} is a {lv.kind} level: it makes no discrete codes")
    export = Path(export) if export is not None else stack.export_path(cfg, level)
    if not export.exists():
        raise CodesError(f"{level} has no export at {export}: train it first ({stack.train_command(cfg, level)}), "
                         f"or pass --export PATH")
    below = cfg.below(level)
    if below is not None:
        stack.check_codes(cfg, level)  # the input codes must be the level below's current ones
    src_root = stack.input_dir(cfg, level)
    try:
        src = read_manifest(src_root)
    except ManifestError as e:
        hint = ("build the audio shards first (largewave shards build --stack "
                f"{cfg.stack})" if below is None else f"compute them first ({stack.codes_command(cfg, below)})")
        raise CodesError(f"{level} encodes {src_root}, which is not ready: {e}; {hint}") from None
    want_kind = "audio" if below is None else "codes"
    if src.kind != want_kind:
        raise CodesError(f"{src_root}: a {src.kind} set, but {level} encodes {want_kind}")
    if src.sample_rate != cfg.audio.sample_rate:
        raise CodesError(f"{src_root}: {src.sample_rate} Hz audio, the stack is at {cfg.audio.sample_rate} Hz")

    set_fp32_exact()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        from largewave.distributed import flush_denormals

        flush_denormals()  # as in training, so that codes here are the codes the trainer saw
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
    payload = read_export(export)
    _check_export(payload, cfg, level, export)
    model, _ = load_export(export, device=dev)
    model.eval()
    fingerprint = stack.encoder_fingerprint(payload, src.fingerprint if src.kind == "codes" else None)
    k = lv.quantiser.codes
    dtype = code_dtype(k)
    out_root = stack.codes_dir(cfg, level)
    store = storage.open_store(out_root)
    if not store.writable:
        raise CodesError(f"data.codes: {out_root} is a {storage.kind(out_root)} location, which is read-only; "
                         "write code sets to a local folder or an s3:// prefix")
    # a local set is written in place; a remote one through a local staging folder, shard by shard
    out = Path(store.folder) if isinstance(store, storage.LocalStore) else staging_dir(out_root)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _invalidate_if_foreign(store, fingerprint)
    except storage.StorageError as e:
        raise CodesError(f"cannot write the codes of {level} to {out_root}: {e}") from None

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
    try:
        for split, si, shard in mine:
            if _receipt_ok(store, shard, fingerprint) is not None:
                skipped += 1
                if bar:
                    bar.update(shard.seconds)
                continue
            reader = readers.get(split) or readers.setdefault(split, ShardSamples(src_root, split))
            first = sum(s.samples for s in src.splits[split][:si])
            _remove_abandoned(out, shard.name)
            tmp = _tmp_path(out, shard.name)
            keys, lengths = [], []
            try:
                with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for group in _groups(reader, range(first, first + shard.samples)):
                        try:
                            metas = [json.loads(reader.members(i, ("json",))["json"]) for i in group]
                            seqs = [reader.crops(i, [0], int(reader.lengths[i]), mu=cfg.audio.mu)[0] for i in group]
                        except (CorruptSample, ValueError) as e:
                            raise CodesError(f"{src_root}/{shard.name}: {e}; its codes cannot be computed "
                                             f"(rebuild the input set)") from None
                        for i, meta, codes in zip(group, metas, encode_sequences(model, seqs, chunk_frames,
                                                                                 batch_chunks, dev)):
                            key = reader.keys[i]
                            codes = codes.astype(dtype)
                            meta.update(extra, key=key, source_shard=shard.name)
                            for name, data in ((f"{key}.codes.npy", _npy_bytes(codes)),
                                               (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
                            keys.append(key)
                            lengths.append(int(len(codes)))
                            if bar:
                                bar.update(int(reader.lengths[i]) / src.token_rate)
                    tar.close()
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, out / shard.name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            info = {"name": shard.name, "split": split, "sha256": sha256_file(out / shard.name),
                    "bytes": (out / shard.name).stat().st_size, "samples": len(keys), "keys": keys,
                    "lengths": lengths, "seconds": shard.seconds, "fingerprint": fingerprint,
                    "source_sha256": shard.sha256}
            try:
                if not isinstance(store, storage.LocalStore):
                    store.put_file(shard.name, out / shard.name, sha256=info["sha256"])  # shard, then receipt
                    (out / shard.name).unlink()
                store.put_bytes(receipt_name(shard.name), json.dumps(info).encode())
            except storage.StorageError as e:
                raise CodesError(f"uploading {shard.name} of the {level} codes: {e}; finished shards are kept, "
                                 "run the same command again") from None
            done += 1
            seconds += shard.seconds
            if bar:
                bar.set_postfix_str(f"{seconds / 3600 / max((time.time() - t0) / 60, 1e-9):.3f} h audio/min")
    finally:
        if bar:
            bar.close()
    try:
        written = _write_manifest_if_complete(store, src, fingerprint, extra, lv.hop)
    except (storage.StorageError, ManifestError) as e:
        raise CodesError(f"writing the manifest of the {level} codes at {out_root}: {e}") from None
    result = PrecomputeResult(level=level, out=out_root, fingerprint=fingerprint, task_index=task_index,
                              task_count=task_count, shards_done=done, shards_skipped=skipped,
                              seconds_of_audio=seconds, wall_s=time.time() - t0, manifest_written=written)
    if log is not None:
        log(str(result))
    return result


def _groups(reader, indices: range) -> list[list[int]]:
    """Consecutive samples, at most :data:`GROUP_TOKENS` source tokens per group (one sample
    alone may exceed it), so that short segments share forward passes."""
    groups: list[list[int]] = []
    total = 0
    for i in indices:
        n = int(reader.lengths[i])
        if groups and total + n <= GROUP_TOKENS:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def _invalidate_if_foreign(store, fingerprint: str) -> None:
    """A finished set made by another encoder loses its manifest: it is incomplete until redone."""
    m = _store_json(store, MANIFEST_NAME)
    if m is not None and m.get("fingerprint") != fingerprint:
        store.delete(MANIFEST_NAME)


def _write_manifest_if_complete(store, src, fingerprint: str, extra: dict, hop: int) -> bool:
    """Write the manifest when every source shard has a matching receipt; True if written."""
    splits: dict[str, list[dict]] = {}
    for split, shards in src.splits.items():
        splits[split] = []
        for s in shards:
            info = _receipt_ok(store, s, fingerprint)
            if info is None:
                return False
            splits[split].append({k: info[k] for k in ("name", "sha256", "bytes", "samples", "keys", "lengths",
                                                       "seconds")})
    write_manifest(store.root, {"kind": "codes", "sample_rate": src.sample_rate, "token_rate": src.token_rate / hop,
                                "splits": splits, "hours": dict(src.hours), **extra})
    return True


def code_set_ready(root: str) -> bool:
    """Does ``root`` hold a complete (manifested) shard set?"""
    try:
        read_manifest(root)
        return True
    except (ManifestError, OSError):
        return False
