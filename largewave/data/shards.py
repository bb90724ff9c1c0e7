"""Audio shard builder: a folder of recordings → WebDataset tar shards + manifest.

    result = build_audio_shards("recordings/", "data/demo/audio", segment_seconds=60, workers=4)

Steps (the format is specified in ``docs/interfaces.md``):

1. **Scan** the input folder recursively for audio extensions (other files are counted and
   ignored). Each file is one *piece*, with a stable id: a slug of its path relative to the
   input root plus a short hash of that path.
2. **Split by piece** into train/valid/test, either from a user split file (e.g. MAESTRO's
   ``maestro-v3.0.0.csv``) or deterministically from (seed, piece id). No piece is on two sides.
3. **Decode** in parallel worker processes: mono, resampled to 16 kHz with soxr, cut into
   contiguous **segments** of at least ``segment_seconds`` (where the piece is that long; the
   remainder joins the last segment, nothing is dropped), each encoded as 16-bit FLAC.
4. **Write** ``{split}-{index:06d}.tar`` shards of about ``shard_mb`` each, holding
   ``{key}.flac`` + ``{key}.json`` per segment, ``key = {piece}-s{segment:03d}``. Tar members
   carry fixed metadata and come in a fixed order, each shard is written under a temporary name
   and renamed, so building again from the same input gives byte-identical shards.
5. **Report** bad inputs (unreadable, empty, not audio, NaN/inf samples, truncated) with their
   reasons in the printed summary and ``report.json``; a bad file never stops the build.
6. **Manifest** last, atomically: until it exists the folder is an incomplete set.

The builder writes to a local folder. Shards may then be copied to shared or object storage;
the loader opens them from anything WebDataset reads (local paths, ``http(s)://`` URLs,
``pipe:`` commands such as ``pipe:curl -s https://…/train-000000.tar``).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tqdm import tqdm

from largewave.audio import SAMPLE_RATE, AudioError, encode_flac, float_to_pcm16, load_audio
from largewave.data.manifest import (MANIFEST_NAME, SPLITS, ShardInfo, sha256_file, write_manifest)

AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".w64", ".rf64", ".caf",
})
SHARD_NAME = re.compile(r"^(train|valid|test)-(\d{6})\.tar$")
REPORT_NAME = "report.json"
FORMAT_TAG = "largewave-audio-shards-1"  # bump when the bytes a build writes change
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid",
                  "val": "valid", "dev": "valid", "test": "test", "testing": "test"}
_PATH_COLUMNS = ("audio_filename", "path", "file", "filename", "audio", "source")


class BuildError(Exception):
    """The build cannot proceed (no input, no usable audio, bad split file, …)."""


# --------------------------------------------------------------------------------------------
# Pieces, keys and splits
# --------------------------------------------------------------------------------------------


def piece_id(relpath: str) -> str:
    """Stable id of a piece from its path relative to the input root, e.g.
    ``"2018/MIDI-Unprocessed_01.wav"`` → ``"2018-midi-unprocessed-01-3fa1b2c4"``.

    Only ``[a-z0-9-]`` (WebDataset splits keys at the first dot); the hash keeps ids unique when
    two paths slug alike and keeps them stable when the folder grows.
    """
    stem = relpath.rsplit(".", 1)[0] if "." in Path(relpath).name else relpath
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:48].strip("-") or "piece"
    return f"{slug}-{hashlib.sha1(relpath.encode('utf-8')).hexdigest()[:8]}"


def segment_key(piece: str, segment: int) -> str:
    return f"{piece}-s{segment:03d}"


def segment_bounds(n_samples: int, segment_samples: int) -> list[tuple[int, int]]:
    """Cut ``n_samples`` into contiguous ``(start, length)`` segments.

    Every segment is ``segment_samples`` long except the last, which also takes the remainder
    (so it is between 1× and 2× as long); a piece shorter than one segment is one segment.
    Nothing is dropped: the lengths sum to ``n_samples``.
    """
    if n_samples <= 0:
        return []
    n = max(1, n_samples // segment_samples)
    bounds = [(i * segment_samples, segment_samples) for i in range(n - 1)]
    start = (n - 1) * segment_samples
    bounds.append((start, n_samples - start))
    return bounds


def _normalise_split(value: str, where: str) -> str:
    v = value.strip().lower()
    if v not in _SPLIT_ALIASES:
        raise BuildError(f"{where}: unknown split {value!r} (use train, valid/validation or test)")
    return _SPLIT_ALIASES[v]


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a user split file → ``{relative path: split}`` with split ∈ train/valid/test.

    CSV: a header with a path column (``audio_filename`` as in MAESTRO's ``maestro-v3.0.0.csv``,
    or ``path``/``file``/``filename``/``audio``/``source``) and a ``split`` column
    (``validation`` is read as valid). JSON: ``{"path": "split", …}`` or
    ``{"train": [paths], "valid": [paths], "test": [paths]}``. Paths are relative to the input
    root, with ``/`` separators.
    """
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"split file not found: {p}")
    out: dict[str, str] = {}
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise BuildError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BuildError(f"{p}: expected a JSON object")
        if raw and all(isinstance(v, list) for v in raw.values()):
            for split, paths in raw.items():
                for q in paths:
                    out[str(q)] = _normalise_split(split, str(p))
        else:
            out = {str(k): _normalise_split(str(v), f"{p}: {k}") for k, v in raw.items()}
        return out
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        path_col = next((cols[c] for c in _PATH_COLUMNS if c in cols), None)
        if path_col is None or "split" not in cols:
            raise BuildError(f"{p}: a split CSV needs a 'split' column and a path column "
                             f"({', '.join(_PATH_COLUMNS)}); found {', '.join(cols) or 'no header'}")
        for i, row in enumerate(reader, start=2):
            out[row[path_col].strip().replace("\\", "/")] = _normalise_split(row[cols["split"]], f"{p}:{i}")
    return out


def hash_splits(pieces: Sequence[str], seed: int, valid_fraction: float,
                test_fraction: float) -> dict[str, str]:
    """Deterministic split of piece ids: rank pieces by ``sha256(seed, id)``; the first
    ``round(n·valid_fraction)`` go to valid, the next ``round(n·test_fraction)`` to test, the rest
    to train. A non-zero fraction gets at least one piece whenever train keeps at least one, so a
    tiny corpus still has a validation piece. The result depends on (seed, set of ids) only.
    """
    ranked = sorted(pieces, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(ranked)

    def quota(fraction: float, left: int) -> int:
        if fraction <= 0 or left < 2:
            return 0
        return min(max(1, round(n * fraction)), left - 1)

    n_valid = quota(valid_fraction, n)
    n_test = quota(test_fraction, n - n_valid)
    out = {}
    for i, p in enumerate(ranked):
        out[p] = "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
    return out


# --------------------------------------------------------------------------------------------
# Scanning and decoding
# --------------------------------------------------------------------------------------------


def scan_audio_files(root: str | os.PathLike, exclude: Optional[Path] = None) -> tuple[list[str], Counter]:
    """Relative posix paths of audio files under ``root`` (sorted), and a count of ignored
    files by extension. Symlinked folders are followed (once each: link cycles are cut), hidden
    files and folders (name starts with ".") are skipped, and broken symlinks with an audio
    extension are kept so that the build reports them."""
    root = Path(root)
    found: list[str] = []
    ignored: Counter = Counter()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        real = os.path.realpath(d)
        if real in seen or (exclude is not None and Path(real) == exclude):
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden entries are tool droppings (macOS "._x.wav" forks, interrupted renders' temp
        # folders), not recordings; they are counted in the report, never decoded.
        hidden = [n for n in dirnames if n.startswith(".")]
        if hidden:
            ignored["(hidden folder)"] += len(hidden)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in filenames:
            if name.startswith("."):
                ignored["(hidden file)"] += 1
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in AUDIO_EXTENSIONS:
                found.append((d / name).relative_to(root).as_posix())
            else:
                ignored[ext or "(no extension)"] += 1
    return sorted(found), ignored


@dataclass
class _Segment:
    key: str
    segment: int
    start: int
    samples: int
    flac: bytes


@dataclass
class _FileResult:
    relpath: str
    piece: str
    error: Optional[str] = None
    orig_rate: int = 0
    orig_channels: int = 0
    samples: int = 0
    segments: list[_Segment] = field(default_factory=list)


def _decode_piece(root: str, relpath: str, piece: str, sample_rate: int,
                  segment_samples: int) -> _FileResult:
    """Worker: one file → FLAC-encoded segments, or the reason it cannot be used."""
    res = _FileResult(relpath=relpath, piece=piece)
    try:
        x, info = load_audio(os.path.join(root, relpath), sample_rate)
    except AudioError as e:
        res.error = str(e)
        return res
    except Exception as e:  # a bad file must never stop the build
        res.error = f"unexpected {type(e).__name__}: {e}"
        return res
    pcm = float_to_pcm16(x)
    res.orig_rate, res.orig_channels, res.samples = info.orig_rate, info.orig_channels, int(pcm.size)
    for i, (start, n) in enumerate(segment_bounds(pcm.size, segment_samples)):
        res.segments.append(_Segment(segment_key(piece, i), i, start, n,
                                     encode_flac(pcm[start:start + n], sample_rate)))
    return res


def _crash_result(reason: str, job: tuple) -> _FileResult:
    _, relpath, piece, *_ = job
    return _FileResult(relpath=relpath, piece=piece, error=reason)


def _ordered_map(fn: Callable, jobs: list[tuple], workers: int,
                 on_crash: Callable[[tuple], Any]) -> Iterator[Any]:
    """Results of ``fn(*job)`` in job order, at most ``2·workers`` jobs ahead of the consumer so
    memory stays bounded however large the input.

    A worker that dies (a decoder library crashing on a hostile file) breaks the whole pool; the
    job at the head of the queue is then rerun alone in a fresh process to see whether it is the
    culprit (its result becomes ``on_crash(job)``), and the pool is restarted for the rest.
    """
    if workers <= 0:
        for job in jobs:
            yield fn(*job)
        return
    # spawn: workers start clean (no inherited threads or torch state) on every platform.
    ctx = mp.get_context("spawn")
    i = 0  # the next job to yield
    while i < len(jobs):
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                pending: deque = deque()
                nxt = i
                while i < len(jobs):
                    while nxt < len(jobs) and len(pending) < 2 * workers:
                        pending.append(pool.submit(fn, *jobs[nxt]))
                        nxt += 1
                    result = pending.popleft().result()
                    i += 1
                    yield result
        except cf.process.BrokenProcessPool:
            try:
                with cf.ProcessPoolExecutor(1, mp_context=ctx) as alone:
                    result = alone.submit(fn, *jobs[i]).result()
            except cf.process.BrokenProcessPool:
                result = on_crash(jobs[i])
            i += 1
            yield result


# --------------------------------------------------------------------------------------------
# Deterministic tar shards
# --------------------------------------------------------------------------------------------


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed metadata (mtime 0, root, no names), so rebuilt shards are byte-identical."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _ShardWriter:
    """Writes one split's shards in order, rolling over at ``target_bytes``. Each shard is written
    to a hidden temporary name and renamed when complete."""

    def __init__(self, out: Path, split: str, target_bytes: int, sample_rate: int):
        self.out, self.split, self.target, self.rate = out, split, target_bytes, sample_rate
        self.done: list[ShardInfo] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp: Optional[Path] = None
        self._size = 0
        self._keys: list[str] = []
        self._lengths: list[int] = []

    def add(self, key: str, flac: bytes, meta: dict[str, Any]) -> None:
        payload = json.dumps(meta).encode("utf-8")
        size = len(flac) + len(payload) + 3 * 512  # two headers + padding, roughly
        if self._tar is not None and self._keys and self._size + size > self.target:
            self.close()
        if self._tar is None:
            self._tmp = self.out / f".{self.split}-{len(self.done):06d}.tar.tmp"
            # USTAR: no pax headers (which could carry times); names here are short and ASCII.
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self._size = 0
        for name, data in ((f"{key}.flac", flac), (f"{key}.json", payload)):
            self._tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
        self._size += size
        self._keys.append(key)
        self._lengths.append(int(meta["samples"]))

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{self.split}-{len(self.done):06d}.tar"
        final = self.out / name
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, final)
        self.done.append(ShardInfo(name=name, url=str(final), sha256=sha256_file(final),
                                   bytes=final.stat().st_size, samples=len(self._keys),
                                   keys=self._keys, lengths=self._lengths,
                                   seconds=sum(self._lengths) / self.rate))
        self._tar, self._tmp, self._keys, self._lengths = None, None, [], []


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]  # as written to manifest.json
    report: dict[str, Any]  # as written to report.json
    summary: str  # human-readable end summary


def build_audio_shards(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    segment_seconds: float = 60.0,
    shard_mb: float = 256.0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.0,
    split_file: Optional[str | os.PathLike] = None,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> BuildResult:
    """Build an audio shard set from every recording under ``input_dir`` (see module docstring).

    Args:
        input_dir: folder searched recursively for audio files.
        out_dir: local folder for ``{split}-{index:06d}.tar``, ``report.json``, ``manifest.json``.
            Old shards there are replaced; the manifest is removed first and written last.
        segment_seconds: minimum segment length where a piece allows.
        shard_mb: target shard size in MB (10⁶ bytes); a shard holds at least one segment.
        split_file: optional CSV/JSON mapping paths (relative to ``input_dir``) to splits; pieces
            it does not list are split by hash, and the report says how many.
        workers: decoding processes (0 = decode in this process).
        force: rebuild even when ``out_dir`` already holds a complete set made from the same
            files (same paths, sizes and modification times) with the same settings.

    Raises:
        BuildError: no input folder, no audio files, an unusable split file, or not one usable file.
    """
    t0 = time.time()
    root = Path(input_dir)
    out = Path(out_dir)
    if "://" in str(out_dir) or str(out_dir).startswith("pipe:"):
        raise BuildError(f"{out_dir}: the builder writes to a local folder; build there (--out DIR), copy it "
                         f"with largewave shards copy DIR {out_dir}, then train with data.shards={out_dir}")
    if not root.exists():
        raise BuildError(f"input folder not found: {root}")
    if not root.is_dir():
        raise BuildError(f"input is not a folder: {root}")
    files, ignored = scan_audio_files(root, exclude=out.resolve())
    if not files:
        extra = f" ({sum(ignored.values())} other files ignored)" if ignored else ""
        raise BuildError(f"no audio files under {root}{extra}; looked for "
                         f"{', '.join(sorted(AUDIO_EXTENSIONS))}")

    # ---- splits (by piece) -----------------------------------------------------------------
    pieces = {rel: piece_id(rel) for rel in files}
    if len(set(pieces.values())) != len(pieces):  # a sha1 prefix collision: refuse, don't merge
        raise BuildError("two input paths map to the same piece id; rename one of them")
    split_of: dict[str, str] = {}
    by_file_count = 0
    unlisted = list(files)
    if split_file:
        given = read_split_file(split_file)
        # MAESTRO's CSV names .wav files; a user may have converted them: match on the stem too.
        by_stem = {rel.rsplit(".", 1)[0]: s for rel, s in given.items()}
        unlisted = []
        for rel in files:
            s = given.get(rel) or by_stem.get(rel.rsplit(".", 1)[0])
            if s is None:
                unlisted.append(rel)
            else:
                split_of[rel] = s
                by_file_count += 1
    hashed = hash_splits([pieces[r] for r in unlisted], seed, valid_fraction, test_fraction)
    for rel in unlisted:
        split_of[rel] = hashed[pieces[rel]]

    # ---- up to date? (same files, sizes and mtimes, same settings, shards all present) --------
    fingerprint = _input_fingerprint(root, files, split_of, sample_rate, segment_seconds, shard_mb)
    if not force:
        cached = _up_to_date(out, fingerprint)
        if cached is not None:
            log(f"up to date: {out} was built from these files with these settings (--force rebuilds)\n"
                f"{cached.summary}")
            return cached

    # ---- clear the old set: without a manifest it reads as incomplete while we build ---------
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for q in out.glob(".*.tar.tmp"):
        q.unlink()

    # ---- decode and write, in piece-id order so the shards do not depend on `workers` --------
    order = sorted(files, key=lambda r: pieces[r])
    segment_samples = max(1, int(round(segment_seconds * sample_rate)))
    writers = {s: _ShardWriter(out, s, int(shard_mb * 1e6), sample_rate) for s in SPLITS}
    skipped: list[dict[str, str]] = []
    stats = {s: Counter() for s in SPLITS}
    jobs = [(str(root), rel, pieces[rel], sample_rate, segment_samples) for rel in order]
    bar = tqdm(total=len(jobs), unit="file", desc="decoding", disable=not progress, dynamic_ncols=True)
    hours = 0.0
    try:
        crashed = partial(_crash_result, "the decoder process crashed on this file")
        for res in _ordered_map(_decode_piece, jobs, workers, on_crash=crashed):
            if res.error is not None:
                skipped.append({"source": res.relpath, "reason": res.error})
            else:
                split = split_of[res.relpath]
                for seg in res.segments:
                    writers[split].add(seg.key, seg.flac, {
                        "key": seg.key, "piece": res.piece, "segment": seg.segment,
                        "start": seg.start, "samples": seg.samples,
                        "seconds": seg.samples / sample_rate, "source": res.relpath,
                        "orig_rate": res.orig_rate, "orig_channels": res.orig_channels,
                        "split": split})
                stats[split]["files"] += 1
                stats[split]["segments"] += len(res.segments)
                stats[split]["samples"] += res.samples
                hours += res.samples / sample_rate / 3600
            bar.update(1)
            bar.set_postfix(hours=f"{hours:.2f}", skipped=len(skipped), refresh=False)
        for w in writers.values():
            w.close()
    finally:
        bar.close()
        for q in out.glob(".*.tar.tmp"):  # an interrupted shard never gets a final name
            q.unlink()

    # ---- remove shards of an earlier, larger build ----------------------------------------
    keep = {s.name for w in writers.values() for s in w.done}
    for q in out.iterdir():
        if SHARD_NAME.match(q.name) and q.name not in keep:
            q.unlink()

    skipped.sort(key=lambda item: item["source"])
    wall = time.time() - t0
    good = sum(stats[s]["files"] for s in SPLITS)
    hours_by_split = {s: stats[s]["samples"] / sample_rate / 3600 for s in SPLITS}
    report = {
        "input": str(root), "output": str(out), "sample_rate": sample_rate,
        "segment_seconds": segment_seconds, "shard_mb": shard_mb, "seed": seed,
        "split_file": str(split_file) if split_file else None,
        "fingerprint": fingerprint,
        "files": len(files), "good_files": good, "skipped_files": len(skipped),
        "split_from_file": by_file_count, "split_by_hash": len(unlisted),
        "pieces": {s: stats[s]["files"] for s in SPLITS},
        "segments": {s: stats[s]["segments"] for s in SPLITS},
        "hours": hours_by_split,
        "shards": {s: len(writers[s].done) for s in SPLITS},
        "skipped": skipped,
        "ignored_non_audio": dict(sorted(ignored.items())),
        "wall_seconds": round(wall, 3),
    }
    _write_json_atomic(out / REPORT_NAME, report)
    summary = format_summary(report)
    if good == 0:
        raise BuildError(f"no usable audio: all {len(files)} files under {root} were skipped "
                         f"(reasons in {out / REPORT_NAME})\n{summary}")
    manifest = {
        "format": "largewave-shards", "version": 1, "kind": "audio",
        "sample_rate": sample_rate, "token_rate": float(sample_rate),
        "splits": {s: [i.to_dict() for i in writers[s].done] for s in SPLITS},
        "hours": hours_by_split,
    }
    write_manifest(out, manifest)
    log(summary)
    return BuildResult(out=out, manifest=manifest, report=report, summary=summary)


def _input_fingerprint(root: Path, files: list[str], split_of: dict[str, str], *settings: Any) -> str:
    """Hash of what a build depends on: each input's path, size and mtime, its split, and the
    settings. Cheap (no file is read), so an unchanged input is recognised instantly."""
    h = hashlib.sha256(json.dumps([FORMAT_TAG, *settings]).encode())
    for rel in files:
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{split_of[rel]}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\0{split_of[rel]}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> Optional[BuildResult]:
    """The existing build in ``out`` if it is complete and was made from the same input."""
    try:
        report = json.loads((out / REPORT_NAME).read_text())
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if report.get("fingerprint") != fingerprint:
        return None
    for shards in manifest.get("splits", {}).values():
        for s in shards:
            p = out / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                return None
    return BuildResult(out=out, manifest=manifest, report=report, summary=format_summary(report))


def format_summary(report: dict[str, Any]) -> str:
    """The end-of-build summary printed to the console (also derivable from ``report.json``)."""
    lines = [f"audio shards: {report['input']} → {report['output']}",
             f"  files: {report['files']} audio ({report['good_files']} used, "
             f"{report['skipped_files']} skipped)"
             + (f", {sum(report['ignored_non_audio'].values())} non-audio ignored"
                if report["ignored_non_audio"] else "")]
    if report["split_file"]:
        lines.append(f"  split file {report['split_file']}: {report['split_from_file']} files listed, "
                     f"{report['split_by_hash']} not listed (split by hash)")
    for s in SPLITS:
        if report["pieces"][s] or s != "test":
            lines.append(f"  {s:5s}: {report['pieces'][s]:5d} pieces  {report['segments'][s]:6d} segments  "
                         f"{report['hours'][s]:8.3f} h  {report['shards'][s]:4d} shards")
    if report["pieces"]["valid"] == 0 and report["good_files"]:
        lines.append("  note: the valid split is empty (too few pieces, or valid_fraction = 0)")
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])}:")
        for item in report["skipped"]:
            lines.append(f"    {item['source']}: {item['reason']}")
    lines.append(f"  wall time {report['wall_seconds']:.1f} s; report: "
                 f"{os.path.join(report['output'], REPORT_NAME)}")
    return "\n".join(lines)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
