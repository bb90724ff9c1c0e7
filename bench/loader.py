"""How fast one loader worker turns shards into training batches, against a naive reader.

    python bench/loader.py                       # synthetic ~15 min corpus, built and removed
    python bench/loader.py --shards data/demo/audio --originals data/demo/raw

Reports audio-seconds delivered per wall-clock second (× real time) for:

* ``loader``: :class:`largewave.data.loader.TrainLoader` building batches in this process
  (``num_workers=0``) — the work one worker core does (also given per CPU second, which other
  processes on a busy machine do not distort);
* ``loader, 1 worker``: the same through a DataLoader with one worker process, as training
  consumes it (adds the inter-process hop);
* ``naive``: what one would write without shards — per crop, open a random original file,
  decode it whole with soundfile, cut a random crop and mu-law encode it.

Without ``--shards`` a synthetic piano-like corpus (decaying harmonic notes plus a little noise,
16 kHz mono FLAC, one file per piece) is generated and turned into shards with the project's
shard builder in a temporary folder (or ``--work``). The target is ≥ 500× real time per worker
core, so that data loading never starves an accelerator.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.audio import SAMPLE_RATE, mulaw_encode  # noqa: E402
from largewave.config import TrainConfig  # noqa: E402
from largewave.data.loader import TrainLoader  # noqa: E402
from largewave.data.shards import build_audio_shards  # noqa: E402

TARGET = 500.0


def synth_piece(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Piano-like int16 PCM: random notes every ~0.2 s with 4 decaying harmonics, plus noise."""
    n = int(seconds * SAMPLE_RATE)
    x = np.zeros(n + 2 * SAMPLE_RATE, dtype=np.float32)
    t = np.arange(2 * SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    start = 0
    while start < n:
        f0 = 440.0 * 2 ** ((rng.integers(21, 109) - 69) / 12)
        note = sum(np.sin(2 * np.pi * f0 * h * t, dtype=np.float32) / h ** 1.5
                   for h in range(1, 5) if f0 * h < SAMPLE_RATE / 2)
        x[start:start + len(t)] += 0.15 * rng.uniform(0.3, 1.0) * note * np.exp(-3 * t)
        start += int(rng.uniform(0.05, 0.35) * SAMPLE_RATE)
    x = x[:n] + 0.003 * rng.standard_normal(n).astype(np.float32)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def make_corpus(work: Path, minutes: float, seed: int = 0) -> None:
    """``work/raw/piece*.flac`` (the originals) and ``work/audio`` (their shard set)."""
    raw, shards = work / "raw", work / "audio"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    left, i = minutes * 60, 0
    while left > 1:
        seconds = min(left, float(rng.uniform(60, 150)))
        sf.write(raw / f"piece{i:03d}.flac", synth_piece(rng, seconds), SAMPLE_RATE, subtype="PCM_16")
        left -= seconds
        i += 1
    build_audio_shards(raw, shards, segment_seconds=60.0, shard_mb=32.0, valid_fraction=0.0,
                       workers=min(2, os.cpu_count() or 1), progress=False, log=lambda s: None)


def measure(batches, budget: float, crop: int, min_batches: int = 5) -> tuple[float, float, int]:
    """Audio seconds delivered per wall-clock second and per CPU second of this process, and the
    batch count, over about ``budget`` seconds. CPU time is what one worker core spends; it does
    not drop when other processes compete for the machine, wall time does."""
    n, audio = 0, 0.0
    next(batches)  # start-up (worker launch, first shard index) is not throughput
    t0, c0 = time.perf_counter(), time.process_time()
    for tokens in batches:
        n += 1
        audio += tokens.shape[0] * crop / SAMPLE_RATE
        if n >= min_batches and time.perf_counter() - t0 >= budget:
            break
    return audio / (time.perf_counter() - t0), audio / max(time.process_time() - c0, 1e-9), n


def loader_batches(loader: TrainLoader):
    for batch in loader:
        yield batch.tokens


def naive_batches(files: list[Path], crop: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        rows = []
        for _ in range(batch):
            pcm, _ = sf.read(files[rng.integers(len(files))], dtype="int16")
            off = int(rng.integers(0, len(pcm) - crop + 1))
            rows.append(torch.from_numpy(mulaw_encode(pcm[off:off + crop])))
        yield torch.stack(rows)


def main(argv=None) -> int:
    train = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shards", help="an existing audio shard set (default: build a synthetic one)")
    ap.add_argument("--originals", help="the recordings the --shards set was built from, for the naive baseline")
    ap.add_argument("--minutes", type=float, default=15.0, help="synthetic corpus size")
    ap.add_argument("--work", help="folder for the synthetic corpus (kept, reused); default: a temporary one")
    ap.add_argument("--split", default="train")
    ap.add_argument("--crop", type=int, default=train.crop)
    ap.add_argument("--hop", type=int, default=8)
    ap.add_argument("--batch", type=int, default=train.micro_batch)
    ap.add_argument("--crops-per-segment", type=int, default=train.crops_per_segment)
    ap.add_argument("--seconds", type=float, default=10.0, help="time spent measuring each reader")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # one core, as one loader worker has
    tmp = None
    t0 = time.perf_counter()
    try:
        if args.shards:
            root = Path(args.shards)
            raw = Path(args.originals) if args.originals else None
        else:
            work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="largewave-bench-"))
            tmp = None if args.work else work
            raw, root = work / "raw", work / "audio"
            if (root / "manifest.json").exists():
                print(f"reusing the synthetic corpus in {work}")
            else:
                print(f"building a {args.minutes:g}-minute synthetic corpus and its shards in {work} ...",
                      flush=True)
                make_corpus(work, args.minutes)
                print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)

        def train_loader(workers: int) -> TrainLoader:
            return TrainLoader(root, args.split, crop=args.crop, hop=args.hop, batch_size=args.batch,
                               crops_per_segment=args.crops_per_segment, seed=0, num_workers=workers)

        loader = train_loader(0)
        minutes = float(loader.samples.lengths.sum()) / loader.samples.token_rate / 60
        print(f"shards: {root} [{args.split}]: {len(loader.samples)} segments, {minutes:.1f} min; "
              f"crop {args.crop} ({args.crop / SAMPLE_RATE:.2f} s), batch {args.batch}, "
              f"{args.crops_per_segment} crops per decoded segment")

        rows = []
        wall, cpu, n = measure(loader_batches(loader), args.seconds, args.crop)
        rows.append(("loader (in process)", wall, cpu, n))
        wall1, _, n1 = measure(loader_batches(train_loader(1)), args.seconds, args.crop)
        rows.append(("loader (DataLoader, 1 worker)", wall1, None, n1))  # its CPU is the worker's
        base = base_wall = None
        files = sorted(p for p in Path(raw).rglob("*") if p.suffix.lower() in (".flac", ".wav")) if raw else []
        if files:
            base_wall, base, nb = measure(naive_batches(files, args.crop, args.batch), args.seconds, args.crop)
            rows.append(("naive (soundfile whole file + crop)", base_wall, base, nb))

        print(f"\n{'reader':<38} {'x real time':>12} {'per CPU s':>10} {'batches':>8}")
        for name, r, c, k in rows:
            print(f"{name:<38} {r:>11.0f}x {'-' if c is None else f'{c:.0f}x':>10} {k:>8}")
        print()
        if base:
            print(f"ratio loader / naive: {cpu / base:.1f}x per CPU second, {wall / base_wall:.1f}x wall clock")
        else:
            print("naive baseline skipped: pass --originals with the recordings the shards were built from")
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            print(f"note: load average {load:.1f} on {os.cpu_count()} cores: wall-clock rates are shared "
                  "with other processes, CPU-second rates are not")
        verdict = "meets" if cpu >= TARGET else "MISSES"
        print(f"one worker core delivers {cpu:.0f}x real time per CPU second: {verdict} the {TARGET:.0f}x target")
        print(f"(total {time.perf_counter() - t0:.0f} s)")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
