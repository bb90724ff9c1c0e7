"""Deterministic, exactly resumable crops of audio or code shards, batched for training.

    loader = TrainLoader("data/demo/audio", crop=4096, hop=8, crops_per_segment=4, batch_size=8,
                         seed=0, rank=rank, world_size=world, num_workers=2)
    loader.load_state_dict(client_state["data"])        # resume: O(1), nothing is replayed
    for batch in loader:                                 # endless: epoch after epoch
        step(batch.tokens)                               # LongTensor[B x T]
        client_state["data"] = loader.state_dict()       # counts batches handed out, not prefetched

How the batches are chosen
--------------------------
The manifest gives every sample's key and length, so the whole epoch is planned before a byte of
audio is read:

* A segment of length L holds ``L // crop`` crop-sized pieces; it enters the epoch as
  ``ceil((L // crop) / crops_per_segment)`` *units*. A unit is one decode of one segment that
  yields ``crops_per_segment`` random crops (so decoding and reading cost is shared by several
  crops); over an epoch a segment thus yields about one crop per ``crop`` tokens of its length.
* The units of the split are permuted by a generator seeded from ``(seed, epoch)``. The slots of
  that permutation are dealt out in blocks: batch ``i`` of rank ``r`` takes the
  ``ceil(batch_size / crops_per_segment)`` units in slots ``[(i·world + r)·u, (i·world + r + 1)·u)``.
  Ranks thus see disjoint units, and every rank gets exactly
  ``batches_per_epoch = units // (world · u)`` batches (at least one: a split smaller than one
  global batch is cycled), whatever the shards look like — there may be fewer shards than ranks
  × workers. The few units left over at the end of a permutation are dropped for that epoch only.
* Crop offsets are multiples of ``hop`` drawn by a generator seeded from ``(seed, epoch, key,
  unit)``, uniformly over ``[0, L − crop]``.
* Segments shorter than one crop are **skipped** (left out of the plan, listed in ``short_keys``):
  the model losses take no padding mask, and the shard builder keeps segments long (≥ 60 s) so
  only the odd short piece is affected.

A batch is therefore a pure function of ``(seed, epoch, rank, world_size)`` and its index. Loader
workers each build whole batches by index (torch's DataLoader hands batch ``k`` to one worker and
returns them in order), so the output never depends on ``num_workers``, and resuming at batch
``k`` means starting the index sampler at ``k`` — O(1) however far into training. The only
per-epoch work is one permutation of the units (milliseconds for a million units).

Corrupt samples
---------------
Everything read is decoded by explicit decoders only — FLAC via libsndfile, ``.json`` via
``json``, ``.npy`` via ``numpy.load(allow_pickle=False)`` — never pickle. A unit whose sample
fails (undecodable or truncated FLAC, bad JSON, bad or pickled npy, missing member, length or
rate that disagrees with the manifest, damaged tar) is replaced by the next unit in the
plan (slot + 1, + 2, …) whose sample decodes. Which units fail depends only on the bytes on disk,
so the substitute is the same in every run, with any worker count, before and after a resume; no
rank gets fewer crops. Substitutions are reported with the batch (``Batch.skipped``) and summed
by the loader (``skipped``, in ``state_dict`` and ``stats()``) as batches are consumed. A shard
that the manifest lists but that does not exist at all is an error, not a corrupt sample: the
set is incomplete or the path is wrong, and silently training on part of it would hide that.

Why the indexed reader and not WebDataset's streaming pipeline
-------------------------------------------------------------
Exact resume at batch k, batches independent of the worker count, and a split by *sample* (not
by shard) all need random access to a sample by key. A streaming pipeline can only reach sample n
of a shard by reading the n − 1 before it, its shuffle buffer cannot be checkpointed, and
splitting by node/worker is by whole shards, which unbalances ranks when shards are few. So this
module follows WebDataset's indexed design (``wids``): a shard is indexed once per process (tar
member → byte offset, grouped into samples with WebDataset's own key/extension rule) and members
are read with ``pread``. Shards that live behind a URL (``s3://``, http(s), ``pipe:``, or anything
else ``webdataset.gopen`` opens; see :mod:`largewave.data.storage`) are fetched once into a local
cache, checked against the manifest's checksum, and then read the same way, as ``wids`` does. (``wids`` is a separate package since ``webdataset``
1.0; the index needed here is a few lines over the standard ``tarfile``, and unlike ``wids`` it
treats a truncated or garbled shard as corrupt samples rather than failing an assertion.)
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.utils.data
from webdataset.tariterators import base_plus_ext

from largewave.audio import mulaw_encode
from largewave.data import storage
from largewave.data.manifest import read_manifest

log = logging.getLogger(__name__)

STATE_FORMAT = "largewave-loader"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch of crops.

    Attributes:
        tokens: ``LongTensor[B x T]`` — mu-law classes (audio sets) or codes (code sets).
        keys: the ``B`` sample keys the crops come from.
        offsets: ``LongTensor[B]`` — start of each crop in its segment, in tokens.
        epoch: epoch of this batch (``0`` for evaluation).
        index: index of the batch within its epoch (or evaluation pass).
        mask: ``BoolTensor[B]`` for evaluation batches — ``False`` marks padding (and corrupt
            items); ``None`` for training batches, where every row is real.
        skipped: keys of corrupt samples that were replaced (training) or masked (evaluation)
            while this batch was built.
    """

    tokens: torch.Tensor
    keys: list[str]
    offsets: torch.Tensor
    epoch: int
    index: int
    mask: Optional[torch.Tensor] = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        """A copy with the tensors on ``device`` (keys and positions unchanged)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(mv(self.tokens), list(self.keys), mv(self.offsets), self.epoch, self.index,
                     mv(self.mask), list(self.skipped))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread when ``pin_memory=True``."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.tokens), self.keys, pin(self.offsets), self.epoch, self.index,
                     pin(self.mask), self.skipped)


class CorruptSample(Exception):
    """A sample that cannot be decoded; ``str(e)`` says why."""


# --------------------------------------------------------------------------------------------
# Shard access: tar index + pread, remote shards cached locally
# --------------------------------------------------------------------------------------------


def _shard_location(template: str, name: str) -> str:
    """``template`` with ``{name}`` replaced by the shard's file name, or ``template/name``."""
    if "{name}" in template:
        return template.replace("{name}", name)
    return template.rstrip("/") + "/" + name


def default_cache_dir() -> Path:
    """Where shards behind URLs are cached: ``$LARGEWAVE_SHARD_CACHE``, else ``shards/`` in the
    cache folder (:func:`largewave.cache.cache_dir`). On a cluster, a node-local disk is best."""
    from largewave.cache import cache_dir

    env = os.environ.get("LARGEWAVE_SHARD_CACHE")
    return Path(env) if env else cache_dir() / "shards"


class ShardFetchError(Exception):
    """A remote shard that cannot be fetched, or whose bytes disagree with the manifest on every try.
    Not a corrupt sample: it stops the run (never caught as one, so it is no RuntimeError/OSError)."""


def original_message(e: BaseException) -> str:
    """The message of ``e`` without the traceback text that a DataLoader worker's re-raise wraps it
    in ("Caught X in DataLoader worker process 0. Original Traceback …: X: <message>")."""
    text = str(e)
    if "Original Traceback" in text:
        marker = f"{type(e).__name__}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text


def fetch_shard(url: str, name: str, cache_dir: Path, sha256: Optional[str] = None, retries: int = 3,
                size: Optional[int] = None) -> str:
    """Copy a remote shard (``s3://``, http(s), ``pipe:``, or any URL ``webdataset.gopen`` opens)
    into ``cache_dir`` once and return the local path.

    The cache entry is named by the URL and the manifest's checksum, so a rebuilt set never reads
    a stale copy. Concurrent workers and ranks on one machine wait on a file lock instead of
    fetching the same shard twice; the copy is checked against the manifest's sha256 (and size)
    as it streams and renamed into place only when it matches, so a cached file is always the
    shard the manifest describes. A cached file whose size no longer matches is fetched again. A
    download that is truncated or corrupt is fetched again, up to ``retries`` times, each failure
    logged.

    Raises:
        ShardFetchError: the shard could not be fetched, or its bytes disagreed with the manifest
            on every try (the stored object is damaged: re-upload or rebuild the set). Training on
            other bytes than the manifest's would break exact resume, so it never does.
    """
    digest = hashlib.sha1(f"{url}\n{sha256}".encode()).hexdigest()[:16]
    dest = Path(cache_dir) / digest / name

    def cached() -> bool:
        if not dest.exists():
            return False
        if size is not None and dest.stat().st_size != size:
            log.warning("%s: the cached copy %s has %d bytes, the manifest says %d; fetching it again",
                        url, dest, dest.stat().st_size, size)
            dest.unlink(missing_ok=True)
            return False
        return True

    if cached():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if cached():
            return str(dest)
        tmp = dest.with_name(f"{name}.{os.getpid()}.tmp")
        problems: list[str] = []
        for attempt in range(retries):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                n, digest_got = storage.download(url, tmp)
            except storage.NotFound as e:
                tmp.unlink(missing_ok=True)
                raise ShardFetchError(f"shard {name} is listed in the manifest but {e}: the set is incomplete "
                                      "or was moved") from None
            except Exception as e:  # network and pipe failures: retry, then report
                problems.append(f"try {attempt + 1}: {type(e).__name__}: {e}")
                log.warning("%s: fetch failed (%s); %s", url, e,
                            "trying again" if attempt + 1 < retries else "giving up")
                tmp.unlink(missing_ok=True)
                continue
            bad = []
            if size is not None and n != size:
                bad.append(f"{n} bytes, the manifest says {size}")
            if sha256 is not None and digest_got != sha256:
                bad.append(f"sha256 {digest_got[:16]}…, the manifest says {sha256[:16]}…")
            if not bad:
                os.replace(tmp, dest)
                return str(dest)
            tmp.unlink(missing_ok=True)
            problems.append(f"try {attempt + 1}: " + "; ".join(bad))
            log.warning("%s: downloaded copy is damaged (%s); %s", url, "; ".join(bad),
                        "fetching it again" if attempt + 1 < retries else "giving up")
        raise ShardFetchError(f"shard {url} could not be fetched intact in {retries} tries ("
                              + " | ".join(problems) + "). If every try disagrees with the manifest the "
                              "stored object is damaged: copy the set there again (largewave shards copy) or rebuild it")


def index_tar(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Index an uncompressed tar: ``{key: {extension: (data offset, size)}}``, keys and
    extensions split by WebDataset's rule (at the first dot of the basename).

    A truncated or garbled tar keeps whatever was readable before the damage; samples past it are
    absent from the index and so read as corrupt."""
    size = os.path.getsize(path)
    index: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    break  # the member's data runs past the end of the file
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                index.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        log.warning("%s: damaged tar (%s); %d samples readable before the damage", path, e, len(index))
    return index


class ShardSamples:
    """Random access to the samples of one split of a shard set.

    Holds only picklable plain data; file descriptors and tar indexes are opened lazily in each
    process (the main one or a DataLoader worker), so a copy in a worker never shares a file
    position with another.
    """

    _MAX_OPEN = 64  # open shard files per process

    def __init__(self, root: str, split: str, cache_dir: Optional[str | os.PathLike] = None,
                 shard_url: Optional[str] = None):
        manifest = read_manifest(root)
        self.root = str(root)
        self.split = split
        self.kind: str = manifest.kind
        self.sample_rate = int(manifest.sample_rate)
        self.token_rate = float(manifest.token_rate)
        self.vocab: Optional[int] = getattr(manifest, "codes", None) if self.kind == "codes" else None
        self.fingerprint: Optional[str] = getattr(manifest, "fingerprint", None)
        if split not in manifest.splits:
            raise ValueError(f"{root}: no split {split!r} in manifest.json (has {', '.join(manifest.splits)})")
        shards = manifest.splits[split]
        self.urls: list[str] = [s.url if shard_url is None else _shard_location(shard_url, s.name) for s in shards]
        self.names: list[str] = [s.name for s in shards]
        self.sha256: list[Optional[str]] = [s.sha256 for s in shards]
        self.sizes: list[Optional[int]] = [s.bytes for s in shards]
        self.keys: list[str] = [k for s in shards for k in s.keys]
        self.lengths = np.array([n for s in shards for n in s.lengths], dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), [len(s.keys) for s in shards])
        if len(self.lengths) != len(self.keys):
            raise ValueError(f"{root}: manifest.json split {split!r} lists {len(self.keys)} keys "
                             f"but {len(self.lengths)} lengths")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._pid = -1
        self._reset()

    def __len__(self) -> int:
        return len(self.keys)

    # -- per-process state (not pickled) ---------------------------------------------------

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}  # shard → fd, insertion order = LRU order
        self._indexes: dict[int, tuple[str, dict]] = {}  # shard → (local path, tar index)
        self._tables: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_fds", "_indexes", "_tables"):
            state[k] = {}
        state["_pid"] = -1
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __del__(self):
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _shard(self, s: int) -> tuple[int, dict]:
        if self._pid != os.getpid():
            self._reset()  # a forked worker: open its own descriptors
        if s not in self._indexes:
            url = self.urls[s]
            try:
                path = (storage.local_path(url) if storage.kind(url) == "local"
                        else fetch_shard(url, self.names[s], self.cache_dir, self.sha256[s],
                                         size=self.sizes[s]))
                self._indexes[s] = (path, index_tar(path))
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {url} listed in {self.root}/manifest.json does not exist") from None
        path, index = self._indexes[s]
        fd = self._fds.pop(s, None)
        if fd is None:
            if len(self._fds) >= self._MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(path, os.O_RDONLY)
        self._fds[s] = fd  # most recently used last
        return fd, index

    def members(self, i: int, exts: Sequence[str]) -> dict[str, bytes]:
        """The raw bytes of sample ``i``'s members ``exts``; :class:`CorruptSample` if any is missing."""
        key = self.keys[i]
        fd, index = self._shard(int(self.shard_of[i]))
        entry = index.get(key)
        if entry is None:
            raise CorruptSample(f"{key}: not in shard {self.urls[self.shard_of[i]]}")
        out = {}
        for ext in exts:
            if ext not in entry:
                raise CorruptSample(f"{key}: no .{ext} member (has {', '.join(sorted(entry)) or 'none'})")
            offset, size = entry[ext]
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise CorruptSample(f"{key}.{ext}: short read ({len(data)} of {size} bytes)")
            out[ext] = data
        return out

    # -- decoding ------------------------------------------------------------------------------

    def _mulaw_table(self, mu: int) -> np.ndarray:
        """int16 → class lookup (65,536 entries): the same classes as ``mulaw_encode`` on the
        PCM, at a fraction of the cost of evaluating the logarithm per sample."""
        table = self._tables.get(mu)
        if table is None:
            table = mulaw_encode(np.arange(-32768, 32768, dtype=np.int16), mu)
            self._tables[mu] = table
        return table

    def _meta(self, i: int, raw: bytes) -> dict:
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptSample(f"{self.keys[i]}.json: not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise CorruptSample(f"{self.keys[i]}.json: expected an object, got {type(meta).__name__}")
        if meta.get("key", self.keys[i]) != self.keys[i]:
            raise CorruptSample(f"{self.keys[i]}.json: names key {meta.get('key')!r}")
        return meta

    def crops(self, i: int, offsets: Sequence[int], crop: int, mu: int = 255) -> np.ndarray:
        """Decode crops of sample ``i``.

        Args:
            offsets: start of each crop, in tokens.
            crop: crop length in tokens.
            mu: mu-law parameter (audio sets).

        Returns:
            ``int64[len(offsets) x crop]`` — mu-law classes (audio) or codes.

        Raises:
            CorruptSample: anything about the sample is unreadable or disagrees with the manifest.
        """
        key, length = self.keys[i], int(self.lengths[i])
        out = np.empty((len(offsets), crop), dtype=np.int64)
        if self.kind == "audio":
            m = self.members(i, ("json", "flac"))
            self._meta(i, m["json"])
            table = self._mulaw_table(mu)
            try:
                with sf.SoundFile(io.BytesIO(m["flac"])) as f:
                    if f.samplerate != self.sample_rate or f.channels != 1 or f.frames != length:
                        raise CorruptSample(
                            f"{key}.flac: {f.samplerate} Hz, {f.channels} ch, {f.frames} frames; the manifest "
                            f"says {self.sample_rate} Hz mono, {length} frames")
                    for j, off in enumerate(offsets):
                        # FLAC seeks to the frame holding `off`: only the crop is decoded.
                        f.seek(int(off))
                        pcm = f.read(crop, dtype="int16")
                        if len(pcm) != crop:
                            raise CorruptSample(f"{key}.flac: {len(pcm)} frames at {off}, expected {crop}")
                        out[j] = table[pcm.view(np.uint16) ^ 0x8000]  # int16 → 0..65535
            except (CorruptSample, ShardFetchError):
                raise
            except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
                raise CorruptSample(f"{key}.flac: {type(e).__name__}: {e}") from None
        else:
            m = self.members(i, ("json", "codes.npy"))
            self._meta(i, m["json"])
            try:
                codes = np.load(io.BytesIO(m["codes.npy"]), allow_pickle=False)
            except Exception as e:  # numpy raises ValueError/OSError/EOFError/… on garbage
                raise CorruptSample(f"{key}.codes.npy: {type(e).__name__}: {e}") from None
            if codes.ndim != 1 or codes.dtype.kind not in "ui" or len(codes) != length:
                raise CorruptSample(f"{key}.codes.npy: {codes.dtype} {codes.shape}; the manifest says "
                                    f"{length} integer codes")
            for j, off in enumerate(offsets):
                out[j] = codes[int(off):int(off) + crop]
            if self.vocab is not None and len(offsets) and (out.min() < 0 or out.max() >= self.vocab):
                raise CorruptSample(f"{key}.codes.npy: codes outside 0..{self.vocab - 1}")
        return out


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


_PERM_TAG = 0x5EED  # separates the permutation stream from the crop-offset streams


def _key_hash(key: str) -> tuple[int, int]:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h & 0xFFFFFFFF, h >> 32


class _TrainPlan(torch.utils.data.Dataset):
    """Batch ``gid = epoch · batches_per_epoch + index`` → :class:`Batch`; plain data + a
    :class:`ShardSamples`, so it can be copied into DataLoader workers."""

    def __init__(self, samples: ShardSamples, *, crop: int, hop: int, crops_per_segment: int,
                 batch_size: int, seed: int, rank: int, world_size: int, mu: int):
        self.samples = samples
        self.crop, self.hop, self.mu = crop, hop, mu
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.cps = min(crops_per_segment, batch_size)
        self.units_per_batch = math.ceil(batch_size / self.cps)
        n_crops = samples.lengths // crop
        eligible = np.flatnonzero(n_crops >= 1)
        groups = -(-n_crops[eligible] // self.cps)  # ceil
        self.unit_sample = np.repeat(eligible, groups)
        # unit number within its sample: 0, 1, … groups−1
        starts = np.repeat(np.cumsum(groups) - groups, groups)
        self.unit_group = np.arange(len(self.unit_sample)) - starts
        self.n_units = len(self.unit_sample)
        self.batches_per_epoch = max(1, self.n_units // (world_size * self.units_per_batch))
        self.short_keys = [samples.keys[i] for i in np.flatnonzero(n_crops < 1)]
        self.key_hashes = [_key_hash(k) for k in samples.keys]
        self._perm_cache: dict[int, np.ndarray] = {}
        self._fingerprint: Optional[str] = None

    def fingerprint(self) -> str:
        """Identifies the plan's inputs (keys, lengths, crop geometry): a resume onto another
        shard set or crop layout is not exact."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            h.update(json.dumps([self.samples.kind, self.crop, self.hop, self.cps]).encode())
            h.update("\n".join(self.samples.keys).encode())
            h.update(self.samples.lengths.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, _PERM_TAG])))
            perm = rng.permutation(self.n_units)
            self._perm_cache = {epoch: perm}  # one epoch at a time; rebuilding takes milliseconds
        return perm

    def offsets(self, epoch: int, sample: int, group: int, n: int, salt: int = 0) -> np.ndarray:
        """``n`` crop offsets (multiples of hop) for unit ``group`` of ``sample`` in ``epoch``."""
        lo, hi = self.key_hashes[sample]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, epoch, lo, hi, group, salt])))
        steps = (int(self.samples.lengths[sample]) - self.crop) // self.hop
        return rng.integers(0, steps + 1, size=n, dtype=np.int64) * self.hop

    def __getitem__(self, gid: int) -> Batch:
        epoch, index = divmod(int(gid), self.batches_per_epoch)
        return self.batch(epoch, index)

    def batch(self, epoch: int, index: int) -> Batch:
        perm = self.permutation(epoch)
        first = (index * self.world_size + self.rank) * self.units_per_batch
        tokens, keys, offsets, skipped = [], [], [], []
        for u in range(self.units_per_batch):
            n = min(self.cps, self.batch_size - u * self.cps)
            slot = first + u
            failed: list[str] = []
            for attempt in range(self.n_units):
                # Substitutes are the next slots of the same permutation: a function of the data
                # alone, so every run (any worker count, resumed or not) picks the same one.
                unit = perm[(slot + attempt) % self.n_units]
                sample, group = int(self.unit_sample[unit]), int(self.unit_group[unit])
                offs = self.offsets(epoch, sample, group, n, salt=0 if attempt == 0 else slot + 1)
                try:
                    crops = self.samples.crops(sample, offs, self.crop, self.mu)
                except CorruptSample as e:
                    key = self.samples.keys[sample]
                    if key not in failed:  # one count per corrupt sample replaced in this slot
                        failed.append(key)
                    _warn_once(key, str(e))
                    continue
                tokens.append(crops)
                keys += [self.samples.keys[sample]] * n
                offsets.append(offs)
                skipped += failed
                break
            else:
                raise RuntimeError(f"{self.samples.root}: no sample of split {self.samples.split!r} "
                                   f"can be decoded (e.g. {', '.join(failed[:3])}; see the warnings above)")
        return Batch(torch.from_numpy(np.concatenate(tokens)), keys,
                     torch.from_numpy(np.concatenate(offsets)), epoch, index, None, skipped)


class _EvalPlan(torch.utils.data.Dataset):
    """Every non-overlapping crop of every segment (offsets 0, crop, 2·crop, …), in manifest
    order; rank r takes a contiguous block of ``ceil(items / world)`` of them, padded to whole
    batches with masked repeats, so every rank has the same number of batches."""

    def __init__(self, samples: ShardSamples, *, crop: int, batch_size: int, rank: int, world_size: int,
                 mu: int, max_batches: Optional[int]):
        self.samples, self.crop, self.batch_size, self.mu = samples, crop, batch_size, mu
        self.rank, self.world_size = rank, world_size
        n_crops = samples.lengths // crop
        self.item_sample = np.repeat(np.arange(len(n_crops)), n_crops)
        starts = np.repeat(np.cumsum(n_crops) - n_crops, n_crops)
        self.item_offset = (np.arange(len(self.item_sample)) - starts) * crop
        self.n_items = len(self.item_sample)
        self.short_keys = [samples.keys[i] for i in np.flatnonzero(n_crops < 1)]
        self.per_rank = -(-self.n_items // world_size)
        self.batches = max(1, -(-self.per_rank // batch_size))
        self.subsampled = max_batches is not None and max_batches < self.batches
        if self.subsampled:
            # A shorter pass spread evenly over the whole split, not its first few segments.
            self.batches = max_batches
        self.slots = self.batches * batch_size  # per rank

    def item(self, slot: int) -> tuple[int, bool]:
        """Item for this rank's ``slot`` and whether it is real (False: padding)."""
        if self.subsampled:
            total = self.slots * self.world_size
            return (self.rank * self.slots + slot) * self.n_items // total, True
        g = self.rank * self.per_rank + slot
        real = slot < self.per_rank and g < self.n_items
        return g % self.n_items, real  # padding repeats an item (any real one) with mask False

    def __getitem__(self, index: int) -> Batch:
        index = int(index)
        items = [self.item(index * self.batch_size + j) for j in range(self.batch_size)]
        tokens = np.zeros((self.batch_size, self.crop), dtype=np.int64)
        mask = np.array([real for _, real in items])
        keys, offsets, skipped = [], [], []
        by_sample: dict[int, list[int]] = {}
        for j, (it, _) in enumerate(items):
            s = int(self.item_sample[it])
            by_sample.setdefault(s, []).append(j)
            keys.append(self.samples.keys[s])
            offsets.append(int(self.item_offset[it]))
        for s, rows in by_sample.items():  # one read of each segment per batch
            try:
                tokens[rows] = self.samples.crops(s, [offsets[j] for j in rows], self.crop, self.mu)
            except CorruptSample as e:
                mask[rows] = False  # a corrupt item stays in place (zeros), masked out
                skipped.append(self.samples.keys[s])
                _warn_once(self.samples.keys[s], str(e))
        return Batch(torch.from_numpy(tokens), keys, torch.tensor(offsets, dtype=torch.long), 0, index,
                     torch.from_numpy(mask), skipped)


_warned: set[str] = set()


def _warn_once(key: str, reason: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("skipping corrupt sample %s", reason)


def _identity(x):
    return x


class _CountFrom(torch.utils.data.Sampler):
    """Batch ids start, start + 1, … (endless)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        i = self.start
        while True:
            yield i
            i += 1


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def _check_args(crop: int, hop: int, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if hop < 1:
        raise ValueError(f"hop={hop} must be >= 1")
    if crop < 1 or crop % hop:
        raise ValueError(f"crop={crop} must be a positive multiple of hop={hop}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")


def _check_fingerprint(samples: ShardSamples, fingerprint: Optional[str]) -> None:
    if fingerprint is not None and samples.kind != "codes":
        raise ValueError(f"{samples.root} is an {samples.kind} set; a fingerprint applies to code sets only")
    if fingerprint is not None and samples.fingerprint != fingerprint:
        raise ValueError(f"{samples.root}: codes were made by encoder {samples.fingerprint!r}, but this stack's "
                         f"level below is {fingerprint!r}; recompute the codes for this stack")


class _Base:
    def _dataloader(self, dataset, sampler, seed: int) -> torch.utils.data.DataLoader:
        # The loader's own generator: creating an iterator then draws its base seed from here,
        # not from torch's global RNG, so starting (or restarting) iteration leaves the model's
        # random stream untouched. Batches themselves never use torch RNG.
        generator = torch.Generator()
        generator.manual_seed(seed)
        w = self.num_workers
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=w, collate_fn=_identity,
            pin_memory=self.pin_memory, generator=generator,
            prefetch_factor=self.prefetch_factor if w else None,
            multiprocessing_context=self.multiprocessing_context if w else None)


class TrainLoader(_Base):
    """Endless, deterministic, exactly resumable training batches (see the module docstring).

    Args:
        root: shard set folder or URL prefix (holds ``manifest.json``).
        split: which split of the manifest to read.
        crop: tokens per crop (a multiple of ``hop``).
        hop: the level's hop; crop offsets are multiples of it, so code frames line up.
        crops_per_segment: crops taken from one decoded segment (capped at ``batch_size``).
        batch_size: crops per batch on this rank.
        seed: data order seed (>= 0).
        rank, world_size: this process's place in data parallelism.
        num_workers: DataLoader worker processes (0: build batches in this process). Never
            changes which batches come out.
        mu: mu-law parameter for audio sets (classes ``0..mu``).
        prefetch_factor: batches each worker builds ahead.
        pin_memory: pin batches for faster host → GPU copies.
        cache_dir: local cache for shards behind URLs (default :func:`default_cache_dir`).
        shard_url: where the shards are, when not next to the manifest: a prefix, or a template
            with ``{name}`` (e.g. ``"pipe:aws s3 cp s3://bucket/audio/{name} -"``; the manifest is
            then read from ``root``, a local copy). Default: ``root`` + ``/`` + name.
        fingerprint: for code sets, the encoder fingerprint the codes must carry.
        multiprocessing_context: start method for workers (default: torch's).

    Iterating yields :class:`Batch` es forever, epoch after epoch, starting at the current
    position; the position advances as each batch is handed out. Use one iterator at a time.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, crop: int, hop: int = 1,
                 crops_per_segment: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, mu: int = 255, prefetch_factor: int = 2, pin_memory: bool = False,
                 cache_dir: Optional[str | os.PathLike] = None, shard_url: Optional[str] = None,
                 fingerprint: Optional[str] = None, multiprocessing_context: Optional[str] = None):
        _check_args(crop, hop, batch_size, rank, world_size, num_workers)
        if crops_per_segment < 1:
            raise ValueError(f"crops_per_segment={crops_per_segment} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.samples = ShardSamples(os.fspath(root), split, cache_dir, shard_url)
        _check_fingerprint(self.samples, fingerprint)
        self.plan = _TrainPlan(self.samples, crop=crop, hop=hop, crops_per_segment=crops_per_segment,
                               batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, mu=mu)
        if self.plan.n_units == 0:
            longest = int(self.samples.lengths.max()) if len(self.samples) else 0
            raise ValueError(f"{root}: no segment of split {split!r} is at least crop={crop} tokens long "
                             f"({len(self.samples)} segments, longest {longest})")
        if self.plan.short_keys:
            log.info("%s/%s: %d segments shorter than crop=%d are left out", root, split,
                     len(self.plan.short_keys), crop)
        self.crop, self.hop, self.crops_per_segment = crop, hop, crops_per_segment
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.mu = num_workers, mu
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0  # position of the next batch to hand out
        self.index = 0
        self.skipped = 0  # corrupt-sample substitutions in the batches handed out so far

    # -- geometry ----------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch — the same on every rank."""
        return self.plan.batches_per_epoch

    @property
    def kind(self) -> str:
        return self.samples.kind

    @property
    def short_keys(self) -> list[str]:
        """Segments left out because they are shorter than one crop."""
        return self.plan.short_keys

    def batch(self, epoch: int, index: int) -> Batch:
        """Build batch ``index`` of ``epoch`` here and now (no workers, position unchanged)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} of an epoch of {self.batches_per_epoch}")
        return self.plan.batch(epoch, index)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        start = self.epoch * self.batches_per_epoch + self.index
        for batch in self._dataloader(self.plan, _CountFrom(start), self.seed):
            self._advance(batch)
            yield batch

    def _advance(self, batch: Batch) -> None:
        self.epoch, self.index = batch.epoch, batch.index + 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self.skipped += len(batch.skipped)

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position (batches handed out) and what defines the plan; plain JSON-able types."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": self.epoch, "index": self.index,
                "batches_per_epoch": self.batches_per_epoch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "crop": self.crop,
                "hop": self.hop, "crops_per_segment": self.crops_per_segment, "plan": self.plan.fingerprint(),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue where ``state`` was taken.

        Same seed, data, crop layout, batch size and world size: exact — the next batch is the
        one an uninterrupted run would have produced next. A different world size or batch size
        (e.g. resuming on fewer GPUs) continues in the same epoch after the units already handed
        out, rounded up to a whole batch, with a warning. A different seed, shard set or crop
        layout raises ``ValueError`` unless ``strict=False``, which keeps the epoch and the
        fraction of it already done.
        """
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state: {sorted(state)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        changed = [k for k in ("seed", "crop", "hop", "crops_per_segment", "plan")
                   if state[k] != (self.plan.fingerprint() if k == "plan" else getattr(self, k))]
        if changed:
            msg = (f"loader state was taken with different {', '.join(changed)} "
                   f"({', '.join(f'{k}={state[k]!r}' for k in changed)}); the data order cannot continue exactly")
            if strict:
                raise ValueError(msg + " (pass strict=False to keep only the epoch and its fraction done)")
            warnings.warn(msg + "; continuing at the same fraction of the epoch")
            index = math.ceil(index / state["batches_per_epoch"] * self.batches_per_epoch)
        elif state["world_size"] != self.world_size or state["batch_size"] != self.batch_size:
            old_units = math.ceil(state["batch_size"] / min(state["crops_per_segment"], state["batch_size"]))
            consumed = index * state["world_size"] * old_units
            index = math.ceil(consumed / (self.world_size * self.plan.units_per_batch))
            warnings.warn(f"loader state was taken with world_size={state['world_size']}, "
                          f"batch_size={state['batch_size']}; continuing epoch {epoch} at batch {index} "
                          f"(not an exact resume)")
        if index >= self.batches_per_epoch:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index
        self.skipped = int(state.get("skipped", 0))

    def stats(self) -> dict[str, float]:
        """Counters for logging."""
        return {"data/epoch": self.epoch + self.index / self.batches_per_epoch,
                "data/skipped_samples": self.skipped}


class EvalLoader(_Base):
    """One deterministic pass over a split (validation/test), the same batch count on every rank.

    Items are all non-overlapping crops (offsets 0, crop, 2·crop, …) of every segment at least
    one crop long, in manifest order. Rank r takes the r-th contiguous block of
    ``ceil(items / world_size)``; the last batches are padded to ``batch_size`` with repeated
    items whose ``mask`` is False (so shapes are constant and every rank runs the same number of
    forward passes). Corrupt items stay in place as zeros with ``mask`` False. Weight losses by
    ``batch.mask`` for exact averages.

    Args:
        max_batches: cap the pass at this many batches per rank; the capped pass takes items
            spread evenly over the whole split (not its first segments).
        (others as :class:`TrainLoader`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "valid", *, crop: int, hop: int = 1,
                 batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, mu: int = 255,
                 max_batches: Optional[int] = None, prefetch_factor: int = 2, pin_memory: bool = False,
                 cache_dir: Optional[str | os.PathLike] = None, shard_url: Optional[str] = None,
                 fingerprint: Optional[str] = None, multiprocessing_context: Optional[str] = None):
        _check_args(crop, hop, batch_size, rank, world_size, num_workers)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} must be >= 1")
        self.samples = ShardSamples(os.fspath(root), split, cache_dir, shard_url)
        _check_fingerprint(self.samples, fingerprint)
        self.plan = _EvalPlan(self.samples, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size,
                              mu=mu, max_batches=max_batches)
        if self.plan.n_items == 0:
            raise ValueError(f"{root}: no segment of split {split!r} is at least crop={crop} tokens long "
                             f"({len(self.samples)} segments)")
        self.crop, self.hop, self.batch_size = crop, hop, batch_size
        self.rank, self.world_size, self.num_workers, self.mu = rank, world_size, num_workers, mu
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.skipped = 0  # corrupt items met, summed over passes

    def __len__(self) -> int:
        """Batches per pass — the same on every rank."""
        return self.plan.batches

    @property
    def items(self) -> int:
        """Distinct crops in the split (the real rows of a full pass, over all ranks)."""
        return self.plan.n_items

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._dataloader(self.plan, range(len(self)), 0):
            self.skipped += len(batch.skipped)
            yield batch

    def stats(self) -> dict[str, float]:
        return {"data/eval_skipped_samples": self.skipped}
