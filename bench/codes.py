"""Encoding throughput of the reference level-1 encoder: code precompute's chunked, batched
encoding against a plain file-by-file loop, in one run.

The encoder is ``configs/piano.yaml``'s level 1 (paper scale): 20 dilated residual blocks of 128
channels, kernel 3 (dilations 1…512 twice, a context of 2047 samples each side), hop 8, an argmax
quantiser with K = 2048 — about 1.3 M multiply-adds per audio sample, fp32, TF32 off.

- ``ours``: :func:`largewave.codes.encode_sequences` over all files at once — each file cut into
  windows of ``--chunk-frames`` code frames plus the encoder's context on both sides, windows of
  equal length batched, exactly the codes of whole-file encoding (checked here);
- ``plain``: for each file, one forward of ``model.encode`` over the whole file.

Throughput is in seconds of audio per second per core: ``--threads`` torch threads (default 1),
so with one thread wall seconds are core seconds; CPU seconds are given too because other
processes on a busy machine slow the wall clock but not the CPU time. The corpus is synthetic
piano-like audio (decaying harmonic notes plus a little noise) in files of random lengths.

Protocol (``bench/_common.py``): ours and plain alternate (ours, plain, ours, plain, …)
``--repeats`` times (default 3); each figure is the median with its spread (min–max); the load
average is printed at start and end, with the CPU model and flags.

    python bench/codes.py                     # 16 s of audio x 3 repeats, ~1-2 minutes on one core
    python bench/codes.py --quick             # 4 s of audio x 3 repeats, a smoke run
    python bench/codes.py --seconds 180       # a few minutes of audio (~30 minutes here)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Sample, alternate, measure, median, print_end, print_machine, ratio_spread, spread  # noqa: E402

from largewave.audio import mulaw_encode  # noqa: E402
from largewave.codes import ACTIVATION_BYTES, BATCH_CHUNKS, CHUNK_FRAMES, encode_sequences, set_fp32_exact  # noqa: E402
from largewave.config import load_config  # noqa: E402
from largewave.models import build_level  # noqa: E402

SR = 16000


def synth_file(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Piano-like float32[N]: a note every ~0.2 s with 4 decaying harmonics, plus noise."""
    n = int(seconds * SR)
    x = np.zeros(n + 2 * SR, dtype=np.float32)
    t = np.arange(2 * SR, dtype=np.float32) / SR
    start = 0
    while start < n:
        f0 = 440.0 * 2 ** ((rng.integers(21, 109) - 69) / 12)
        note = sum(np.sin(2 * np.pi * f0 * h * t, dtype=np.float32) / h ** 1.5 for h in range(1, 5) if f0 * h < SR / 2)
        x[start:start + len(t)] += 0.15 * rng.uniform(0.3, 1.0) * note * np.exp(-3 * t)
        start += int(rng.uniform(0.05, 0.35) * SR)
    return x[:n] + 0.003 * rng.standard_normal(n).astype(np.float32)


def corpus(total_seconds: float, seed: int = 0) -> list[np.ndarray]:
    """mu-law token files of random lengths (1–8 s, not multiples of the hop) summing to ~total."""
    rng = np.random.default_rng(seed)
    files, left = [], total_seconds
    while left > 0.5:
        sec = min(left, float(rng.uniform(1.0, 8.0))) + 1.0 / SR * int(rng.integers(1, 8))
        files.append(mulaw_encode(synth_file(rng, sec)))
        left -= sec
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=16.0, help="seconds of synthetic audio (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core numbers)")
    ap.add_argument("--chunk-frames", type=int, default=CHUNK_FRAMES)
    ap.add_argument("--batch-chunks", type=int, default=BATCH_CHUNKS, help="default: by memory budget")
    ap.add_argument("--config", default="piano", help="stack whose level-1 encoder to time (default: piano)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of ours and plain (>= 3)")
    ap.add_argument("--quick", action="store_true", help="4 s of audio (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 4.0)
    torch.set_num_threads(args.threads)
    print_machine("clock: wall (CPU time beside it)")
    set_fp32_exact()
    torch.manual_seed(0)
    cfg = load_config(args.config)
    model = build_level(cfg, "level1").eval()
    enc = model.encoder
    params = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in model.quantiser.parameters())
    files = corpus(args.seconds)
    audio = sum(len(f) for f in files) / SR
    print(f"reference level-1 encoder ({args.config}): {params / 1e6:.2f} M parameters, {len(enc.dilations)} blocks "
          f"x {enc.input.out_channels} channels, hop {enc.hop}, context {enc.context} samples each side, "
          f"K = {cfg.level('level1').quantiser.codes}")
    print(f"corpus: {len(files)} synthetic files, {audio:.1f} s of audio; torch {torch.__version__}, "
          f"{args.threads} thread(s); chunk {args.chunk_frames} frames, batch {args.batch_chunks or 'auto'}")

    # warm-up (allocator, oneDNN primitive caches) on a second of audio, both paths
    encode_sequences(model, [files[0][:SR]], args.chunk_frames, args.batch_chunks)
    model.encode(torch.as_tensor(files[0][: SR // 8 * 8])[None])

    codes: dict[str, list] = {}

    def run_ours() -> Sample:
        codes["ours"], s = measure(lambda: encode_sequences(model, files, args.chunk_frames, args.batch_chunks), audio)
        return s

    def plain():
        out = []
        for f in files:
            t = torch.as_tensor(f[: len(f) // enc.hop * enc.hop], dtype=torch.long)[None]
            out.append(model.encode(t)[0].numpy())
        return out

    def run_plain() -> Sample:
        codes["plain"], s = measure(plain, audio)
        return s

    # alternate (ours, plain, ours, plain, …) so foreign load on a shared machine hits both
    runs = alternate({"ours": run_ours, "plain": run_plain}, args.repeats)
    same = all(np.array_equal(a, b) for a, b in zip(codes["ours"], codes["plain"]))
    cores = args.threads
    print()
    print(f"median (min–max) of {args.repeats} alternating runs")
    print(f"{'':>8} {'wall s':>18} {'CPU s':>18} {'audio s / s / core':>24} {'audio s / CPU s':>24}")
    for name in ("ours", "plain"):
        r = runs[name]
        print(f"{name:>8} {spread([x.wall for x in r], '.1f'):>18} {spread([x.cpu for x in r], '.1f'):>18} "
              f"{spread([x.wall_rate / cores for x in r], '.3f'):>24} {spread([x.cpu_rate for x in r], '.3f'):>24}")
    wo, wp = [x.wall_rate for x in runs["ours"]], [x.wall_rate for x in runs["plain"]]
    co, cp = [x.cpu_rate for x in runs["ours"]], [x.cpu_rate for x in runs["plain"]]
    print(f"\nours / plain: {ratio_spread(wo, wp)} by wall time, {ratio_spread(co, cp)} by CPU time "
          f"(ratio of medians, range of the per-round ratios); codes identical: {same}")
    print(f"one core encodes {median(wo) / cores * 60 / 3600:.4f} h of audio per minute with ours")
    longest = max(len(f) for f in files)
    window = args.chunk_frames * enc.hop + 2 * (-(-enc.context // enc.hop) * enc.hop)
    # bytes per token of the largest activation: encoder width, or K features per frame over its hop
    act = 4 * max(enc.input.out_channels, model.quantiser.input_dim / enc.hop)
    per = args.batch_chunks or max(1, int(ACTIVATION_BYTES["cpu"] // (act * window)))
    print(f"largest activation: plain {longest * act / 2 ** 20:.0f} MiB for the longest file here "
          f"({SR * 600 * act / 2 ** 30:.1f} GiB for a 10-minute recording); ours "
          f"{per * window * act / 2 ** 20:.0f} MiB whatever the file length")
    print_end()
    if not same:
        sys.exit("error: chunked codes differ from whole-file codes")


if __name__ == "__main__":
    main()
