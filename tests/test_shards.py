"""The audio shard builder (largewave.data.shards, shards/build_audio.py) and the manifest."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from largewave.audio import decode_flac, float_to_pcm16, load_audio
from largewave.data.manifest import ManifestError, read_manifest, write_manifest
from largewave.data.shards import (BuildError, _ordered_map, build_audio_shards, hash_splits, piece_id,
                                   read_split_file, segment_bounds)
from conftest import skip_because

ROOT = Path(__file__).resolve().parent.parent


def piano_like(rate, seconds, channels=1, seed=0):
    """A decaying chord with a little noise: [frames x channels] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 1500, 3))
    x = x * np.exp(-(t % 1.0) * 2) + 0.01 * rng.standard_normal(t.size)
    return np.stack([x * (0.8 + 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def write(path, rate, seconds, channels=1, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, piano_like(rate, seconds, channels, seed), rate, **kw)
    return path


def read_tar(path):
    """{key: {"flac": bytes, "json": dict}} in tar order, plus the raw member infos."""
    out, infos = {}, []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            infos.append(m)
            key, ext = m.name.split(".", 1)
            data = tar.extractfile(m).read()
            out.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return out, infos


def all_samples(out):
    m = read_manifest(out)
    samples = {}
    for split in ("train", "valid", "test"):
        for shard in m.shards(split):
            got, _ = read_tar(shard.url)
            assert list(got) == shard.keys
            samples.update(got)
    return m, samples


def sha_all(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir()) if p.suffix == ".tar" or p.name == "manifest.json"}


def build(src, out, **kw):
    kw = {"segment_seconds": 1.0, "shard_mb": 0.1, "workers": 0, "progress": False, "log": lambda s: None, **kw}
    return build_audio_shards(src, out, **kw)


@pytest.fixture
def mixed(tmp_path):
    """Several formats, rates and channel counts, in nested folders."""
    src = tmp_path / "in"
    write(src / "a" / "stereo44.wav", 44100, 2.5, channels=2, seed=1, subtype="PCM_16")
    write(src / "a" / "b" / "mono22.flac", 22050, 1.7, seed=2)
    write(src / "ogg48.ogg", 48000, 1.2, channels=2, seed=3)
    write(src / "mp3.mp3", 44100, 2.0, seed=4)
    write(src / "low8k.aiff", 8000, 0.6, seed=5, subtype="PCM_24")  # shorter than one segment
    write(src / "float16k.wav", 16000, 3.2, seed=6, subtype="FLOAT")
    (src / "notes.txt").write_text("ignored")
    return src


# ---- helpers --------------------------------------------------------------------------------


def test_segment_bounds_cover_everything():
    assert segment_bounds(0, 10) == []
    assert segment_bounds(7, 10) == [(0, 7)]
    assert segment_bounds(25, 10) == [(0, 10), (10, 15)]  # the remainder joins the last segment
    for n in range(1, 100):
        b = segment_bounds(n, 10)
        assert sum(length for _, length in b) == n
        assert all(s2 == s1 + l1 for (s1, l1), (s2, _) in zip(b, b[1:]))
        assert all(length >= 10 for _, length in b) or len(b) == 1


def test_piece_ids_are_stable_slugs():
    pid = piece_id("2018/MIDI-Unprocessed_01.R1.wav")
    assert pid == piece_id("2018/MIDI-Unprocessed_01.R1.wav")
    assert pid.startswith("2018-midi-unprocessed-01-r1-") and "." not in pid
    assert piece_id("x/a.wav") != piece_id("x/a.flac")


def test_hash_splits_deterministic_and_nonempty():
    ids = [f"p{i}" for i in range(20)]
    s = hash_splits(ids, 0, 0.1, 0.1)
    assert s == hash_splits(list(reversed(ids)), 0, 0.1, 0.1)  # order of input does not matter
    assert sorted(s.values()).count("valid") == 2 and sorted(s.values()).count("test") == 2
    assert hash_splits(ids, 1, 0.1, 0.1) != s  # the seed matters
    assert sorted(hash_splits(["a", "b"], 0, 0.1, 0.0).values()) == ["train", "valid"]
    assert hash_splits(["a"], 0, 0.1, 0.0) == {"a": "train"}


def square_or_die(x):
    if x == 5:
        os._exit(3)  # what a decoder library segfaulting on a hostile file looks like to the pool
    return x * x


@pytest.mark.timeout(60)
def test_worker_crash_is_isolated_to_its_file():
    jobs = [(x,) for x in range(9)]
    got = list(_ordered_map(square_or_die, jobs, 2, on_crash=lambda job: f"crashed {job[0]}"))
    assert got == [0, 1, 4, 9, 16, "crashed 5", 36, 49, 64]


# ---- builds ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_mixed_folder_round_trip_bitwise(mixed, tmp_path):
    out = tmp_path / "out"
    res = build(mixed, out, valid_fraction=0.3)
    m, samples = all_samples(out)
    assert res.report["skipped"] == [] and res.report["ignored_non_audio"] == {".txt": 1}
    assert res.report["good_files"] == 6
    sources = {}
    for key, smp in samples.items():
        meta = smp["json"]
        assert key == meta["key"] == f"{meta['piece']}-s{meta['segment']:03d}"
        sources.setdefault(meta["source"], []).append(meta)
    assert sorted(sources) == sorted(["a/stereo44.wav", "a/b/mono22.flac", "ogg48.ogg", "mp3.mp3",
                                      "low8k.aiff", "float16k.wav"])
    for rel, metas in sources.items():
        x, info = load_audio(mixed / rel)
        pcm = float_to_pcm16(x)
        metas.sort(key=lambda d: d["segment"])
        assert (metas[0]["orig_rate"], metas[0]["orig_channels"]) == (info.orig_rate, info.orig_channels)
        stored = [decode_flac(samples[d["key"]]["flac"]) for d in metas]
        assert all(rate == 16000 for _, rate in stored)
        joined = np.concatenate([p for p, _ in stored])
        assert np.array_equal(joined, pcm)  # bitwise: nothing dropped, nothing changed
        assert [d["start"] for d in metas] == list(np.cumsum([0] + [d["samples"] for d in metas[:-1]]))
        assert all(d["samples"] >= 16000 for d in metas) or len(metas) == 1
    lengths = {k: n for s in m.splits.values() for sh in s for k, n in zip(sh.keys, sh.lengths)}
    assert lengths == {k: smp["json"]["samples"] for k, smp in samples.items()}
    assert sum(m.hours.values()) == pytest.approx(sum(lengths.values()) / 16000 / 3600)
    assert m.verify() == []


def test_shards_are_deterministic_tars_webdataset_reads(mixed, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    build(mixed, out, shard_mb=0.05)
    m = read_manifest(out)
    assert len(m.shards("train")) >= 2  # small target size → several shards
    for shard in m.shards("train"):
        assert Path(shard.url).name == shard.name and shard.name.startswith("train-")
        _, infos = read_tar(shard.url)
        assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" and i.gname == ""
                   for i in infos)
    keys = [s["__key__"] for s in wds.WebDataset(m.urls("train"), shardshuffle=False)]
    assert keys == m.keys("train")
    assert not list(out.glob(".*.tmp"))


@pytest.mark.timeout(180)
def test_rebuild_is_byte_identical(mixed, tmp_path):
    build(mixed, tmp_path / "one", workers=0)
    build(mixed, tmp_path / "two", workers=2)  # parallel decoding gives the same bytes
    first = sha_all(tmp_path / "one")
    assert first == sha_all(tmp_path / "two")
    build(mixed, tmp_path / "one", workers=0, force=True)  # rebuilding in place, too
    assert sha_all(tmp_path / "one") == first


def test_unchanged_input_is_not_rebuilt(mixed, tmp_path):
    out = tmp_path / "out"
    logs = []
    build(mixed, out, log=logs.append)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    build(mixed, out, log=logs.append)
    assert "up to date" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamp
    write(mixed / "new.wav", 16000, 1.0, seed=7)  # a new file → rebuilt, and it is in the set
    build(mixed, out, log=logs.append)
    assert "up to date" not in logs[-1]
    _, samples = all_samples(out)
    assert "new.wav" in {s["json"]["source"] for s in samples.values()}
    build(mixed, out, segment_seconds=2.0, log=logs.append)  # a changed setting → rebuilt
    assert "up to date" not in logs[-1]


def test_rebuild_removes_stale_shards(mixed, tmp_path):
    out = tmp_path / "out"
    build(mixed, out, shard_mb=0.02)
    many = {p.name for p in out.glob("*.tar")}
    build(mixed, out, shard_mb=100)
    few = {p.name for p in out.glob("*.tar")}
    assert len(few) < len(many)
    listed = {s.name for ss in read_manifest(out).splits.values() for s in ss}
    assert few == listed


def test_no_piece_in_two_splits(tmp_path):
    src = tmp_path / "in"
    for i in range(12):
        write(src / f"piece{i:02d}.wav", 16000, 2.3, seed=i)
    res = build(src, tmp_path / "out", valid_fraction=0.2, test_fraction=0.2)
    _, samples = all_samples(tmp_path / "out")
    split_of_piece = {}
    for smp in samples.values():
        meta = smp["json"]
        assert split_of_piece.setdefault(meta["piece"], meta["split"]) == meta["split"]
    counts = {s: list(split_of_piece.values()).count(s) for s in ("train", "valid", "test")}
    assert counts == {"train": 8, "valid": 2, "test": 2}  # round(12 · 0.2) pieces each
    assert res.report["pieces"] == counts


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    src = tmp_path / "in"
    good = [write(src / "good1.wav", 44100, 1.5, seed=1),
            write(src / "sub" / "good2.flac", 16000, 2.0, seed=2),
            write(src / "good3.ogg", 22050, 1.0, seed=3)]
    (src / "empty.wav").write_bytes(b"")
    (src / "notaudio.wav").write_bytes(b"this is a text file, not a RIFF/WAVE file\n" * 20)
    nan = piano_like(16000, 1.0)
    nan[500, 0] = np.nan
    sf.write(src / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = piano_like(16000, 1.0)
    inf[800, 0] = np.inf
    sf.write(src / "inf.wav", inf, 16000, subtype="FLOAT")
    whole = write(tmp_path / "whole.wav", 44100, 2.0, subtype="PCM_16").read_bytes()
    (src / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    flac = write(tmp_path / "whole.flac", 44100, 2.0).read_bytes()
    (src / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(src / "zero_frames.wav", np.zeros((0, 1), np.float32), 16000)
    os.symlink(tmp_path / "does-not-exist.wav", src / "unreadable.wav")  # a dangling link
    (src / "._good1.wav").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: ignored

    out = tmp_path / "out"
    res = build(src, out)
    reasons = {s["source"]: s["reason"] for s in res.report["skipped"]}
    expect = {"empty.wav": "empty", "notaudio.wav": "not an audio file", "nan.wav": "non-finite",
              "inf.wav": "non-finite", "truncated.wav": "truncated", "truncated.flac": "truncated",
              "zero_frames.wav": "no audio frames", "unreadable.wav": "unreadable"}
    assert set(reasons) == set(expect)
    for name, word in expect.items():
        assert word in reasons[name], (name, reasons[name])
    # every good file is in the shards, and the report on disk and the summary say the same
    _, samples = all_samples(out)
    assert {s["json"]["source"] for s in samples.values()} == {p.relative_to(src).as_posix() for p in good}
    assert res.report["ignored_non_audio"] == {"(hidden file)": 1}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["skipped"] == res.report["skipped"]
    for name, reason in reasons.items():
        assert f"{name}: {reason}" in res.summary


def test_unreadable_file_without_root(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        skip_because("root", "root reads files whatever their permissions (the dangling-link case covers unreadable)")
    src = tmp_path / "in"
    write(src / "ok.wav", 16000, 1.0)
    locked = write(src / "locked.wav", 16000, 1.0)
    locked.chmod(0)
    res = build(src, tmp_path / "out")
    assert [s["source"] for s in res.report["skipped"]] == ["locked.wav"]
    assert "unreadable" in res.report["skipped"][0]["reason"]


def test_split_file_is_honoured(tmp_path):
    src = tmp_path / "in"
    for i in range(6):
        write(src / "2018" / f"perf{i}.wav", 16000, 1.2, seed=i)
    write(src / "extra.wav", 16000, 1.2, seed=9)  # not listed: split by hash
    csv = tmp_path / "maestro-v3.0.0.csv"
    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    given = {0: "train", 1: "validation", 2: "test", 3: "train", 4: "validation", 5: "train"}
    for i, s in given.items():
        rows.append(f'Bach,"Title, {i}",{s},2018,2018/perf{i}.midi,2018/perf{i}.wav,1.2')
    csv.write_text("\n".join(rows) + "\n")
    assert read_split_file(csv)["2018/perf1.wav"] == "valid"
    res = build(src, tmp_path / "out", split_file=csv, valid_fraction=0.0)
    _, samples = all_samples(tmp_path / "out")
    got = {s["json"]["source"]: s["json"]["split"] for s in samples.values()}
    for i, s in given.items():
        assert got[f"2018/perf{i}.wav"] == {"validation": "valid"}.get(s, s)
    assert got["extra.wav"] == "train"
    assert (res.report["split_from_file"], res.report["split_by_hash"]) == (6, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,fold\na.wav,1\n")
    with pytest.raises(BuildError, match="split"):
        build(src, tmp_path / "out2", split_file=bad)


def test_symlinked_folders_are_followed_once(tmp_path):
    src, outside = tmp_path / "in", tmp_path / "elsewhere"
    write(src / "here.wav", 16000, 1.0)
    write(outside / "there.flac", 16000, 1.0)
    os.symlink(outside, src / "linked")
    os.symlink(src, src / "loop")  # a cycle must not recurse forever nor duplicate pieces
    res = build(src, tmp_path / "out")
    _, samples = all_samples(tmp_path / "out")
    assert sorted({s["json"]["source"] for s in samples.values()}) == ["here.wav", "linked/there.flac"]
    assert res.report["files"] == 2


def test_errors_are_clear(tmp_path):
    with pytest.raises(BuildError, match="not found"):
        build(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no audio files"):
        build(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_text("nope")
    with pytest.raises(BuildError, match="no usable audio"):
        build(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert "x.wav" in (tmp_path / "out" / "report.json").read_text()


# ---- manifest -------------------------------------------------------------------------------


def test_manifest_missing_means_incomplete(tmp_path, mixed):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ManifestError, match="incomplete shard set"):
        read_manifest(tmp_path / "half")
    with pytest.raises(ManifestError):  # invalid manifests are refused before writing
        write_manifest(tmp_path / "half", {"kind": "pictures", "sample_rate": 1, "token_rate": 1})
    assert not (tmp_path / "half" / "manifest.json").exists()


def test_manifest_codes_fields_and_http(tmp_path, mixed):
    out = tmp_path / "out"
    build(mixed, out)
    d = json.loads((out / "manifest.json").read_text())
    d.update(kind="codes", token_rate=2000.0, level=1, hop=8, codes=64, dtype="uint8", fingerprint="abc")
    write_manifest(tmp_path / "codes", d)
    m = read_manifest(tmp_path / "codes")
    assert (m.kind, m.level, m.hop, m.codes, m.dtype, m.fingerprint) == ("codes", 1, 8, 64, "uint8", "abc")
    assert m.to_dict() == {**d}
    del d["fingerprint"]
    with pytest.raises(ManifestError, match="fingerprint"):
        write_manifest(tmp_path / "codes2", d)

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/out"
        m = read_manifest(url)
        assert m.urls("train")[0] == f"{url}/train-000000.tar"
        assert m.keys("train") == read_manifest(out).keys("train")
        with pytest.raises(ManifestError, match="incomplete shard set"):
            read_manifest(f"http://127.0.0.1:{server.server_address[1]}/in")
    finally:
        server.shutdown()


# ---- CLI ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_builds_and_reports(mixed, tmp_path):
    (mixed / "broken.wav").write_bytes(b"RIFF....")
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "shards" / "build_audio.py"), "--config", "demo", "--input", str(mixed),
           "--out", str(out), "--quiet", "data.segment_seconds=1", "data.workers=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "broken.wav" in r.stdout and "skipped" in r.stdout
    assert read_manifest(out).samples("train") > 0
    r = subprocess.run(cmd[:4] + ["--input", str(tmp_path / "missing"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: input folder not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:4] + ["--input", str(mixed), "data.segment_seconds=-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "segment_seconds" in r.stderr and "Traceback" not in r.stderr
