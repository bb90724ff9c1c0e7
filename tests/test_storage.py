"""Shard sets on object storage: a real S3-compatible server (moto's standalone server on
127.0.0.1, dummy credentials), ``pipe:`` roots, remote code sets, and damaged downloads.

Nothing here is mocked below boto3: the server speaks the S3 HTTP protocol on a loopback port, and
training runs are real ``launch/train.py`` processes that reach it through ``AWS_ENDPOINT_URL_S3``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from largewave import stack
from largewave.codes import precompute_codes
from largewave.config import load_config
from largewave.data import storage
from largewave.data.loader import ShardFetchError, TrainLoader, fetch_shard
from largewave.data.manifest import ManifestError, copy_shard_set, read_manifest
from stackutil import TINY, export_untrained, make_audio, tiny_stack

REPO = Path(__file__).resolve().parent.parent
BUCKET = "lw-test"
GEOM = dict(crop=256, hop=4, crops_per_segment=2, batch_size=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a loopback port; the AWS settings of this process (and of every
    command it starts) point at it. Yields a boto3 client of its own."""
    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._S3.update(pid=None, client=None)  # a client made before this has another endpoint
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._S3.update(pid=None, client=None)


def _batches(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.epoch, x.index, x.keys, x.skipped) == (y.epoch, y.index, y.keys, y.skipped)
        assert torch.equal(x.tokens, y.tokens)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_copy_to_s3_read_back_and_train_batches_identical(s3, tmp_path):
    cfg = tiny_stack(tmp_path)
    make_audio(cfg)
    local = cfg.path(cfg.data.shards)
    url = f"s3://{BUCKET}/copy/audio"
    done = copy_shard_set(local, url, progress=False)
    m_local, m_remote = read_manifest(local), read_manifest(url)
    shards = [s for split in m_local.splits.values() for s in split]
    assert done == {"copied": len(shards), "skipped": 0, "bytes": sum(s.bytes for s in shards)}
    assert m_remote.to_dict() == m_local.to_dict()
    assert m_remote.urls("train")[0] == f"{url}/train-000000.tar"
    for s in shards:  # the objects are the shards, byte for byte, with their checksum as metadata
        obj = s3.get_object(Bucket=BUCKET, Key=f"copy/audio/{s.name}")
        assert _digest(obj["Body"].read()) == s.sha256 and obj["Metadata"]["sha256"] == s.sha256
    # the loader reads the remote set through its cache, with workers, into the same batches
    ref = _batches(TrainLoader(local, seed=0, **GEOM), 5)
    remote = TrainLoader(url, seed=0, cache_dir=tmp_path / "cache", num_workers=2, **GEOM)
    _same(ref, _batches(remote, 5))
    assert len(list((tmp_path / "cache").glob("*/train-*.tar"))) == len(m_local.shards("train"))
    # a second copy finds everything there; a copy back down is byte-identical
    assert copy_shard_set(local, url, progress=False)["skipped"] == len(shards)
    back = tmp_path / "back"
    copy_shard_set(url, back, progress=False)
    for s in shards:
        assert _digest((back / s.name).read_bytes()) == s.sha256
    assert read_manifest(back).to_dict() == m_local.to_dict()


def test_missing_and_unreachable_locations_are_named(s3, tmp_path):
    with pytest.raises(ManifestError, match=rf"incomplete shard set: s3://{BUCKET}/nothing/manifest.json not found"):
        read_manifest(f"s3://{BUCKET}/nothing")
    with pytest.raises(ManifestError, match="the bucket does not exist"):
        read_manifest("s3://no-such-bucket/set")
    cfg = tiny_stack(tmp_path)
    make_audio(cfg)
    s3.put_object(Bucket=BUCKET, Key="half/train-000000.tar", Body=b"x")  # shards but no manifest
    with pytest.raises(ManifestError, match="1 shard.s. there but no manifest.json"):
        read_manifest(f"s3://{BUCKET}/half")
    with pytest.raises(ManifestError, match=r"needs \{name\}"):
        read_manifest(f"pipe:cat {cfg.path(cfg.data.shards)}/manifest.json")
    with pytest.raises(ManifestError, match="exited with status 1"):
        read_manifest(f"pipe:cat {tmp_path}/nowhere/{{name}}")
    # a pipe: root with {name}: the manifest and the shards come through the command
    m = read_manifest(f"pipe:cat {cfg.path(cfg.data.shards)}/{{name}}")
    assert m.urls("train")[0] == f"pipe:cat {cfg.path(cfg.data.shards)}/train-000000.tar"
    with pytest.raises(ManifestError, match="read-only"):
        copy_shard_set(cfg.path(cfg.data.shards), f"pipe:cat {tmp_path}/{{name}}", progress=False)


def test_damaged_object_is_refetched_then_reported(s3, tmp_path, caplog):
    cfg = tiny_stack(tmp_path)
    make_audio(cfg)
    local = cfg.path(cfg.data.shards)
    url = f"s3://{BUCKET}/damaged/audio"
    copy_shard_set(local, url, progress=False)
    shard = read_manifest(url).shards("train")[0]
    good = s3.get_object(Bucket=BUCKET, Key=f"damaged/audio/{shard.name}")["Body"].read()

    # corrupted on the server (one byte flipped, same length): every try disagrees → reported, not used
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=f"damaged/audio/{shard.name}", Body=bytes(bad))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="largewave.data.loader"):
        with pytest.raises(ShardFetchError, match=rf"{shard.url} could not be fetched intact in 3 tries.*sha256"):
            loader = TrainLoader(url, seed=0, cache_dir=cache, **GEOM)
            _batches(loader, loader.batches_per_epoch)  # an epoch reads every shard
    assert sum("downloaded copy is damaged" in r.getMessage() for r in caplog.records) == 3
    assert not list(cache.glob(f"*/{shard.name}")), "a damaged copy must never enter the cache"

    # truncated on the server: the size disagrees
    s3.put_object(Bucket=BUCKET, Key=f"damaged/audio/{shard.name}", Body=good[: len(good) // 3])
    with pytest.raises(ShardFetchError, match=rf"{len(good) // 3} bytes, the manifest says {len(good)}"):
        fetch_shard(shard.url, shard.name, cache, shard.sha256, size=shard.bytes)

    # damaged only in transit, the first time: fetched again and used
    s3.put_object(Bucket=BUCKET, Key=f"damaged/audio/{shard.name}", Body=good)
    flaky = tmp_path / "flaky.sh"
    count = tmp_path / "count"
    flaky.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
if [ "$n" = 0 ]; then head -c 1000 "$1"; else cat "$1"; fi
""")
    flaky.chmod(0o755)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="largewave.data.loader"):
        path = fetch_shard(f"pipe:{flaky} {local}/{shard.name}", shard.name, tmp_path / "cache2", shard.sha256,
                           size=shard.bytes)
    assert _digest(Path(path).read_bytes()) == shard.sha256 and count.read_text().strip() == "2"
    assert any("fetching it again" in r.getMessage() for r in caplog.records)
    # a cached copy damaged on local disk later (size changed) is fetched again, not read
    Path(path).write_bytes(b"short")
    assert _digest(Path(fetch_shard(f"pipe:cat {local}/{shard.name}", shard.name, tmp_path / "cache2",
                                    shard.sha256, size=shard.bytes)).read_bytes()) != _digest(b"short")


def test_codes_precompute_writes_to_s3_like_locally(s3, tmp_path):
    cfg_local = tiny_stack(tmp_path / "local")
    make_audio(cfg_local)
    export_untrained(cfg_local, "level1")
    precompute_codes(cfg_local, "level1", progress=False, log=None)
    url = f"s3://{BUCKET}/codes-test"
    copy_shard_set(cfg_local.path(cfg_local.data.shards), f"{url}/audio", progress=False)
    cfg = tiny_stack(tmp_path / "remote", f"data.shards={url}/audio", f"data.codes={url}/codes")
    # the same export (a run folder is named by the data root, so place it where this config looks)
    target = stack.export_path(cfg, "level1")
    target.parent.mkdir(parents=True)
    target.write_bytes(stack.export_path(cfg_local, "level1").read_bytes())
    os.environ["LARGEWAVE_CACHE"] = str(tmp_path / "lwcache")  # staging and shard cache of this test
    try:
        first = precompute_codes(cfg, "level1", task_index=0, task_count=2, progress=False, log=None)
        assert not first.manifest_written
        with pytest.raises(ManifestError, match="incomplete shard set"):
            read_manifest(stack.codes_dir(cfg, "level1"))
        second = precompute_codes(cfg, "level1", task_index=1, task_count=2, progress=False, log=None)
        assert second.manifest_written and second.out == f"{url}/codes/level1"
        again = precompute_codes(cfg, "level1", progress=False, log=None)
        assert again.shards_done == 0 and again.shards_skipped == first.shards_done + second.shards_done
        # staged shards are removed once uploaded
        assert not list((tmp_path / "lwcache" / "staging").rglob("*.tar"))
    finally:
        os.environ.pop("LARGEWAVE_CACHE")
    mine = read_manifest(stack.codes_dir(cfg, "level1")).to_dict()
    theirs = read_manifest(stack.codes_dir(cfg_local, "level1")).to_dict()
    assert mine == theirs  # same shards, keys, checksums and fingerprint as the local precompute
    assert stack.check_codes(cfg, "level2") == stack.expected_fingerprint(cfg, "level1")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_from_s3_codes_to_s3_and_a_damaged_shard_stops_cleanly(s3, tmp_path):
    """Level 1 trains on shards served by the S3 server, its codes are written there, level 2
    trains on those; then a shard damaged on the server stops a fresh run with a named error."""
    url = f"s3://{BUCKET}/e2e"
    steps = "train.steps=3 train.micro_batch=2 train.eval_every=3 train.sample_every=1000 train.save_every=3".split()
    overrides = ["stack=tiny", f"run.root={tmp_path / 'runs'}", f"data.shards={url}/audio", f"data.codes={url}/codes",
                 "run.wandb_mode=disabled", "data.workers=1", *TINY,
                 *[f"{level}.{s}" for level in ("level1", "level2") for s in steps]]
    cfg = load_config("demo", [*overrides, f"data.shards={tmp_path / 'audio'}"])
    make_audio(cfg, pieces=3, seconds=3.0)
    env = dict(os.environ, LARGEWAVE_CACHE=str(tmp_path / "lwcache"))

    def run(*args: str, expect: int = 0, extra: tuple[str, ...] = (), config: bool = True):
        r = subprocess.run([sys.executable, *args, *(overrides if config else ()), *extra], cwd=REPO, capture_output=True, text=True,
                           timeout=400, env=env)
        assert r.returncode == expect, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r

    r = run("shards/copy_set.py", str(tmp_path / "audio"), f"{url}/audio", "--quiet", config=False)
    assert "manifest written" in r.stdout
    run("launch/train.py", "--stack", "demo", "--level", "1")
    run("shards/build_codes.py", "--config", "demo", "--level", "1", "--quiet")
    rcfg = load_config("demo", overrides)
    assert read_manifest(stack.codes_dir(rcfg, "level1")).fingerprint == stack.expected_fingerprint(rcfg, "level1")
    run("launch/train.py", "--stack", "demo", "--level", "2")
    assert stack.export_path(rcfg, "level2").exists()

    shards = read_manifest(f"{url}/audio").shards("train")
    for shard in shards:  # every train shard, so that the first batch meets one
        s3.put_object(Bucket=BUCKET, Key=f"e2e/audio/{shard.name}", Body=b"not a tar" * 100)
    env["LARGEWAVE_SHARD_CACHE"] = str(tmp_path / "fresh-cache")
    r = run("launch/train.py", "--stack", "demo", "--level", "1", expect=2,
            extra=(f"run.root={tmp_path / 'runs2'}",))
    assert re.search(rf"error: shard {url}/audio/train-\d+.tar could not be fetched intact in 3 tries", r.stderr)
    assert "Traceback" not in r.stderr
