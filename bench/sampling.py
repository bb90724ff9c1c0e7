"""Generation speed of the reference level-1 decoder.

The decoder: V = 256 mu-law classes, 30 layers (3 stacks of dilations 1…512), kernel 2,
64 residual channels, dilated convs 64 → 128 (64 tanh + 64 sigmoid), 256 skip channels,
64-dim local conditioning at hop 8 (≈ 1.5 M parameters). Measured in one run:

- ours: ``WaveNet.generate`` (incremental state, O(layers) per step), B = 1 and B = 16;
- naive: the full forward over the last receptive field for every new sample;
- baseline: ``wavenet-vocoder==0.1.1``'s ``incremental_forward`` on the same configuration
  after ``make_generation_fast_()`` (if that package is installed);
- ceiling: one step's weights (≈ 1.24 M multiply-adds per stream) as one fused matmul, i.e. how
  fast this machine can stream the step's weights through the matrix unit with zero overhead.

It prints samples/s, the ratios, the fraction of the ceiling, and a profile of one step.

    python bench/sampling.py [--threads 1] [--clock cpu|wall]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from largewave.models.wavenet import WaveNet  # noqa: E402

V, LAYERS, STACKS, R, G, S, C, HOP = 256, 30, 3, 64, 128, 256, 64, 8

# The clock every rate is measured with. "cpu" (default): this process's CPU time, which on a
# machine shared with other jobs is what the code costs (time spent descheduled is not counted);
# meaningful with --threads 1, where CPU time == busy time of one core. "wall": elapsed time.
now = time.process_time


def reference_decoder() -> WaveNet:
    dilations = [2 ** i for _ in range(STACKS) for i in range(LAYERS // STACKS)]
    return WaveNet(V, dilations, residual_channels=R, gate_channels=G, skip_channels=S,
                   kernel_size=2, cond_channels=C, cond_hop=HOP).eval()


def timed(fn, min_seconds: float) -> float:
    """Seconds per call of fn, repeated for at least min_seconds after one warm-up call."""
    fn()
    n, start = 0, now()
    while True:
        fn()
        n += 1
        elapsed = now() - start
        if elapsed >= min_seconds:
            return elapsed / n


def ours(net: WaveNet, batch: int, steps: int) -> float:
    cond = torch.randn(batch, C, math.ceil(steps / HOP))
    g = torch.Generator().manual_seed(0)
    net.generate(64, cond=cond[:, :, :8], generator=g)  # warm-up
    start = now()
    net.generate(steps, cond=cond, temperature=1.0, generator=g)
    return batch * steps / (now() - start)


def naive(net: WaveNet, batch: int, steps: int) -> float:
    """Recompute the whole receptive field for every sample (no caches)."""
    rf = net.receptive_field
    total = rf + steps
    tokens = torch.randint(0, V, (batch, total))
    cond = torch.randn(batch, C, math.ceil(total / HOP) + 1)
    g = torch.Generator().manual_seed(0)
    start = now()
    with torch.inference_mode():
        for t in range(rf, rf + steps):
            # the window must start on a frame boundary to line the conditioning up
            lo = (t - rf) // HOP * HOP
            logits = net(tokens[:, lo:t + 1], cond[:, :, lo // HOP:])[:, :, -1]
            tokens[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return batch * steps / (now() - start)


def baseline_model():
    """wavenet-vocoder 0.1.1 on the reference configuration, or the reason it is unavailable."""
    try:
        from wavenet_vocoder import WaveNet as VocoderWaveNet
    except Exception as e:  # not installed: say so
        return None, f"wavenet-vocoder not importable ({type(e).__name__}: {e})"
    torch.manual_seed(0)
    m = VocoderWaveNet(out_channels=V, layers=LAYERS, stacks=STACKS, residual_channels=R,
                       gate_channels=G, skip_out_channels=S, kernel_size=2, cin_channels=C,
                       gin_channels=-1, upsample_conditional_features=False).eval()
    m.make_generation_fast_()
    return m, ""


def baseline(m, batch: int, steps: int) -> tuple[float, str]:
    c = torch.randn(batch, C, steps)  # its conditioning is given at sample rate
    with torch.inference_mode():
        if batch == 1:
            # its own sampling path (softmax + numpy choice), as shipped
            m.incremental_forward(c=c[:, :, :16], T=16)
            start = now()
            m.incremental_forward(c=c, T=steps)
            note = "incremental_forward, its own sampling"
        else:
            # its sampler handles one stream only: feed the softmax back without sampling
            x0 = torch.zeros(batch, V, 1)
            x0[:, 127] = 1
            m.incremental_forward(c=c[:, :, :16], T=16, test_inputs=x0, quantize=False)
            start = now()
            m.incremental_forward(c=c, T=steps, test_inputs=x0, quantize=False)
            note = "incremental_forward, quantize=False (its sampler is batch-1 only)"
    return batch * steps / (now() - start), note


def step_weight_shape() -> tuple[int, int]:
    """Multiply-adds per stream of one step (conditioning amortised over the hop: excluded)."""
    per_layer = 2 * R * G + (G // 2) * S + (G // 2) * R  # two taps, skip, residual
    total = LAYERS * per_layer - (G // 2) * R + S * S + S * V  # the last layer has no residual conv
    n = 1024
    return n, total // n


def ceiling(batch: int, min_seconds: float) -> float:
    """Steps/s if a step were one fused matmul with all of its weights (no overhead)."""
    n, m = step_weight_shape()
    w = torch.randn(n, m)
    x = torch.randn(batch, n)
    out = torch.empty(batch, m)
    sec = timed(lambda: torch.mm(x, w, out=out), min_seconds)
    return 1.0 / sec


def profile_step(net: WaveNet, batch: int, steps: int = 400) -> str:
    cond = torch.randn(batch, C, (2 * steps + 50) // HOP + 1)
    state = net.incremental_state(batch, cond)
    tok = torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(50):
            state._step(tok)
        t0 = now()
        for _ in range(steps):
            state._step(tok)
        wall = (now() - t0) / steps
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                state._step(tok)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    kernels = sum(e.self_cpu_time_total for e in rows) / steps  # µs per step inside ops
    calls = sum(e.count for e in rows) / steps
    lines = [f"  B={batch}: {wall * 1e6:.0f} µs/step unprofiled; {calls:.0f} op calls/step; "
             f"profiled op self-time {kernels:.0f} µs/step (includes dispatch), top ops:"]
    for e in rows[:6]:
        lines.append(f"    {e.key:<22} {e.count / steps:5.1f}/step  {e.self_cpu_time_total / steps:7.1f} µs/step")
    return "\n".join(lines)


def python_share(net: WaveNet, batch: int, steps: int = 400) -> tuple[float, float]:
    """(µs/step of the real step, µs/step of the same Python loop calling no tensor ops)."""
    cond = torch.randn(batch, C, (steps + 20) // HOP + 1)
    state = net.incremental_state(batch, cond)
    tok = torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(20):
            state._step(tok)
        t0 = now()
        for _ in range(steps):
            state._step(tok)
        real = (now() - t0) / steps

    def noop(*args, **kwargs):
        return None

    class Null:
        def __getattr__(self, name):
            return noop

    null = Null()
    # the per-layer loop of IncrementalState._step with the same indexing but no-op calls
    x_at, pre_at, tf_at, tg_at, z_at = state.x_at, state.pre_at, state.tf_at, state.tg_at, state.z_at
    w_cur, w_res = state.w_cur, state.w_res
    t0 = now()
    for _ in range(steps):
        null.index_select(); null.index_select(); null.baddbmm()
        for l in range(state.L):
            a = pre_at[l]
            null.addmm_(x_at[l], w_cur[l])  # same argument look-ups as the real loop
            null.tanh_()
            null.addcmul(tf_at[l], tf_at[l], tg_at[l], out=z_at[l])
            if l < state.L - 1:
                null.addmm(x_at[l], z_at[l], w_res[l], out=x_at[l + 1])
        null.copy_(); null.addmm(); null.relu_(); null.addmm(); null.relu_(); null.addmm()
        null.add(); null.argmax()
    py = (now() - t0) / steps
    return real * 1e6, py * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: batch-1 work does not scale)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per ceiling measurement")
    ap.add_argument("--steps", type=int, default=2000, help="samples per stream for our generation (B=16: a third)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of ours and the baseline; best counts")
    ap.add_argument("--naive-steps", type=int, default=64, help="B=1; B=16 runs a sixteenth")
    ap.add_argument("--baseline-steps", type=int, default=300, help="B=1; B=16 runs half")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine; use with --threads 1); wall: elapsed")
    args = ap.parse_args()
    global now
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = reference_decoder()
    params = sum(p.numel() for p in net.parameters())
    print(f"reference level-1 decoder: {params / 1e6:.3f} M parameters, receptive field "
          f"{net.receptive_field} samples; torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; clock: {args.clock}", flush=True)

    # The machine may be shared: ours and the baseline are measured in alternation, best of
    # `repeats` runs each, so that a burst of foreign load does not favour either.
    vocoder, why = baseline_model()
    results = {}
    for B in (1, 16):
        r: dict = {"ours": 0.0, "baseline": 0.0 if vocoder is not None else None, "baseline_note": why}
        for _ in range(args.repeats):
            r["ours"] = max(r["ours"], ours(net, B, args.steps if B == 1 else args.steps // 3))
            if vocoder is not None:
                sps, r["baseline_note"] = baseline(vocoder, B, args.baseline_steps if B == 1 else args.baseline_steps // 2)
                r["baseline"] = max(r["baseline"], sps)
        r["naive"] = naive(net, B, args.naive_steps if B == 1 else max(4, args.naive_steps // 16))
        r["ceiling_steps"] = max(ceiling(B, args.seconds / 2) for _ in range(2))
        results[B] = r
        print(f"measured B={B}", flush=True)

    print()
    print(f"{'':>6} {'ours':>10} {'naive':>10} {'baseline':>10} {'ceiling':>10}   ours/naive  ours/baseline  "
          f"of ceiling   (samples/s over all streams)")
    for B, r in results.items():
        base, mine = r["baseline"], r["ours"]
        ceil = r["ceiling_steps"] * B
        base_s = f"{base:10.0f}" if base else "       n/a"
        ratio_s = f"{mine / base:12.2f}x" if base else "         n/a"
        print(f"B={B:<4} {mine:10.0f} {r['naive']:10.1f} {base_s} {ceil:10.0f}   "
              f"{mine / r['naive']:9.0f}x  {ratio_s}  {mine / ceil:9.1%}")
    for B, r in results.items():
        print(f"baseline B={B}: {r['baseline_note']}")
    print(f"ceiling: one fused [B x {step_weight_shape()[0]}] @ [{step_weight_shape()[0]} x {step_weight_shape()[1]}] "
          f"matmul per step (the step's {step_weight_shape()[0] * step_weight_shape()[1] / 1e6:.2f} M multiply-adds)")
    real_time = results[1]["ours"] / 16000
    print(f"B=1 is {real_time:.2f}x real time at 16 kHz")

    print(f"load average now {os.getloadavg()[0]:.1f} (other processes share these CPUs when > 0)")
    print("\nwhere the time goes (one step, torch.profiler):")
    for B in (1, 16):
        print(profile_step(net, B))
    print("breakdown of one step:")
    for B in (1, 16):
        real, py = python_share(net, B)
        floor = 1e6 / results[B]["ceiling_steps"]
        print(f"  B={B}: {real:.0f} µs/step = Python interpreter {py:.0f} µs ({py / real:.0%}, the same loop "
              f"calling no-ops) + PyTorch dispatch and kernels {real - py:.0f} µs ({(real - py) / real:.0%}); "
              f"the step's multiply-adds as one fused matmul take {floor:.0f} µs ({floor / real:.0%})")


if __name__ == "__main__":
    main()
