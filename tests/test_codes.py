"""Code precompute: exact chunked encoding, code shards key for key with their sources, restart
after SIGKILL with byte-identical results, fingerprints checked everywhere they are read."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stackutil import export_untrained, make_audio, tiny_stack, untrained  # noqa: E402

from largewave import stack  # noqa: E402
from largewave.codes import (CodesError, CodesNotReady, FingerprintError, code_dtype,  # noqa: E402
                             encode_sequence, encode_sequences, precompute_codes)
from largewave.config import ConfigError  # noqa: E402
from largewave.data.loader import EvalLoader, TrainLoader  # noqa: E402
from largewave.data.manifest import read_manifest  # noqa: E402


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def tar_read(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def set_digest(root: Path) -> dict[str, str]:
    """sha256 of every shard and of the manifest of a code set."""
    return {p.name: sha(p) for p in sorted(Path(root).iterdir()) if p.suffix in (".tar", ".json")
            and not p.name.startswith(".")}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def built(tmp_path):
    """A tiny stack with audio shards and an untrained level-1 export."""
    cfg = tiny_stack(tmp_path)
    make_audio(cfg)
    export_untrained(cfg, "level1")
    return cfg


# ---- chunked encoding ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("level", ["level1", "level2"])
def test_chunked_encoding_equals_whole(tmp_path, level):
    # a wider encoder than the tiny stack's, so that windows see a long context (2·(1+1+2+4+8+16) = 64)
    cfg = tiny_stack(tmp_path, f"{level}.encoder.layers_per_stack=5")
    model = untrained(cfg, level, seed=3)
    hop, ctx = model.hop, model.encoder.context
    assert ctx > 2 * hop  # windows really overlap by more than a frame
    vocab = cfg.vocab(level)
    g = torch.Generator().manual_seed(0)
    lengths = [403, 24 * hop + 1, 5 * hop, hop - 1]  # not multiples of any chunk; one too short for a frame
    seqs = []
    for n in lengths:
        if level == "level1":  # a wandering waveform in mu-law classes, not white noise
            x = torch.cumsum(torch.randn(n, generator=g), 0)
            seqs.append(((torch.tanh(x / 8) + 1) * (vocab - 1) / 2).round().long())
        else:
            seqs.append(torch.randint(0, vocab, (n,), generator=g))
    whole = [model.encode(s[None, : len(s) // hop * hop])[0].numpy() if len(s) >= hop else np.zeros(0, np.int64)
             for s in seqs]
    assert len(np.unique(whole[0])) > 1  # the test would be vacuous on a constant code stream
    for chunk in (1, 3, 7, 10_000):
        for batch in (1, 4, None):  # None: as many windows per forward as the memory budget allows
            for s, w in zip(seqs, whole):
                got = encode_sequence(model, s, chunk_frames=chunk, batch_chunks=batch)
                assert got.dtype == np.int64 and got.shape == w.shape
                np.testing.assert_array_equal(got, w, err_msg=f"chunk_frames={chunk} batch_chunks={batch} T={len(s)}")
        # several sequences whose windows share batches
        for got, w in zip(encode_sequences(model, [s.numpy() for s in seqs], chunk_frames=chunk, batch_chunks=3),
                          whole):
            np.testing.assert_array_equal(got, w)


def test_code_dtype():
    assert code_dtype(256) == np.uint8 and code_dtype(257) == np.uint16
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.uint32


# ---- code shards ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_code_shards_match_source_keys_and_order(built):
    cfg = built
    res = precompute_codes(cfg, "level1", progress=False, log=None)
    assert res.manifest_written and res.shards_skipped == 0
    audio = read_manifest(cfg.path(cfg.data.shards))
    codes = read_manifest(stack.codes_dir(cfg, "level1"))
    hop, K = cfg.level("level1").hop, cfg.level("level1").quantiser.codes
    assert (codes.kind, codes.level, codes.hop, codes.codes, codes.dtype) == ("codes", 1, hop, K, "uint8")
    assert codes.fingerprint == res.fingerprint == stack.expected_fingerprint(cfg, "level1")
    assert codes.token_rate == audio.token_rate / hop
    for split in ("train", "valid", "test"):
        assert audio.splits[split], split  # every split is exercised
        assert [s.name for s in codes.splits[split]] == [s.name for s in audio.splits[split]]
        for a, c in zip(audio.splits[split], codes.splits[split]):
            assert c.keys == a.keys
            assert c.lengths == [n // hop for n in a.lengths]
            assert c.seconds == a.seconds
            members = tar_members(Path(c.url))
            assert members == [f"{k}.{ext}" for k in a.keys for ext in ("codes.npy", "json")]
            data = tar_read(Path(c.url))
            for key, n in zip(a.keys, c.lengths):
                arr = np.load(io.BytesIO(data[f"{key}.codes.npy"]), allow_pickle=False)
                meta = json.loads(data[f"{key}.json"])
                assert arr.dtype == np.uint8 and arr.shape == (n,) and arr.max() < K
                assert meta["key"] == key and meta["split"] == split and meta["source_shard"] == a.name
                assert (meta["level"], meta["hop"], meta["codes"], meta["dtype"], meta["fingerprint"]) == \
                    (1, hop, K, "uint8", res.fingerprint)
            assert c.sha256 == sha(Path(c.url))
    # the loader trains on them, with the fingerprint checked
    loader = TrainLoader(stack.codes_dir(cfg, "level1"), crop=64, hop=2, crops_per_segment=2, batch_size=4,
                         seed=0, fingerprint=res.fingerprint)
    batch = loader.batch(0, 0)
    assert batch.tokens.shape == (4, 64) and int(batch.tokens.max()) < K

    # a second level on the first one's codes, key for key again
    export_untrained(cfg, "level2")
    res2 = precompute_codes(cfg, "level2", progress=False, log=None)
    codes2 = read_manifest(stack.codes_dir(cfg, "level2"))
    assert codes2.level == 2 and codes2.fingerprint == res2.fingerprint != res.fingerprint
    for split in ("train", "valid", "test"):
        assert [s.keys for s in codes2.splits[split]] == [s.keys for s in audio.splits[split]]
    assert stack.codes_status(cfg, "level2") == (True, "ready")
    # what the codes must carry follows from the exports alone (it can name the run folders above)
    shutil.rmtree(cfg.path(cfg.data.codes))
    assert stack.expected_fingerprint(cfg, "level2") == res2.fingerprint
    assert stack.codes_status(cfg, "level2")[1].startswith("missing")


@pytest.mark.timeout(120)
def test_rerun_skips_finished_shards_and_split_tasks_agree(built, tmp_path):
    cfg = built
    first = precompute_codes(cfg, "level1", progress=False, log=None)
    ref = set_digest(Path(first.out))
    again = precompute_codes(cfg, "level1", progress=False, log=None)
    assert (again.shards_done, again.shards_skipped) == (0, 5) and again.manifest_written
    assert set_digest(Path(first.out)) == ref
    # three array tasks into another folder: only the last one finds the set complete
    other = tiny_stack(tmp_path, f"data.shards={cfg.data.shards}", f"data.codes={tmp_path / 'codes-split'}")
    results = [precompute_codes(other, "level1", task_index=i, task_count=3, progress=False, log=None,
                                export=stack.export_path(cfg, "level1")) for i in range(3)]
    assert [r.manifest_written for r in results] == [False, False, True]
    assert sum(r.shards_done for r in results) == 5
    assert set_digest(Path(results[0].out)) == ref


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    import largewave.codes as codes
    from stackutil import tiny_stack
    real = codes.encode_sequences
    def slow(*a, **k):
        time.sleep(0.3)  # so that the kill lands while later shards are being written
        return real(*a, **k)
    codes.encode_sequences = slow
    cfg = tiny_stack({root!r}, "data.codes={codes}")
    codes.precompute_codes(cfg, "level1", progress=False, export={export!r})
""")


@pytest.mark.timeout(180)
def test_sigkill_midway_then_rerun_gives_identical_shards(built, tmp_path):
    cfg = built
    export = str(stack.export_path(cfg, "level1"))
    ref = precompute_codes(cfg, "level1", progress=False, log=None)
    ref_digest = set_digest(Path(ref.out))
    out = tmp_path / "codes-killed" / "level1"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), repo=str(REPO), root=str(tmp_path),
                                codes=tmp_path / "codes-killed", export=export)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".*.done.json")) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    landed = sorted(p.name for p in out.glob("*.tar"))
    assert 1 <= len(landed) < 5, landed
    assert not (out / "manifest.json").exists()  # a half-made set is never complete
    killed = tiny_stack(tmp_path, f"data.shards={cfg.data.shards}", f"data.codes={tmp_path / 'codes-killed'}")
    res = precompute_codes(killed, "level1", progress=False, log=None, export=export)
    assert res.shards_skipped == len(list(out.glob(".*.done.json"))) - res.shards_done
    assert res.shards_skipped >= 1 and res.manifest_written
    assert set_digest(out) == ref_digest
    assert not list(out.glob("*.tmp"))
    m = read_manifest(out)
    for split in m.splits:
        keys = m.keys(split)
        assert len(keys) == len(set(keys))  # no duplicate
        assert keys == read_manifest(cfg.path(cfg.data.shards)).keys(split)  # none missing
        for s in m.splits[split]:
            names = tar_members(Path(s.url))
            assert len(names) == len(set(names)) == 2 * s.samples


# ---- fingerprints ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fingerprint_mismatch_is_refused(built):
    cfg = built
    good = precompute_codes(cfg, "level1", progress=False, log=None).fingerprint
    assert stack.check_codes(cfg, "level2") == good
    assert stack.check_codes(cfg, "level1") is None  # level 1 reads audio

    # level 1 retrained: its export makes other codes; the old set is stale and refused
    export_untrained(cfg, "level1", seed=7)
    new = stack.expected_fingerprint(cfg, "level1")
    assert new != good
    ok, reason = stack.codes_status(cfg, "level1")
    assert not ok and reason.startswith("stale") and good in reason and new in reason
    with pytest.raises(FingerprintError) as e:
        stack.check_codes(cfg, "level2")
    msg = str(e.value)
    assert good in msg and new in msg and "manifest.json" in msg and "largewave codes" in msg
    export_untrained(cfg, "level2")
    with pytest.raises(FingerprintError):  # level-2 codes are not made from stale level-1 codes
        precompute_codes(cfg, "level2", progress=False, log=None)

    # the loader refuses a fingerprint other than the one asked for, naming both
    with pytest.raises(ValueError) as e:
        TrainLoader(stack.codes_dir(cfg, "level1"), crop=32, hop=2, crops_per_segment=1, batch_size=2, seed=0,
                    fingerprint=new)
    assert good in str(e.value) and new in str(e.value)
    with pytest.raises(ValueError):
        EvalLoader(stack.codes_dir(cfg, "level1"), "valid", crop=32, hop=2, batch_size=2, fingerprint=new)

    # recomputing fixes it
    res = precompute_codes(cfg, "level1", progress=False, log=None)
    assert res.shards_done == 5 and res.fingerprint == new
    assert stack.check_codes(cfg, "level2") == new

    # without the level below's export the codes cannot be vouched for, unless asked not to
    stack.export_path(cfg, "level1").unlink()
    with pytest.raises(CodesNotReady, match="level1 has no export"):
        stack.check_codes(cfg, "level2")
    assert stack.check_codes(cfg, "level2", require_export=False) == new


@pytest.mark.timeout(120)
def test_a_shard_with_foreign_codes_is_named(built):
    cfg = built
    fp = precompute_codes(cfg, "level1", progress=False, log=None).fingerprint
    m = read_manifest(stack.codes_dir(cfg, "level1"))
    victim = m.splits["train"][1]
    path = Path(victim.url)
    data = tar_read(path)
    key = victim.keys[0]
    meta = json.loads(data[f"{key}.json"])
    meta["fingerprint"] = "feedfacefeedface"
    data[f"{key}.json"] = json.dumps(meta).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, blob in data.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    with pytest.raises(FingerprintError) as e:
        stack.check_codes(cfg, "level2")
    msg = str(e.value)
    assert victim.name in msg and key in msg and "feedfacefeedface" in msg and fp in msg
    assert stack.check_codes(cfg, "level2", per_shard=0) == fp  # the manifest alone cannot see it


@pytest.mark.timeout(60)
def test_clear_errors_without_export_or_input(tmp_path):
    cfg = tiny_stack(tmp_path)
    with pytest.raises(CodesError, match=r"level1 has no export .*largewave train --stack <config> stack=tiny … --level 1"):
        precompute_codes(cfg, "level1", progress=False, log=None)
    export_untrained(cfg, "level1")
    with pytest.raises(CodesError, match=r"largewave shards build"):
        precompute_codes(cfg, "level1", progress=False, log=None)
    with pytest.raises(CodesError, match=r"prior level: it makes no discrete codes"):
        precompute_codes(cfg, "prior", progress=False, log=None)
    with pytest.raises(CodesNotReady, match=r"codes of level1, which are not ready.*largewave codes --stack <config> stack=tiny … --level 1"):
        stack.check_codes(cfg, "level2")
    # both refusals stop a command line like a bad config does (exit 2, nothing started)
    assert issubclass(CodesNotReady, ConfigError) and issubclass(FingerprintError, ConfigError)
    assert stack.codes_status(cfg, "level1")[1].startswith("missing")
    # the command line says the same and exits 2
    r = subprocess.run([sys.executable, str(REPO / "shards" / "build_codes.py"), "--config", "demo", "--level", "2",
                        *[f"{k}" for k in _overrides(tmp_path)]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: level2 has no export" in r.stderr and "--level 2" in r.stderr


def _overrides(tmp_path: Path) -> list[str]:
    from stackutil import TINY

    return ["stack=tiny", f"run.root={tmp_path / 'runs'}", f"data.shards={tmp_path / 'audio'}",
            f"data.codes={tmp_path / 'codes'}", *TINY]


@pytest.mark.timeout(120)
def test_command_line_builds_the_set(built, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "shards" / "build_codes.py"), "--config", "demo", "--level", "1",
                        "--quiet", *_overrides(tmp_path)], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert "h of audio per minute" in r.stdout and "manifest written" in r.stdout
    assert stack.codes_status(built, "level1") == (True, "ready")
