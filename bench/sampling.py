"""Generation speed of the reference level-1 decoder, conditioned and unconditioned, against
the public peer ``wavenet-vocoder==0.1.1``.

The decoder: V = 256 mu-law classes, 30 layers (3 stacks of dilations 1…512), kernel 2,
64 residual channels, dilated convs 64 → 128 (64 tanh + 64 sigmoid), 256 skip channels,
and either 64-dim local conditioning at hop 8 (≈ 1.5 M parameters) or none. Measured in one run:

- ours: ``WaveNet.generate`` (incremental state, O(layers) per step), B = 1 and B = 16, on each
  path: the PyTorch loop, the fused C step in exact fp32, and the fused step with bf16 weights
  (reduced precision; its per-step KL and NLL against fp32 are printed);
- peer: ``wavenet-vocoder==0.1.1``'s ``incremental_forward`` on the same layers after
  ``make_generation_fast_()`` (if that package is installed), conditioned (``cin_channels=64``,
  conditioning given at sample rate as it requires) and unconditioned (``cin_channels=-1``);
- naive: our full forward over the last receptive field for every new sample (conditioned);
- ceiling: one step's weights (≈ 1.24 M multiply-adds per stream) as one fused matmul, i.e. how
  fast this machine can stream the step's weights through the matrix unit with zero overhead.

Protocol (``bench/_common.py``): wall clock, CPU time beside it; ours and the peer alternate
(ours, peer, ours, peer, …) ``--repeats`` times per row; median and spread (min–max); the load
average at start and end, the CPU model and flags. Then the goals (B = 1 exact >= 4,000 samples/s,
reduced >= 8,000; B = 16 reduced >= 40,000 in total) with the measured shortfall, the fused step's
time per phase against what bounds it (weight bytes streamed at B = 1, the matmul ceiling at
B = 16), a profile of the PyTorch loop's step, and a profile of the peer's step conditioned vs
unconditioned (why its conditioned figure is lower).

Why the peer's conditioned figure is lower (measured by ``peer_diagnosis`` below, printed at the
end, with torch.profiler and cProfile): its ``incremental_forward`` does NOT upsample or
recompute the whole conditioning per step — it transposes ``c`` to B x T x C once, before its
loop, and reads ``c[:, t, :]`` per step. The extra cost is per-sample conditioning projected in
every layer: one more ``Conv1d1x1.incremental_forward`` per layer (a 64 → 128 ``F.linear`` on the
step's vector, behind its Python wrapper), one more ``split`` and two ``add``s — about +26 % op
calls per step (≈ 3,030 vs 2,400); its step is dispatch-bound, and it costs +10–40 % time per
step measured here on one thread (e.g. 249 vs 275, 281 vs 391, 318 vs 375 samples/s). A figure
near 86 samples/s (vs ~320 unconditioned) is not what this code costs on one quiet thread and
does not reproduce; the peer gets there when the machine is shared: a wall clock at load average
~6.5 on these 2 CPUs gave 77 (CPU time: 228), and torch on 2 threads under load 10–30. Its weight
norm left on (no ``make_generation_fast_``) costs ~15–45 %, not that much.

    python bench/sampling.py [--threads 1] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (Sample, alternate, cpu_rates, measure, median, print_end, print_machine,  # noqa: E402
                     ratio_spread, spread, wall_rates)
from largewave.models.wavenet import WaveNet  # noqa: E402

V, LAYERS, STACKS, R, G, S, C, HOP = 256, 30, 3, 64, 128, 256, 64, 8

# Every rate here is wall clock (elapsed time); CPU time is printed beside the comparison rows.
now = time.perf_counter


def reference_decoder(cond: bool = True) -> WaveNet:
    dilations = [2 ** i for _ in range(STACKS) for i in range(LAYERS // STACKS)]
    return WaveNet(V, dilations, residual_channels=R, gate_channels=G, skip_channels=S,
                   kernel_size=2, cond_channels=C if cond else 0, cond_hop=HOP).eval()


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


# Our generation paths: the PyTorch loop of IncrementalState, and the fused C step (exact fp32 and
# bf16 step weights); each a keyword set for WaveNet.generate.
MODES = {"torch loop": {"fused": False}, "fused fp32 (exact)": {"fused": True},
         "fused bf16 (reduced)": {"fused": True, "precision": "bf16"}}


def ours(net: WaveNet, batch: int, steps: int, mode: str = "fused fp32 (exact)") -> Sample:
    cond = torch.randn(batch, C, math.ceil(steps / HOP)) if net.cond is not None else None
    g = torch.Generator().manual_seed(0)
    kw = MODES[mode]
    warm = min(64, steps)
    net.generate(warm, batch=batch, cond=None if cond is None else cond[:, :, :math.ceil(warm / HOP)], generator=g,
                 **kw)  # warm-up
    _, s = measure(lambda: net.generate(steps, batch=batch, cond=cond, temperature=1.0, generator=g, **kw),
                   batch * steps)
    return s


def reduced_precision_numerics(net: WaveNet, steps: int) -> tuple[float, float, float]:
    """(max per-step KL(fp32 || bf16) in nats, mean per-step KL, |NLL difference| in bits) of the
    fused step fed the same tokens (drawn from the fp32 model), B = 1."""
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, C, math.ceil(steps / HOP), generator=g) if net.cond is not None else None
    tokens = net.generate(steps, cond=cond, generator=g, fused=True)
    logits = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16"):
            state = net.incremental_state(1, cond)
            runner = state.fused(prec)
            rows = tokens.t().contiguous()
            out = torch.empty(steps, V)
            for t in range(steps):
                if cond is not None and t % HOP == 0:
                    state._refresh_frame(t // HOP)
                out[t] = runner.logits(t, rows[t - 1] if t else None)[0]
            logits[prec] = out.log_softmax(1)
    lp, lq = logits["fp32"], logits["bf16"]
    kl = (lp.exp() * (lp - lq)).sum(1)
    nll = {k: -v.gather(1, tokens[0][:, None]).mean().item() / math.log(2) for k, v in logits.items()}
    return kl.max().item(), kl.mean().item(), abs(nll["fp32"] - nll["bf16"])


def fused_profile(net: WaveNet, batch: int, steps: int, precision: str) -> dict[str, float]:
    """µs per step in each phase of the fused step (timed inside the kernel)."""
    cond = torch.randn(batch, C, math.ceil((steps + 1) / HOP)) if net.cond is not None else None
    state = net.incremental_state(batch, cond)
    runner = state.fused(precision)
    out = torch.zeros(steps, batch, dtype=torch.long)
    with torch.inference_mode():
        runner.profile(True)
        for t0 in range(0, steps, HOP):
            if cond is not None:
                state._refresh_frame(t0 // HOP)
            runner.run(t0, min(HOP, steps - t0), out, 0, None, 1.0)
        sec = runner.phase_seconds()
        runner.profile(False)
    return {k: v / steps * 1e6 for k, v in sec.items()}


def weight_stream_ceiling(bytes_per_element: int, min_seconds: float) -> float:
    """Steps/s if a step only had to read its weights once (a memory-bound B = 1 step): the rate
    at which this thread sums a buffer of the step's weight bytes."""
    n, m = step_weight_shape()
    w = torch.randn(n * m * bytes_per_element // 4)  # the same bytes, summed as fp32 (a plain read)
    return 1.0 / timed(lambda: w.sum(), min_seconds)


def naive(net: WaveNet, batch: int, steps: int) -> Sample:
    """Recompute the whole receptive field for every sample (no caches)."""
    rf = net.receptive_field
    total = rf + steps
    tokens = torch.randint(0, V, (batch, total))
    cond = torch.randn(batch, C, math.ceil(total / HOP) + 1)
    g = torch.Generator().manual_seed(0)

    def run():
        with torch.inference_mode():
            for t in range(rf, rf + steps):
                # the window must start on a frame boundary to line the conditioning up
                lo = (t - rf) // HOP * HOP
                logits = net(tokens[:, lo:t + 1], cond[:, :, lo // HOP:])[:, :, -1]
                tokens[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]

    return measure(run, batch * steps)[1]


def baseline_model(cond: bool = True, fast: bool = True):
    """wavenet-vocoder 0.1.1 on the reference configuration, or the reason it is unavailable."""
    try:
        import warnings

        from wavenet_vocoder import WaveNet as VocoderWaveNet
    except Exception as e:  # not installed: say so
        return None, f"wavenet-vocoder not importable ({type(e).__name__}: {e})"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its torch.nn.utils.weight_norm
        m = VocoderWaveNet(out_channels=V, layers=LAYERS, stacks=STACKS, residual_channels=R,
                           gate_channels=G, skip_out_channels=S, kernel_size=2, cin_channels=C if cond else -1,
                           gin_channels=-1, upsample_conditional_features=False).eval()
    if fast:
        m.make_generation_fast_()
    return m, ""


def baseline(m, batch: int, steps: int, cond: bool) -> tuple[Sample, str]:
    # Conditioned, its incremental_forward reads c[:, t, :] from a B x T x C copy made once and
    # projects it in every layer (one more 64 -> 128 linear + split + 2 adds per layer, ~+26 % op
    # calls): +10-40 % time per step on one thread, not the ~4x once reported (see peer_diagnosis).
    c = torch.randn(batch, C, steps) if cond else None  # its conditioning is given at sample rate
    with torch.inference_mode():
        if batch == 1:
            # its own sampling path (softmax + numpy choice), as shipped
            m.incremental_forward(c=None if c is None else c[:, :, :16], T=16)
            _, s = measure(lambda: m.incremental_forward(c=c, T=steps), batch * steps)
            note = "incremental_forward, its own sampling"
        else:
            # its sampler handles one stream only: feed the softmax back without sampling
            x0 = torch.zeros(batch, V, 1)
            x0[:, 127] = 1
            m.incremental_forward(c=None if c is None else c[:, :, :16], T=16, test_inputs=x0, quantize=False)
            _, s = measure(lambda: m.incremental_forward(c=c, T=steps, test_inputs=x0, quantize=False),
                           batch * steps)
            note = "incremental_forward, quantize=False (its sampler is batch-1 only)"
    return s, note


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
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
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


# ---- why the peer's conditioned sampling is slower ------------------------------------------


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's native start/stop log lines) for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peer_step_profile(m, cond: bool, steps: int) -> tuple[dict, dict]:
    """({op: (calls/step, self µs/step)}, {python function: calls/step}) of the peer's B=1 step."""
    from torch.profiler import ProfilerActivity, profile

    c = torch.randn(1, C, steps) if cond else None
    with torch.inference_mode():
        m.incremental_forward(c=None if c is None else c[:, :, :16], T=16)
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            m.incremental_forward(c=c, T=steps)
        pr = cProfile.Profile()
        pr.enable()
        m.incremental_forward(c=c, T=steps)
        pr.disable()
    ops = {e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()}
    funcs = {}
    for (file, line, name), (cc, nc, tt, ct, callers) in pstats.Stats(pr).stats.items():
        short = f"{os.path.basename(file)}:{line}({name})" if file != "~" else name
        funcs[short] = nc / steps
    return ops, funcs


def peer_diagnosis(steps: int, repeats: int, measured: dict) -> list[str]:
    """Profile the peer's batch-1 step conditioned vs unconditioned and name the difference.

    ``measured``: {cond: [Sample]} of the alternating B=1 peer runs above (the timing evidence).
    """
    unc, why = baseline_model(cond=False)
    if unc is None:
        return [f"  peer not available: {why}"]
    con, _ = baseline_model(cond=True)
    ops_u, fn_u = _peer_step_profile(unc, False, steps)
    ops_c, fn_c = _peer_step_profile(con, True, steps)
    calls_u, calls_c = sum(v[0] for v in ops_u.values()), sum(v[0] for v in ops_c.values())
    self_u, self_c = sum(v[1] for v in ops_u.values()), sum(v[1] for v in ops_c.values())
    us_u = [1e6 / x for x in wall_rates(measured[False])]
    us_c = [1e6 / x for x in wall_rates(measured[True])]
    cpu_u = median(1e6 / x for x in cpu_rates(measured[False]))
    cpu_c = median(1e6 / x for x in cpu_rates(measured[True]))
    lines = [f"  peer B=1: µs/step from the alternating runs above (wall: median (min–max); CPU: median); one profiled "
             f"run of {steps} steps each (torch.profiler, cProfile) for the op counts:",
             f"    unconditioned: wall {spread(us_u):>22}, CPU {cpu_u:6,.0f} µs/step; {calls_u:5.0f} op calls/step, "
             f"profiled op self-time {self_u:5.0f} µs/step",
             f"    conditioned:   wall {spread(us_c):>22}, CPU {cpu_c:6,.0f} µs/step; {calls_c:5.0f} op calls/step, "
             f"profiled op self-time {self_c:5.0f} µs/step",
             f"    conditioned − unconditioned: {calls_c / calls_u - 1:+.0%} op calls, {median(us_c) / median(us_u) - 1:+.0%} "
             f"wall and {cpu_c / cpu_u - 1:+.0%} CPU time per step",
             "    ops whose calls/step differ (conditioned − unconditioned; profiled self-time difference):"]
    diff = []
    for k in set(ops_u) | set(ops_c):
        cu, tu = ops_u.get(k, (0.0, 0.0))
        cc, tc = ops_c.get(k, (0.0, 0.0))
        if abs(cc - cu) >= 0.5:
            diff.append((tc - tu, cc - cu, k))
    for dt, dc, k in sorted(diff, reverse=True):
        lines.append(f"      {k:<26} {dc:+7.1f} calls/step  {dt:+8.1f} µs/step")
    lines.append("    Python functions whose calls/step differ (cProfile):")
    fdiff = sorted(((fn_c.get(k, 0) - fn_u.get(k, 0), k) for k in set(fn_u) | set(fn_c)
                    if abs(fn_c.get(k, 0) - fn_u.get(k, 0)) >= 0.5), reverse=True)
    for dc, k in fdiff[:8]:
        lines.append(f"      {k:<60} {dc:+6.1f}/step")
    up = [k for k in ops_c if any(w in k for w in ("conv_transpose", "upsample", "repeat_interleave", "interpolate"))]
    lines.append(f"    upsampling ops (conv_transpose, upsample, repeat_interleave, interpolate) in the conditioned "
                 f"run: {', '.join(up) if up else 'none'}")
    # the same models with their weight norm left on (make_generation_fast_ not called), alternating
    slow_models = {cond: baseline_model(cond=cond, fast=False)[0] for cond in (False, True)}
    n = max(50, steps // 2)
    slow = alternate({cond: (lambda cond=cond: baseline(slow_models[cond], 1, n, cond)[0]) for cond in (False, True)},
                     repeats)
    lines.append(f"    without make_generation_fast_ (weight norm recomputed every step), {repeats} alternating runs of "
                 f"{n} steps: unconditioned {spread(wall_rates(slow[False]))}, conditioned "
                 f"{spread(wall_rates(slow[True]))} samples/s")
    return lines


def peer_note(peer: dict) -> str:
    """The finding about the peer's conditioned figure, with this run's B=1 medians in it."""
    wc, wu = median(wall_rates(peer[True])), median(wall_rates(peer[False]))
    cc, cu = median(cpu_rates(peer[True])), median(cpu_rates(peer[False]))
    load = os.getloadavg()[0]
    return f"""\
finding (peer, conditioned vs unconditioned): wavenet-vocoder 0.1.1's incremental_forward neither upsamples
  nor recomputes the conditioning per step: it transposes c to B x T x C once, before its loop, and each
  step reads c[:, t, :] (the +1 select, +1 unsqueeze above). The rest of the difference is all per-sample
  conditioning projected in every layer: each of the 30 ResidualConv1dGLU layers runs one more
  Conv1d1x1.incremental_forward (a 64 -> 128 F.linear on one vector behind its Python wrapper: hook loop,
  linearized-weight lookup, views), one more split and two more adds — ~+26 % op calls. Its step is
  dispatch-bound (~1 µs of arithmetic per op), so its time follows the op count: +10–40 % per step seen
  on one thread here. In this run (B=1 medians): wall {wc:,.0f} vs {wu:,.0f} samples/s, CPU time {cc:,.0f}
  vs {cu:,.0f}, load average now {load:.1f} on {os.cpu_count()} CPUs. So the earlier 86 samples/s (vs ~320
  unconditioned) is not what conditioning costs, and it does not reproduce on one quiet thread. What
  puts the peer in that range on this machine is the machine: a wall clock on cores shared with many
  other processes (at load average ~6.5 on these 2 CPUs a run of this benchmark measured 77 wall vs 228
  CPU-time samples/s conditioned; compare the wall and CPU columns), or torch on 2+ threads on these
  2 cores (10–30 samples/s seen here under load). Leaving its weight norm on (make_generation_fast_
  not applied: each step recomputes g·v/‖v‖ for 123 convs conditioned vs 93) costs too (row above),
  but not that much."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: batch-1 work does not scale)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per ceiling measurement")
    ap.add_argument("--steps", type=int, default=2000, help="samples per stream for our generation (B=16: a third)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of ours and the peer per row (>= 3)")
    ap.add_argument("--naive-steps", type=int, default=32, help="B=1; B=16 runs a sixteenth (at least 2)")
    ap.add_argument("--baseline-steps", type=int, default=300, help="B=1; B=16 runs half")
    ap.add_argument("--profile-steps", type=int, default=200, help="steps of each profiled peer run")
    ap.add_argument("--quick", action="store_true", help="3 repeats, fewer steps (a smoke run, ~1 minute)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.baseline_steps, args.naive_steps = 3, 600, 100, 16
        args.profile_steps, args.seconds = 100, 0.4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_machine(f"torch {torch.__version__}, {args.threads} thread(s); clock: wall (CPU time beside it)")
    nets = {True: reference_decoder(True), False: reference_decoder(False)}
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    print(f"reference level-1 decoder: {params[True] / 1e6:.3f} M parameters conditioned (C={C}, hop {HOP}), "
          f"{params[False] / 1e6:.3f} M unconditioned; receptive field {nets[True].receptive_field} samples", flush=True)

    # Ours (every path) and the peer alternate within each row (torch loop, fused fp32, fused bf16,
    # peer, …), so that a burst of foreign load on this shared machine hits all of them; the
    # figure is the median over the repeats.
    from largewave.models import fast_step

    modes = list(MODES) if fast_step.kernel() is not None else ["torch loop"]
    if len(modes) == 1:
        print(f"fused step unavailable ({fast_step.unavailable_reason()}): the PyTorch loop only")
    peers = {cond: baseline_model(cond) for cond in (True, False)}
    why = peers[True][1]
    results = {}
    for B in (1, 16):
        for cond in (True, False):
            vocoder = peers[cond][0]
            note = [why]

            def run_peer(vocoder=vocoder, B=B, cond=cond, note=note):
                s, note[0] = baseline(vocoder, B, args.baseline_steps if B == 1 else args.baseline_steps // 2, cond)
                return s

            n = args.steps if B == 1 else args.steps // 3
            cases = {m: (lambda B=B, cond=cond, m=m, n=n: ours(nets[cond], B, n // 4 if m == "torch loop" else n, m))
                     for m in modes}
            if vocoder is not None:
                cases["peer"] = run_peer
            r = alternate(cases, args.repeats)
            r["peer_note"] = note[0]
            results[B, cond] = r
            print(f"measured B={B} {'conditioned' if cond else 'unconditioned'}", flush=True)
        results[B, "naive"] = naive(nets[True], B, args.naive_steps if B == 1 else max(2, args.naive_steps // 16))
        results[B, "ceiling"] = [ceiling(B, args.seconds / 2) for _ in range(3)]

    print()
    print(f"samples/s over all streams, wall clock: median (min–max) of {args.repeats} alternating runs; "
          f"CPU-time rate (median) beside each; the torch loop runs a quarter of the steps")
    print(f"{'':22} {'path':22} {'samples/s':>22} {'vs peer':>20}  {'CPU-time rate':>13}")
    for B in (1, 16):
        for cond in (True, False):
            r = results[B, cond]
            label = f"B={B} {'cond. hop 8, C=64' if cond else 'unconditioned'}"
            p = wall_rates(r["peer"]) if "peer" in r else None
            for m in modes + (["peer"] if p else []):
                o = wall_rates(r[m])
                vs = ratio_spread(o, p) if p and m != "peer" else ("1.00x" if m == "peer" else "n/a")
                print(f"{label:22} {m:22} {spread(o):>22} {vs:>20}  {median(cpu_rates(r[m])):13,.0f}")
                label = ""
    for B in (1, 16):
        print(f"peer B={B}: {results[B, True]['peer_note']}")

    best = modes[-1]
    print()
    print(f"{'conditioned':>12} {'ours':>10} {'naive':>10} {'ceiling':>10}   ours/naive  of ceiling   (ours: {best})")
    for B in (1, 16):
        mine = median(wall_rates(results[B, True][best]))
        nv = results[B, "naive"].wall_rate
        ceil = median(results[B, "ceiling"]) * B
        print(f"{'B=' + str(B):>12} {mine:10,.0f} {nv:10.1f} {ceil:10,.0f}   {mine / nv:9.0f}x  {mine / ceil:9.1%}")
    n, m = step_weight_shape()
    print(f"naive: one run each (full forward over the receptive field per sample); ceiling: median of 3, one fused "
          f"[B x {n}] @ [{n} x {m}] fp32 matmul per step (the step's {n * m / 1e6:.2f} M multiply-adds)")
    real_time = median(wall_rates(results[1, True][best])) / 16000
    print(f"B=1 conditioned ({best}) is {real_time:.2f}x real time at 16 kHz")

    if len(modes) > 1:
        kl_max, kl_mean, dnll = reduced_precision_numerics(nets[True], 1000)
        print(f"\nreduced precision (bf16 step weights, fp32 accumulation) against exact fp32, 1,000 teacher-forced "
              f"steps of the conditioned decoder: per-step KL max {kl_max:.2e} nats (mean {kl_mean:.2e}), "
              f"NLL difference {dnll:.2e} bits (goals: KL <= 1e-3, NLL within 0.01)")

        def rate(B, cond, m):
            return median(wall_rates(results[B, cond][m]))

        goals = [("B=1 exact fp32, conditioned", rate(1, True, "fused fp32 (exact)"), 4000),
                 ("B=1 exact fp32, unconditioned", rate(1, False, "fused fp32 (exact)"), 4000),
                 ("B=1 reduced precision, conditioned", rate(1, True, "fused bf16 (reduced)"), 8000),
                 ("B=1 reduced precision, unconditioned", rate(1, False, "fused bf16 (reduced)"), 8000),
                 ("B=16 reduced precision, conditioned, total", rate(16, True, "fused bf16 (reduced)"), 40000),
                 ("B=16 reduced precision, unconditioned, total", rate(16, False, "fused bf16 (reduced)"), 40000)]
        print(f"\n{'goal (1 thread)':46} {'measured':>10} {'goal':>8}  verdict")
        for name, got, goal in goals:
            verdict = "met" if got >= goal else f"missed: {got / goal:.0%} of the goal"
            print(f"{name:46} {got:10,.0f} {goal:8,d}  {verdict}")

        print("\nwhere the fused step spends its time (conditioned, µs per step, timed inside the kernel):")
        stream = {4: median([weight_stream_ceiling(4, args.seconds / 3) for _ in range(3)]),
                  2: median([weight_stream_ceiling(2, args.seconds / 3) for _ in range(3)])}
        flops = 2 * n * m
        for B in (1, 16):
            for prec in ("fp32", "bf16"):
                ph = fused_profile(nets[True], B, 800 if B == 1 else 240, prec)
                total = sum(ph.values())
                parts = ", ".join(f"{k} {v:.0f}" for k, v in ph.items())
                gflops = flops * B / (total * 1e-6) / 1e9
                bound = (f"reading the step's {n * m * (4 if prec == 'fp32' else 2) / 2 ** 20:.1f} MiB of weights once "
                         f"takes {1e6 / stream[4 if prec == 'fp32' else 2]:.0f} µs here" if B == 1 else
                         f"fp32 matmul ceiling {median(results[B, 'ceiling']) * flops * B / 1e9:.0f} GFLOP/s")
                print(f"  B={B:<2} {prec}: {total:.0f} µs/step ({gflops:.1f} GFLOP/s): {parts}; {bound}")

    print("\nwhere the time goes (the PyTorch loop's conditioned step, torch.profiler):")
    for B in (1, 16):
        print(profile_step(nets[True], B))
    print("breakdown of one step of the PyTorch loop:")
    for B in (1, 16):
        real, py = python_share(nets[True], B)
        floor = 1e6 / median(results[B, "ceiling"])
        print(f"  B={B}: {real:.0f} µs/step = Python interpreter {py:.0f} µs ({py / real:.0%}, the same loop "
              f"calling no-ops) + PyTorch dispatch and kernels {real - py:.0f} µs ({(real - py) / real:.0%}); "
              f"the step's multiply-adds as one fused matmul take {floor:.0f} µs ({floor / real:.0%})")

    if peers[True][0] is not None:
        print("\nwhy the peer's conditioned figure is lower (its step, conditioned vs unconditioned):")
        for line in peer_diagnosis(args.profile_steps, 3, {cond: results[1, cond]["peer"] for cond in (True, False)}):
            print(line)
        print(peer_note({cond: results[1, cond]["peer"] for cond in (True, False)}))
    print()
    print_end()


if __name__ == "__main__":
    main()
