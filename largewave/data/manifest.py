"""The manifest of a shard set: which shards exist, what each holds, and their checksums.

A shard set (audio or codes, see ``docs/interfaces.md``) is one folder or URL prefix with
``{split}-{index:06d}.tar`` files and a ``manifest.json`` written last and atomically. A set
without a manifest is incomplete (a build was interrupted) and is refused.

    m = read_manifest("data/demo/audio")          # or "https://host/bucket/demo/audio"
    m.urls("train")                              # what WebDataset opens, one per shard
    m.samples("train"), m.hours["train"]

Roots may be local folders or http(s) URL prefixes (the shards of an http root are then
streamed by WebDataset). Other WebDataset sources (``pipe:`` commands, e.g. ``pipe:aws s3 cp
s3://bucket/set/{name} -``) have no standard way to fetch a manifest: read it from a local
copy or an http mirror and give the shard URLs to the loader directly.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

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
    return "://" in root or root.startswith("pipe:")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if _is_url(root) else str(Path(root) / name)


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fetch(root: str) -> str:
    """The text of ``root``'s manifest, local or http(s)."""
    if root.startswith("pipe:"):
        raise ManifestError(f"{root}: cannot read a manifest through a pipe: URL; "
                            "read it from a local copy or an http(s) mirror")
    if root.startswith("file://"):
        root = root[len("file://"):]
    if _is_url(root):
        if not root.startswith(("http://", "https://")):
            raise ManifestError(f"{root}: only local folders and http(s) URLs are supported for manifests")
        url = _join(root, MANIFEST_NAME)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise ManifestError(f"incomplete shard set: {url} not found (HTTP 404); "
                                    "the build did not finish or this is not a shard set") from None
            raise ManifestError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ManifestError(f"{url}: cannot fetch ({getattr(e, 'reason', e)})") from None
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
    try:
        splits: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        for split, shards in raw["splits"].items():
            splits[split] = [ShardInfo(name=s["name"], url=_join(root, s["name"]), sha256=s["sha256"],
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


def write_manifest(root: Union[str, os.PathLike], manifest: Union[dict[str, Any], Manifest]) -> Path:
    """Write ``manifest.json`` into the local folder ``root`` atomically (temp file + rename).

    ``manifest`` is the dict of the documented format (``format`` and ``version`` are filled in
    when absent) or a :class:`Manifest`. It is validated before anything is written, so an
    invalid manifest never replaces a good one. Returns the manifest's path.
    """
    root = os.fspath(root)
    if _is_url(root):
        raise ManifestError(f"{root}: manifests are written to local folders; copy the finished "
                            "set to remote storage afterwards")
    d = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    d.setdefault("format", FORMAT)
    d.setdefault("version", VERSION)
    for split in SPLITS:
        d.setdefault("splits", {}).setdefault(split, [])
    parse_manifest(root, d)  # refuse to write what read_manifest would refuse
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(d, indent=1, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / MANIFEST_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return folder / MANIFEST_NAME
