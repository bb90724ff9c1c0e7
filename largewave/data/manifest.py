"""The manifest of a shard set: which shards exist, what each holds, and their checksums.

A shard set (audio or codes, see ``docs/interfaces.md``) is one folder or URL prefix with
``{split}-{index:06d}.tar`` files and a ``manifest.json`` written last and atomically. A set
without a manifest is incomplete (a build was interrupted) and is refused.

    m = read_manifest("data/demo/audio")          # or "https://host/bucket/demo/audio"
    m.urls("train")                              # what WebDataset opens, one per shard
    m.samples("train"), m.hours["train"]

Roots may be local folders, ``s3://bucket/prefix``, http(s) URL prefixes or ``pipe:`` commands
with ``{name}`` (see :mod:`largewave.data.storage`); the manifest is read from ``root/manifest.json``
(for a ``pipe:`` root, the command with ``{name}`` = ``manifest.json``) and the shard URLs are
resolved the same way. Manifests are written to local folders and s3:// prefixes.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from largewave.data import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "largewave-shards"
VERSION = 1
SPLITS = ("train", "valid", "test")
CODE_FIELDS = ("level", "hop", "codes", "dtype", "fingerprint")


class ManifestError(Exception):
    """A shard set that is missing, incomplete or not in the expected format."""


@dataclass
class ShardInfo:
    """One tar shard of a set."""

    name: str  # file name inside the set, e.g. "train-000000.tar"
    url: str  # full path or URL (root + "/" + name), what WebDataset opens
    sha256: str
    bytes: int
    samples: int  # number of keys (segments) in the shard
    keys: list[str]  # in tar order
    lengths: list[int]  # tokens of the stored stream per key (audio samples or codes)
    seconds: float  # audio duration the shard covers

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes,
                "samples": self.samples, "keys": list(self.keys), "lengths": list(self.lengths),
                "seconds": self.seconds}


@dataclass
class Manifest:
    """A parsed ``manifest.json``; ``level``…``fingerprint`` are set for code sets only."""

    root: str
    kind: str  # "audio" or "codes"
    sample_rate: int  # audio sample rate the set derives from
    token_rate: float  # tokens per second of the stored stream (= sample_rate / cumulative hop)
    splits: dict[str, list[ShardInfo]]  # always has train, valid and test (possibly empty)
    hours: dict[str, float]
    level: Optional[int] = None
    hop: Optional[int] = None
    codes: Optional[int] = None
    dtype: Optional[str] = None
    fingerprint: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not interpret

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ManifestError(f"{self.root}: no split {split!r} (have {', '.join(self.splits)})")
        return self.splits[split]

    def urls(self, split: str) -> list[str]:
        return [s.url for s in self.shards(split)]

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def keys(self, split: str) -> list[str]:
        return [k for s in self.shards(split) for k in s.keys]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "kind": self.kind,
            "sample_rate": self.sample_rate, "token_rate": self.token_rate,
            "splits": {k: [s.to_dict() for s in v] for k, v in self.splits.items()},
            "hours": dict(self.hours),
        }
        if self.kind == "codes":
            for k in CODE_FIELDS:
                d[k] = getattr(self, k)
        d.update(self.extra)
        return d

    def verify(self, split: Optional[str] = None) -> list[str]:
        """Check the size and sha256 of every local shard; returns the problems (empty = fine)."""
        if _is_url(self.root):
            raise ManifestError(f"{self.root}: verify() reads local shard sets only")
        problems = []
        for sp in [split] if split else list(self.splits):
            for s in self.shards(sp):
                p = Path(s.url)
                if not p.exists():
                    problems.append(f"{s.name}: missing")
                elif p.stat().st_size != s.bytes:
                    problems.append(f"{s.name}: {p.stat().st_size} bytes, manifest says {s.bytes}")
                elif sha256_file(p) != s.sha256:
                    problems.append(f"{s.name}: sha256 differs from the manifest")
        return problems


def _is_url(root: str) -> bool:
    return storage.is_remote(root)


def _join(root: str, name: str) -> str:
    return storage.open_store(root).url(name)


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fetch(root: str) -> str:
    """The text of ``root``'s manifest, from wherever the set lives."""
    if storage.kind(root) != "local":
        try:
            store = storage.open_store(root)
            return store.read_bytes(MANIFEST_NAME).decode("utf-8")
        except storage.NotFound:
            url = _join(root, MANIFEST_NAME)
            names = None
            try:
                names = store.names()
            except storage.StorageError:
                pass
            hint = ("" if names is None else
                    f" ({sum(n.endswith('.tar') for n in names)} shard(s) there but no {MANIFEST_NAME}: the "
                    "build or the copy did not finish)" if any(n.endswith(".tar") for n in names) else
                    " (nothing there)")
            raise ManifestError(f"incomplete shard set: {url} not found{hint}; "
                                "the build did not finish or this is not a shard set") from None
        except storage.StorageError as e:
            raise ManifestError(str(e)) from None
        except UnicodeDecodeError:
            raise ManifestError(f"{_join(root, MANIFEST_NAME)}: not text") from None
    root = storage.local_path(root)
    p = Path(root)
    if not p.exists():
        raise ManifestError(f"shard set not found: {root} does not exist")
    if not p.is_dir():
        raise ManifestError(f"{root}: a shard set is a folder, this is a file")
    mp = p / MANIFEST_NAME
    if not mp.exists():
        tars = sorted(q.name for q in p.glob("*.tar"))
        hint = (f" ({len(tars)} shard(s) present but no {MANIFEST_NAME}: the build was interrupted; "
                "run it again)" if tars else f" (no {MANIFEST_NAME} and no shards: nothing was built here)")
        raise ManifestError(f"incomplete shard set: {root}{hint}")
    return mp.read_text()


def parse_manifest(root: str, raw: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (as stored) and resolve shard URLs against ``root``."""
    where = _join(root, MANIFEST_NAME)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} manifest")
    if raw.get("version") != VERSION:
        raise ManifestError(f"{where}: manifest version {raw.get('version')!r}, this code reads {VERSION}")
    kind = raw.get("kind")
    if kind not in ("audio", "codes"):
        raise ManifestError(f"{where}: kind must be 'audio' or 'codes', got {kind!r}")
    store = storage.open_store(root)
    try:
        splits: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        for split, shards in raw["splits"].items():
            splits[split] = [ShardInfo(name=s["name"], url=store.url(s["name"]), sha256=s["sha256"],
                                       bytes=int(s["bytes"]), samples=int(s["samples"]),
                                       keys=list(s["keys"]), lengths=[int(n) for n in s["lengths"]],
                                       seconds=float(s["seconds"]))
                             for s in shards]
            for s in splits[split]:
                if not (s.samples == len(s.keys) == len(s.lengths)):
                    raise ManifestError(f"{where}: {s.name}: samples, keys and lengths disagree")
        m = Manifest(root=root, kind=kind, sample_rate=int(raw["sample_rate"]),
                     token_rate=float(raw["token_rate"]), splits=splits,
                     hours={k: float(v) for k, v in raw.get("hours", {}).items()})
        if kind == "codes":
            for k in CODE_FIELDS:
                if k not in raw:
                    raise ManifestError(f"{where}: a codes manifest needs {k!r}")
            m.level, m.hop, m.codes = int(raw["level"]), int(raw["hop"]), int(raw["codes"])
            m.dtype, m.fingerprint = str(raw["dtype"]), str(raw["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    known = {"format", "version", "kind", "sample_rate", "token_rate", "splits", "hours", *CODE_FIELDS}
    m.extra = {k: v for k, v in raw.items() if k not in known}
    return m


def read_manifest(root: Union[str, os.PathLike]) -> Manifest:
    """Read and validate the manifest of a shard set (local folder or http(s) URL prefix).

    Raises:
        ManifestError: ``"incomplete shard set: …"`` when the folder has no manifest, or a message
            naming the file for a malformed one.
    """
    root = os.fspath(root)
    text = _fetch(root)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{_join(root, MANIFEST_NAME)}: not valid JSON ({e})") from None
    return parse_manifest(root, raw)


def write_manifest(root: Union[str, os.PathLike], manifest: Union[dict[str, Any], Manifest]) -> str:
    """Write ``manifest.json`` into ``root`` atomically: a local folder (temp file + rename) or an
    ``s3://`` prefix (one PUT). Other kinds of location are read-only.

    ``manifest`` is the dict of the documented format (``format`` and ``version`` are filled in
    when absent) or a :class:`Manifest`. It is validated before anything is written, so an
    invalid manifest never replaces a good one. Returns where the manifest went.
    """
    root = os.fspath(root)
    d = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    d.setdefault("format", FORMAT)
    d.setdefault("version", VERSION)
    for split in SPLITS:
        d.setdefault("splits", {}).setdefault(split, [])
    parse_manifest(root, d)  # refuse to write what read_manifest would refuse
    text = json.dumps(d, indent=1, sort_keys=False) + "\n"
    store = storage.open_store(root)
    if not store.writable:
        raise ManifestError(f"{root}: a {storage.kind(root)} location is read-only; write the set to a local "
                            "folder or an s3:// prefix")
    try:
        store.put_bytes(MANIFEST_NAME, text.encode("utf-8"))
    except storage.StorageError as e:
        raise ManifestError(f"writing {store.url(MANIFEST_NAME)}: {e}") from None
    return store.url(MANIFEST_NAME)


def copy_shard_set(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *, progress: bool = True,
                   tmp_dir: Optional[Union[str, os.PathLike]] = None) -> dict[str, int]:
    """Copy a complete shard set from ``src`` to ``dst`` (any readable location to a local folder
    or an ``s3://`` prefix), verifying every shard against the source manifest on the way.

    The destination's manifest is removed first and written last, so a half-copied set reads as
    incomplete; shards already at the destination with the manifest's checksum are skipped, so an
    interrupted copy is resumed by running it again. Returns ``{"copied": n, "skipped": m, "bytes": b}``.

    Raises:
        ManifestError: the source is incomplete or unreadable, a source shard disagrees with its
            manifest (named), or the destination cannot be written.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    m = read_manifest(src)
    out = storage.open_store(dst)
    if not out.writable:
        raise ManifestError(f"{dst}: a {storage.kind(dst)} location is read-only; copy to a local folder or "
                            "an s3:// prefix")
    shards = [s for split in m.splits.values() for s in split]
    done = {"copied": 0, "skipped": 0, "bytes": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.bytes for s in shards), unit="B", unit_scale=True, desc=f"copy → {dst}",
                   dynamic_ncols=True)
    tmp_root = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    try:
        try:
            theirs = out.read_bytes(MANIFEST_NAME)
            if json.loads(theirs) == m.to_dict():
                if bar:
                    bar.update(bar.total)
                done["skipped"] = len(shards)
                return done
            out.delete(MANIFEST_NAME)  # incomplete until the copy finishes
        except storage.NotFound:
            pass
        except ValueError:
            out.delete(MANIFEST_NAME)
        for s in shards:
            if out.size(s.name) == s.bytes and out.checksum(s.name) == s.sha256:
                done["skipped"] += 1
                if bar:
                    bar.update(s.bytes)
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{s.name}.", suffix=".tmp", dir=tmp_root)
            os.close(fd)
            try:
                n, digest = storage.download(s.url, tmp, progress=bar.update if bar else None)
                if n != s.bytes or digest != s.sha256:
                    raise ManifestError(f"{s.url}: {n} bytes with sha256 {digest[:16]}…, the manifest says "
                                        f"{s.bytes} bytes, {s.sha256[:16]}…: the source set is damaged; rebuild it")
                out.put_file(s.name, tmp, sha256=s.sha256)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            done["copied"] += 1
            done["bytes"] += s.bytes
        write_manifest(dst, m.to_dict())
    except storage.StorageError as e:
        raise ManifestError(f"copying {src} → {dst}: {e}") from None
    finally:
        if bar:
            bar.close()
    return done
