"""The training/eval loader: determinism, exact resume, rank balance, corrupt samples, codes."""
from __future__ import annotations

import collections
import functools
import http.server
import random
import shutil
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from largewave.audio import mulaw_encode
from largewave.data.loader import Batch, EvalLoader, TrainLoader
from largewave.data.manifest import ManifestError
from conftest import ensure_program
from shardutil import make_audio_shards, make_code_shards

# 6 segments of exactly 1 s (16,000 samples) in 2 shards: with crop 1000 every segment holds 16
# crops = 4 units of 4 crops, 24 units in all.
GEOM = dict(crop=1000, hop=8, crops_per_segment=4, batch_size=4)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    train = make_audio_shards(root, pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=3)
    valid = make_audio_shards(root, pieces=2, seconds=[1.3, 0.7], segment_seconds=1.0, per_shard=1,
                              split="valid")
    return train, valid


def _batches(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # stops the loader's workers
    return out


def _same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.epoch, x.index, x.keys, x.skipped) == (y.epoch, y.index, y.keys, y.skipped)
        assert torch.equal(x.offsets, y.offsets)
        assert torch.equal(x.tokens, y.tokens)
        assert (x.mask is None) == (y.mask is None) and (x.mask is None or torch.equal(x.mask, y.mask))


@pytest.mark.timeout(60)
def test_batches_are_mulaw_crops_aligned_to_hop(audio):
    train, _ = audio
    loader = TrainLoader(train.root, seed=0, **GEOM)
    assert loader.batches_per_epoch == 24  # 24 units, one unit (4 crops) per batch
    for b in _batches(loader, 6):
        assert b.tokens.dtype == torch.long and b.tokens.shape == (4, 1000)
        assert b.offsets.dtype == torch.long and b.offsets.shape == (4,)
        assert len(b.keys) == 4 and b.mask is None
        for row, key, off in zip(b.tokens, b.keys, b.offsets.tolist()):
            assert off % 8 == 0 and 0 <= off <= 16000 - 1000
            assert np.array_equal(row.numpy(), mulaw_encode(train.data[key][off:off + 1000]))


@pytest.mark.timeout(90)
def test_deterministic_and_independent_of_workers(audio):
    train, _ = audio
    n = 30  # crosses into the second epoch
    ref = _batches(TrainLoader(train.root, seed=3, num_workers=0, **GEOM), n)
    _same(ref, _batches(TrainLoader(train.root, seed=3, num_workers=0, **GEOM), n))
    _same(ref, _batches(TrainLoader(train.root, seed=3, num_workers=2, **GEOM), n))
    _same(ref, _batches(TrainLoader(train.root, seed=3, num_workers=1, **GEOM), n))
    assert [(b.epoch, b.index) for b in ref[23:26]] == [(0, 23), (1, 0), (1, 1)]
    other = _batches(TrainLoader(train.root, seed=4, **GEOM), n)
    assert any(a.keys != b.keys or not torch.equal(a.offsets, b.offsets) for a, b in zip(ref, other))
    # A new epoch is a new order.
    assert [b.keys for b in ref[:6]] != [b.keys for b in ref[24:30]] or \
        not all(torch.equal(a.offsets, b.offsets) for a, b in zip(ref[:6], ref[24:30]))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop,workers_before,workers_after", [(7, 2, 0), (23, 0, 2), (31, 2, 1)])
def test_exact_resume_with_other_worker_count(audio, stop, workers_before, workers_after):
    train, _ = audio
    total = stop + 8
    ref = _batches(TrainLoader(train.root, seed=1, **GEOM), total)

    first = TrainLoader(train.root, seed=1, num_workers=workers_before, **GEOM)
    it = iter(first)
    got = [next(it) for _ in range(stop)]
    state = first.state_dict()  # workers have prefetched further; the state counts consumed batches
    it.close()
    assert (state["epoch"], state["index"]) == divmod(stop, 24)

    second = TrainLoader(train.root, seed=1, num_workers=workers_after, **GEOM)
    second.load_state_dict(state)
    got += _batches(second, total - stop)
    _same(ref, got)


@pytest.mark.timeout(60)
def test_resume_far_in_is_immediate(audio):
    train, _ = audio
    loader = TrainLoader(train.root, seed=5, **GEOM)
    state = loader.state_dict()
    state["epoch"], state["index"] = divmod(10_000 + 7, loader.batches_per_epoch)
    t0 = time.perf_counter()
    resumed = TrainLoader(train.root, seed=5, **GEOM)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"resume 10^4 batches in took {elapsed:.2f} s"
    _same([batch], [loader.batch(*divmod(10_007, loader.batches_per_epoch))])


def _units(loader) -> tuple[int, set]:
    """Batches in one epoch and the (key, offsets) of every unit (one decode) they hold."""
    units = set()
    batches = _batches(loader, loader.batches_per_epoch)
    assert (loader.epoch, loader.index) == (1, 0)
    for b in batches:
        for u in range(0, len(b.keys), loader.plan.cps):
            units.add((b.keys[u], tuple(b.offsets[u:u + loader.plan.cps].tolist())))
    return len(batches), units


@pytest.mark.timeout(60)
def test_ranks_disjoint_cover_epoch_and_balanced(tmp_path):
    # One shard < 2 ranks × 2 workers: balanced anyway, the split is by unit, not by shard.
    train = make_audio_shards(tmp_path, pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=6)
    assert len(train.shards) == 1
    per_rank = [_units(TrainLoader(train.root, seed=0, rank=r, world_size=2, num_workers=2, **GEOM))
                for r in range(2)]
    assert per_rank[0][0] == per_rank[1][0] == 12
    assert not per_rank[0][1] & per_rank[1][1]
    union = per_rank[0][1] | per_rank[1][1]
    assert len(union) == 24  # every unit of the epoch exactly once
    assert collections.Counter(k for k, _ in union) == {k: 4 for k in train.keys}

    # An uneven world: equal counts, disjoint, at most one global batch's worth left out.
    per_rank = [_units(TrainLoader(train.root, seed=0, rank=r, world_size=5, **GEOM)) for r in range(5)]
    assert {n for n, _ in per_rank} == {4}
    sets = [u for _, u in per_rank]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 20


@pytest.mark.timeout(60)
def test_iterating_leaves_global_rng_alone(audio):
    train, _ = audio
    torch.manual_seed(1234)
    np.random.seed(1)
    random.seed(2)
    before = (torch.initial_seed(), torch.get_rng_state().clone(), np.random.get_state()[1].copy(),
              random.getstate())
    for workers in (0, 2):
        loader = TrainLoader(train.root, seed=0, num_workers=workers, **GEOM)
        _batches(loader, 3)
        EvalLoader(train.root, "valid", crop=1000, batch_size=4, num_workers=workers).__iter__().__next__()
    assert torch.initial_seed() == before[0]
    assert torch.equal(torch.get_rng_state(), before[1])
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert random.getstate() == before[3]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["flac", "json", "truncated", "missing"])
def test_corrupt_sample_mid_shard_is_skipped(tmp_path, what):
    root = tmp_path / "audio"
    ok = make_audio_shards(root, pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=3)
    bad_key = ok.keys[1]  # the middle sample of the first shard
    shutil.rmtree(root)
    make_audio_shards(root, pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=3, corrupt={bad_key: what})

    loaders = [TrainLoader(root, seed=0, rank=r, world_size=2, **GEOM) for r in range(2)]
    counts = []
    for loader in loaders:
        batches = _batches(loader, loader.batches_per_epoch)
        counts.append(len(batches))
        for b in batches:
            assert bad_key not in b.keys
            assert b.tokens.shape == (4, 1000)
    assert counts == [12, 12]
    assert sum(lo.skipped for lo in loaders) == 4  # its 4 units, each replaced once
    assert sum(lo.stats()["data/skipped_samples"] for lo in loaders) == 4

    # Substitution is part of the plan: same batches with workers and after a resume.
    ref = _batches(TrainLoader(root, seed=0, **GEOM), 20)
    with_workers = TrainLoader(root, seed=0, num_workers=2, **GEOM)
    got = _batches(with_workers, 9)
    resumed = TrainLoader(root, seed=0, num_workers=0, **GEOM)
    resumed.load_state_dict(with_workers.state_dict())
    got += _batches(resumed, 11)
    _same(ref, got)
    assert resumed.skipped == sum(len(b.skipped) for b in ref)


@pytest.mark.timeout(60)
def test_truncated_shard_is_read_up_to_the_damage(tmp_path):
    train = make_audio_shards(tmp_path, pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=3)
    path = tmp_path / train.shards[1]
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])  # a half-copied shard
    loaders = [TrainLoader(tmp_path, seed=0, rank=r, world_size=2, num_workers=r, **GEOM) for r in range(2)]
    keys = set()
    for lo in loaders:
        batches = _batches(lo, lo.batches_per_epoch)
        assert len(batches) == 12
        keys |= {k for b in batches for k in b.keys}
    lost = set(train.keys) - keys
    assert lost and lost <= set(train.keys[3:])  # only samples of the damaged shard
    assert set(train.keys[:4]) <= keys  # the first shard and what precedes the damage are read
    assert sum(lo.skipped for lo in loaders) >= 4 * len(lost)


@pytest.mark.timeout(60)
def test_corrupt_sample_in_eval_is_masked(tmp_path):
    ok = make_audio_shards(tmp_path / "ok", pieces=3, seconds=1.0, per_shard=3, split="valid")
    bad_key = ok.keys[1]
    make_audio_shards(tmp_path / "bad", pieces=3, seconds=1.0, per_shard=3, split="valid",
                      corrupt={bad_key: "flac"})
    loaders = [EvalLoader(tmp_path / "bad", "valid", crop=1000, batch_size=4, rank=r, world_size=2)
               for r in range(2)]
    real = collections.Counter()
    for lo in loaders:
        batches = list(lo)
        assert len(batches) == len(loaders[0])
        for b in batches:
            real.update(k for k, m in zip(b.keys, b.mask.tolist()) if m)
    assert real == {k: 16 for k in ok.keys if k != bad_key}
    assert sum(lo.skipped for lo in loaders) > 0


@pytest.mark.timeout(60)
def test_code_shards(tmp_path):
    codes = make_code_shards(tmp_path / "codes", pieces=2, seconds=2.0, segment_seconds=1.0, per_shard=2,
                             hop=8, K=64, token_rate=2000.0, corrupt=None)
    loader = TrainLoader(tmp_path / "codes", crop=256, hop=8, crops_per_segment=2, batch_size=4, seed=0,
                         num_workers=1, fingerprint="0123456789abcdef")
    assert loader.kind == "codes"
    for b in _batches(loader, 5):
        assert b.tokens.dtype == torch.long and b.tokens.shape == (4, 256)
        for row, key, off in zip(b.tokens, b.keys, b.offsets.tolist()):
            assert off % 8 == 0
            assert np.array_equal(row.numpy(), codes.data[key][off:off + 256].astype(np.int64))
    with pytest.raises(ValueError, match="recompute the codes"):
        TrainLoader(tmp_path / "codes", crop=256, hop=8, crops_per_segment=2, batch_size=4, seed=0,
                    fingerprint="another")

    bad = make_code_shards(tmp_path / "bad", pieces=2, seconds=2.0, segment_seconds=1.0, per_shard=2,
                           corrupt={"train000-5e6249-s001": "npy"})
    loader = TrainLoader(tmp_path / "bad", crop=256, hop=8, crops_per_segment=2, batch_size=4, seed=0)
    keys = [k for b in _batches(loader, loader.batches_per_epoch) for k in b.keys]
    assert "train000-5e6249-s001" not in keys and loader.skipped > 0
    assert set(keys) == set(bad.keys) - {"train000-5e6249-s001"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_full_pass_equal_counts(audio, world):
    _, valid = audio
    # valid: segments of 20,800 and 11,200 samples → 20 + 11 = 31 crops of 1000.
    loaders = [EvalLoader(valid.root, "valid", crop=1000, hop=8, batch_size=4, rank=r, world_size=world,
                          num_workers=1 if r == 0 else 0) for r in range(world)]
    assert len({len(lo) for lo in loaders}) == 1
    seen = collections.Counter()
    for lo in loaders:
        batches = list(lo)
        assert len(batches) == len(lo)
        for b in batches:
            assert b.tokens.shape == (4, 1000) and b.mask.dtype == torch.bool
            for row, key, off, real in zip(b.tokens, b.keys, b.offsets.tolist(), b.mask.tolist()):
                if real:
                    seen[(key, off)] += 1
                    assert np.array_equal(row.numpy(), mulaw_encode(valid.data[key][off:off + 1000]))
    expected = {(k, o) for k in valid.keys for o in range(0, len(valid.data[k]) - 999, 1000)}
    assert len(expected) == 31 == loaders[0].items
    assert set(seen) == expected and set(seen.values()) == {1}
    # A second pass is the same pass.
    _same(list(loaders[0]), list(loaders[0]))


@pytest.mark.timeout(60)
def test_eval_capped_pass_spans_the_split(audio):
    _, valid = audio
    lo = EvalLoader(valid.root, "valid", crop=1000, batch_size=2, max_batches=2)
    batches = list(lo)
    assert len(batches) == 2 and all(b.mask.all() for b in batches)
    assert {k for b in batches for k in b.keys} == set(valid.keys)


@pytest.mark.timeout(60)
def test_short_segments_left_out_and_clear_errors(audio, tmp_path):
    train, valid = audio
    lo = TrainLoader(valid.root, "valid", crop=16000, hop=8, crops_per_segment=1, batch_size=1, seed=0)
    assert lo.short_keys == [valid.keys[1]]  # 11,200 < 16,000
    assert {k for b in _batches(lo, 3) for k in b.keys} == {valid.keys[0]}
    with pytest.raises(ValueError, match="at least crop"):
        TrainLoader(valid.root, "valid", crop=24000, hop=8, crops_per_segment=1, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="multiple of hop"):
        TrainLoader(train.root, crop=1001, hop=8, crops_per_segment=1, batch_size=1, seed=0)
    (tmp_path / "half").mkdir()
    shutil.copy(train.root / train.shards[0], tmp_path / "half")
    with pytest.raises(ManifestError, match="incomplete shard set"):
        TrainLoader(tmp_path / "half", seed=0, **GEOM)


@pytest.mark.timeout(60)
def test_state_dict_other_world_size_and_seed(audio):
    train, _ = audio
    one = TrainLoader(train.root, seed=0, **GEOM)
    _batches(one, 10)
    two = TrainLoader(train.root, seed=0, rank=1, world_size=2, **GEOM)
    with pytest.warns(UserWarning, match="not an exact resume"):
        two.load_state_dict(one.state_dict())
    assert (two.epoch, two.index) == (0, 5)  # 10 units handed out = 5 batches of 2 ranks
    with pytest.raises(ValueError, match="seed"):
        TrainLoader(train.root, seed=9, **GEOM).load_state_dict(one.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = TrainLoader(train.root, seed=9, **GEOM)
        other.load_state_dict(one.state_dict(), strict=False)
    assert (other.epoch, other.index) == (0, 10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.timeout(60)
def test_remote_shards_pipe_and_http(audio, tmp_path):
    train, _ = audio
    ref = _batches(TrainLoader(train.root, seed=0, **GEOM), 6)
    piped = TrainLoader(train.root, seed=0, shard_url=f"pipe:cat {train.root}/{{name}}",
                        cache_dir=tmp_path / "cache1", num_workers=2, **GEOM)
    _same(ref, _batches(piped, 6))

    ensure_program("curl", "curl")  # WebDataset's http reader
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(train.root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = TrainLoader(url, seed=0, cache_dir=tmp_path / "cache2", **GEOM)
        _same(ref, _batches(remote, 6))
    finally:
        server.shutdown()
