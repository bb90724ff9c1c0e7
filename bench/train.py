"""Training throughput of the reference level-1 model under the engine, against the hardware.

The model: the reference level-1 decoder of ``bench/sampling.py`` (V = 256, 3 stacks of dilations
1…512, 64 residual / 128 gate / 256 skip / 64 conditioning channels, kernel 2) with its encoder
(64 channels, 10 dilated layers, kernel 3, strided down by hop 8) and an argmax quantiser
(K = 2048, 64-dim). Measured in one run on this machine:

- **ceiling**: matrix-multiply FLOP/s of large square matmuls, measured inside each row's own
  processes with that row's thread count and the precision the row trains in (fp32 on CPU, bf16
  on GPU); for N ranks, the N ranks' ceilings measured at the same time, summed;
- **plain**: a plain PyTorch loop (``model.loss`` → ``backward`` → ``AdamW.step``) on 1 process,
  its steps alternating with the engine's (1 thread);
- **engine, 1 rank** and **engine, 2 ranks**: DeepSpeed ZeRO-2 through the trainer's objective
  and config, ranks started like torchrun would (each rank gets cores / ranks threads);
- **ours vs peer**: the decoder alone (largewave's ``WaveNet``) against the public peer
  ``wavenet-vocoder==0.1.1`` on the same layers, batch 4 x 8,000 samples, unconditioned and
  conditioned (64 channels at hop 8; the peer takes them at sample rate), the same thread count
  and the same step (forward, cross-entropy, backward, Adam); their steps alternate in one process.

Protocol (``bench/_common.py``): wall clock; >= 10 timed steps after warm-up, each figure the
median step with its spread (min–max); the load average at start and end; the CPU model and flags.
Inputs are random tokens already in memory: this measures the model and the engine, not the
loader (``bench/loader.py`` measures that). Training FLOPs are counted from the models'
convolutions and matmuls (forward multiply-adds × 2 FLOPs × 3 for forward + backward).

    python bench/train.py [--crop 4096] [--micro-batch 1] [--steps 10] [--ranks 1 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import alternating_steps, median, print_end, print_machine, spread  # noqa: E402

REFERENCE = [
    "level1.hop=8",
    "level1.decoder.residual_channels=64", "level1.decoder.gate_channels=128", "level1.decoder.skip_channels=256",
    "level1.decoder.cond_channels=64", "level1.decoder.kernel_size=2", "level1.decoder.stacks=3",
    "level1.decoder.layers_per_stack=10",
    "level1.encoder.channels=64", "level1.encoder.layers_per_stack=10", "level1.encoder.stacks=1",
    "level1.encoder.kernel_size=3",
    "level1.quantiser.kind=amae", "level1.quantiser.codes=2048", "level1.quantiser.dim=64",
    "level1.train.zero_stage=2", "level1.train.grad_accum=1",
]


def reference_config(crop: int, micro_batch: int):
    from largewave.config import load_config

    return load_config("demo", REFERENCE + [f"level1.train.crop={crop}", f"level1.train.micro_batch={micro_batch}"])


def matmul_ceiling(device, dtype, seconds: float = 1.5) -> list[float]:
    """FLOP/s of back-to-back large square matmuls in this process, at its current thread count
    and the given dtype: three measurements of seconds/3 each (the median is the ceiling)."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = []
    torch.mm(a, b)
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(2 * n ** 3 * reps / (time.perf_counter() - t0))
    return out


def training_flops_per_sample(model, crop: int) -> float:
    """Forward multiply-adds of one crop, counted on the model's convolutions and matmuls, × 6."""
    import torch

    flops = count_training_flops(model, lambda: model.loss(torch.randint(0, 256, (1, crop))))
    # the quantiser's K×D straight-through einsum is a matmul outside nn modules
    q = getattr(model, "quantiser", None)
    if q is not None and hasattr(q, "embedding"):
        flops += 6.0 * (crop // model.hop) * q.embedding.numel()
    return flops


def count_training_flops(model, forward) -> float:
    """6 × the multiply-adds of ``forward()`` (one example) in the model's convs and linears."""
    import torch

    macs = [0]

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
        macs[0] += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m, inp, out):
        macs[0] += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        out = forward()
    del out
    model.train()
    for h in hooks:
        h.remove()
    return 6.0 * macs[0]


# ---- one measured process ----------------------------------------------------------------------


def worker(args) -> None:
    if args.peer_worker:  # torch and the model only (no DeepSpeed, no W&B)
        return peer_worker(args)
    import torch

    from largewave import distributed
    from largewave.engine.deepspeed_config import deepspeed_config, make_scheduler
    from largewave.engine.trainer import _as_objective
    from largewave.models import build_level

    cfg = reference_config(args.crop, args.micro_batch)
    lv = cfg.level("level1")
    rt = distributed.init(precision="auto", timeout_s=600)
    dev = rt.device
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (args.micro_batch, args.crop), device=dev)
    result: dict = {"world_size": rt.world_size, "threads": torch.get_num_threads(), "device": str(dev),
                    "precision": rt.precision}

    model = build_level(cfg, "level1")
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["flops_per_sample"] = training_flops_per_sample(model, args.crop)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=rt.precision == "bf16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # This row's ceiling: every rank at once, each with its own threads, in the row's precision.
    distributed.barrier()
    ceil = matmul_ceiling(dev, torch.bfloat16 if rt.precision == "bf16" else torch.float32)
    result["ceiling_flops"] = distributed.all_reduce_sum([median(ceil)], dev)[0]
    result["ceiling_rank0"] = ceil

    runs = []  # (name, step function), in the order they alternate
    if args.plain and rt.world_size == 1:
        plain = build_level(cfg, "level1").to(dev)
        opt = torch.optim.AdamW(plain.parameters(), lr=lv.optim.lr)

        def plain_step():
            with autocast:
                loss = plain.loss(tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), lv.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs.append(("plain", plain_step))

    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    _as_objective(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(lv, rt.world_size, rt.precision),
                                           lr_scheduler=make_scheduler(lv))

    def engine_step():
        with distributed.autocast(rt):  # as the trainer runs its forward
            loss, _, _ = engine(tokens)
        engine.backward(loss)
        engine.step()

    runs.append(("engine", engine_step))
    # the plain loop's steps alternate with the engine's (plain, engine, plain, …)
    times = {"plain": [], "engine": [], **alternating_steps(runs, args.warmup, args.steps, sync)}
    if times["plain"]:
        result["plain_step_s"] = times["plain"]
    # every rank waits for the slowest: each step's time is the max over ranks
    result["engine_step_s"] = distributed.all_reduce_max(times["engine"], dev)

    # A checkpoint of this model: DeepSpeed's sharded save by every rank, then a load.
    import tempfile

    from largewave.engine import checkpoint as ckpt

    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        tmp = Path(distributed_broadcast_path(tmp, rt))
        distributed.barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(str(tmp), tag="step-00000001", save_latest=False)
        distributed.barrier()
        result["save_s"] = time.perf_counter() - t0
        result["checkpoint_mib"] = ckpt.checkpoint_bytes(tmp / "step-00000001") / 2 ** 20
        t0 = time.perf_counter()
        engine.load_checkpoint(str(tmp), tag="step-00000001")
        distributed.barrier()
        result["load_s"] = time.perf_counter() - t0
        distributed.barrier()
    if rt.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    distributed.shutdown()


def peer_worker(args) -> None:
    """Ours (the decoder alone) vs wavenet-vocoder 0.1.1, one process, their steps alternating."""
    import warnings

    import torch
    import torch.nn.functional as F

    from largewave.models.wavenet import WaveNet

    try:
        from wavenet_vocoder import WaveNet as PeerWaveNet
    except Exception as e:  # not installed: say so
        print("RESULT " + json.dumps({"error": f"wavenet-vocoder not importable ({type(e).__name__}: {e})"}))
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, T, hop, C = args.peer_batch, args.peer_length, 8, 64
    layers, stacks = 30, 3
    dilations = [2 ** i for _ in range(stacks) for i in range(layers // stacks)]
    result: dict = {"threads": torch.get_num_threads(), "device": str(dev), "precision": "fp32", "rows": {}}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result["ceiling"] = matmul_ceiling(dev, torch.float32)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (B, T), device=dev)
    frames = torch.randn(B, C, T // hop, device=dev)
    for cond in (False, True):
        torch.manual_seed(0)
        ours = WaveNet(256, dilations, residual_channels=64, gate_channels=128, skip_channels=256, kernel_size=2,
                       cond_channels=C if cond else 0, cond_hop=hop).to(dev).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.nn.utils.weight_norm
            # its defaults (weight norm, legacy skip scaling) except dropout, which ours does not have
            peer = PeerWaveNet(out_channels=256, layers=layers, stacks=stacks, residual_channels=64, gate_channels=128,
                               skip_out_channels=256, kernel_size=2, dropout=0.0, cin_channels=C if cond else -1,
                               gin_channels=-1, upsample_conditional_features=False).to(dev).train()
        c = frames if cond else None
        opt_o = torch.optim.Adam(ours.parameters(), lr=1e-3)
        opt_p = torch.optim.Adam(peer.parameters(), lr=1e-3)

        def ours_step(fused=True):
            ours.fused_training = fused  # False: the same layers under autograd (the layer loop)
            loss = F.cross_entropy(ours(tokens, c), tokens)  # ours shifts inside: logits[t] | tokens[< t]
            loss.backward()
            opt_o.step()
            opt_o.zero_grad(set_to_none=True)

        def peer_step():
            x = F.one_hot(tokens, 256).transpose(1, 2).float()  # its input: one-hot B x 256 x T
            cs = None if c is None else torch.repeat_interleave(c, hop, dim=2)  # it needs sample-rate features
            y = peer(x, cs)
            loss = F.cross_entropy(y[:, :, :-1], tokens[:, 1:])  # output t predicts token t + 1
            loss.backward()
            opt_p.step()
            opt_p.zero_grad(set_to_none=True)

        row = {
            "ours_flops_per_sample": count_training_flops(ours, lambda: ours(tokens[:1], None if c is None else c[:1])) / T,
            "peer_flops_per_sample": count_training_flops(
                peer, lambda: peer(F.one_hot(tokens[:1], 256).transpose(1, 2).float(),
                                   None if c is None else torch.repeat_interleave(c[:1], hop, dim=2))) / T,
            "ours_params": sum(p.numel() for p in ours.parameters()),
            "peer_params": sum(p.numel() for p in peer.parameters()),
            **alternating_steps((("ours", ours_step), ("ours_loop", lambda: ours_step(False)), ("peer", peer_step)),
                                args.warmup, args.steps, sync),
        }
        result["rows"]["conditioned" if cond else "unconditioned"] = row
    print("RESULT " + json.dumps(result), flush=True)


def _cpu_flags() -> set[str]:
    from largewave.distributed import cpu_flags

    return cpu_flags()


def distributed_broadcast_path(path: str, rt) -> str:
    """Rank 0's temporary folder name, so all ranks save into one checkpoint folder."""
    import torch.distributed as dist

    obj = [path]
    if rt.world_size > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


# ---- the driver ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, threads: int, plain: bool, args, peer: bool = False) -> dict:
    """Run one row's processes (``peer``: the ours-vs-peer worker) and return rank 0's RESULT."""
    steps, warmup = (args.peer_steps, args.peer_warmup) if peer else (args.steps, args.warmup)
    port = _free_port()
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), LOCAL_WORLD_SIZE=str(ranks))
        cmd = [sys.executable, __file__, "--worker", "--crop", str(args.crop), "--micro-batch", str(args.micro_batch),
               "--steps", str(steps), "--warmup", str(warmup), "--peer-batch", str(args.peer_batch),
               "--peer-length", str(args.peer_length)] + ([] if plain else ["--no-plain"]) \
            + (["--scratch", args.scratch] if args.scratch else []) + (["--peer-worker"] if peer else [])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{ranks}-rank run failed:\n{out[-3000:]}")
    line = [ln for ln in outs[0].splitlines() if ln.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crop", type=int, default=4096, help="tokens per example (default 4096 > receptive field 3070)")
    ap.add_argument("--micro-batch", type=int, default=1, help="examples per rank per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup); the median counts")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain PyTorch loop")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip ours vs wavenet-vocoder 0.1.1")
    ap.add_argument("--peer-batch", type=int, default=4, help="batch of the ours-vs-peer rows")
    ap.add_argument("--peer-length", type=int, default=8000, help="samples per example of the ours-vs-peer rows")
    ap.add_argument("--peer-steps", type=int, default=10, help="timed steps of each of ours and the peer")
    ap.add_argument("--peer-warmup", type=int, default=1)
    ap.add_argument("--peer-threads", type=int, default=1, help="threads of the ours-vs-peer process")
    ap.add_argument("--quick", action="store_true", help="3 timed steps, peer rows at 4 x 2,000 (a smoke run)")
    ap.add_argument("--torch-only", action="store_true",
                    help="only the ours-vs-peer model rows (torch alone: no DeepSpeed, no W&B; e.g. on a lent GPU machine)")
    ap.add_argument("--scratch", default=None, help="folder for the checkpoint timing (default: system temp)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.warmup, args.peer_steps, args.peer_length = 3, 1, 3, 2000

    import torch

    cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    print_machine(f"torch {torch.__version__}; clock: wall")
    cfg = reference_config(args.crop, args.micro_batch)
    d = cfg.derived("level1")
    print(f"reference level-1 model: receptive field {d['receptive_field_tokens']} samples "
          f"({d['receptive_field_ms']:.0f} ms), hop {d['hop']}, crop {args.crop}, micro-batch {args.micro_batch}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, median (min–max)", flush=True)
    rows, saves = [], []
    base = None
    # 1 rank on all cores is the reference for scaling; 1 rank on one core (with the plain loop,
    # the least noisy comparison on a shared machine) shows per-core efficiency; N ranks split
    # the cores as torchrun would. Each row's ceiling is measured in the row's own processes.
    plan = [(1, cores, False)] + ([(1, 1, args.plain)] if cores > 1 and not cuda else []) \
        + [(n, max(1, cores // n), False) for n in args.ranks if n > 1]
    if cuda or cores == 1:
        plan[0] = (1, cores, args.plain)
    pairs = None
    if args.torch_only:
        plan = []
    for ranks, threads, plain in plan:
        if cuda and ranks > torch.cuda.device_count():
            continue
        r = launch(ranks, threads, plain, args)
        samples = args.crop * args.micro_batch * ranks
        eng = [samples / t for t in r["engine_step_s"]]
        if base is None:
            base = median(eng)
            print(f"parameters {r['parameters']:,}; training FLOPs per audio sample "
                  f"{r['flops_per_sample'] / args.crop / 1e6:.2f} M; precision {r['precision']}")
        fps = r["flops_per_sample"] / args.crop  # training FLOPs per audio sample
        if "plain_step_s" in r:
            pl = [args.crop * args.micro_batch / t for t in r["plain_step_s"]]
            rows.append(("plain PyTorch, 1 process", r["threads"], pl, fps, r["ceiling_flops"], r["plain_step_s"], None))
            pairs = (r["plain_step_s"], r["engine_step_s"], r["threads"])
        rows.append((f"engine ZeRO-2, {ranks} rank{'s' if ranks > 1 else ''}", r["threads"], eng, fps,
                     r["ceiling_flops"], r["engine_step_s"], median(eng) / base))
        saves.append(f"{ranks} rank(s) × {threads} thread(s): checkpoint {r['checkpoint_mib']:.1f} MiB, save {r['save_s']:.2f} s, "
                     f"load {r['load_s']:.2f} s")
        print(f"measured {ranks} rank(s) x {threads} thread(s)", flush=True)
    print(f"\n{'':26s} {'threads/rank':>12s} {'audio samples/s':>24s} {'real-time x':>11s} {'GFLOP/s':>8s} "
          f"{'ceiling GFLOP/s':>16s} {'of ceiling':>10s} {'s/step':>7s} {'vs 1 rank, all cores':>21s}")
    for name, threads, sps, fps, ceil, steps, scale in rows:
        fl = median(sps) * fps
        print(f"{name:26s} {threads:>12d} {spread(sps):>24s} {median(sps) / cfg.audio.sample_rate:>11.3f} "
              f"{fl / 1e9:>8.2f} {ceil / 1e9:>16.1f} {fl / ceil:>10.1%} {median(steps):>7.3f} "
              f"{'' if scale is None else f'{scale:.2f}x':>21s}")
    print("ceiling: median of three 1024² fp32 (bf16 on GPU) matmul timings in the row's own process(es), at its "
          "thread count; summed over ranks")
    print("\n" + "\n".join(saves))
    one = [r for r in rows if r[0] == "engine ZeRO-2, 1 rank" and r[1] == 1]
    two = [r for r in rows if r[0] == "engine ZeRO-2, 2 ranks"]
    if one and two:
        eff = median(two[0][2]) / (2 * median(one[0][2]))
        print(f"\n1 -> 2 ranks (1 thread each): {median(two[0][2]):,.0f} vs 2 x {median(one[0][2]):,.0f} samples/s = "
              f"{eff:.0%} scaling efficiency (goal >= 90% on an idle machine; see the load average)")
    if pairs is not None:
        p_s, e_s, th = pairs
        per = [e / p - 1 for p, e in zip(p_s, e_s)]
        print(f"\nengine overhead vs plain loop (1 process, {th} thread(s), steps alternating): "
              f"{median(e_s) / median(p_s) - 1:+.1%} time per step (median; per-step pairs {min(per):+.1%} to {max(per):+.1%})")

    if args.peer:
        print(f"\nours vs wavenet-vocoder 0.1.1 (the decoder alone; batch {args.peer_batch} x {args.peer_length:,} samples, "
              f"{args.peer_threads} thread(s), fp32, forward + cross-entropy + backward + Adam; ours and the peer alternate "
              f"step by step; {args.peer_steps} timed steps each after {args.peer_warmup} warm-up)", flush=True)
        r = launch(1, args.peer_threads, False, args, peer=True)
        if "error" in r:
            print(f"  peer: n/a ({r['error']})")
        else:
            ceil = median(r["ceiling"])
            n = args.peer_batch * args.peer_length
            print(f"{'':26s} {'ours samples/s':>24s} {'peer samples/s':>24s} {'ours/peer':>19s} "
                  f"{'ours GFLOP/s':>12s} {'of ceil.':>8s} {'peer GFLOP/s':>12s} {'of ceil.':>8s}")
            verdicts = []
            for name, row in r["rows"].items():
                p = [n / t for t in row["peer"]]
                pf = median(p) * row["peer_flops_per_sample"]
                label = name + (" (hop 8, C=64)" if name == "conditioned" else "")
                for key, path in (("ours", ""), ("ours_loop", " [layer loop]")):
                    o = [n / t for t in row[key]]
                    ratios = [a / b for a, b in zip(o, p)]
                    of = median(o) * row["ours_flops_per_sample"]
                    print(f"{label + path:26s} {spread(o):>24s} {spread(p):>24s} "
                          f"{median(o) / median(p):>6.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) "
                          f"{of / 1e9:>12.2f} {of / ceil:>8.1%} {pf / 1e9:>12.2f} {pf / ceil:>8.1%}")
                    if key == "ours":
                        verdicts.append((name, median(o) / median(p)))
            flags = _cpu_flags()
            units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
            goal = 3.0 if units else 1.3
            kind = f"a CPU with bf16 matrix units ({'/'.join(units)})" if units else "an fp32-only CPU (no bf16 matrix units)"
            for name, ratio in verdicts:
                print(f"goal on {kind}: ours >= {goal:.1f}x the peer, {name}: {ratio:.2f}x -> "
                      + ("met" if ratio >= goal else f"missed by {goal / ratio:.2f}x"))
            rc, ru = r["rows"]["conditioned"], r["rows"]["unconditioned"]
            print(f"ceiling: {r['threads']} thread(s) fp32 {spread([c / 1e9 for c in r['ceiling']], '.1f')} GFLOP/s; "
                  f"ours/peer: ratio of medians (range of the per-step ratios); parameters ours {ru['ours_params']:,} / "
                  f"{rc['ours_params']:,}, peer {ru['peer_params']:,} / {rc['peer_params']:,} (unconditioned / conditioned); "
                  f"training FLOPs per sample counted on each model: ours {ru['ours_flops_per_sample'] / 1e6:.2f} / "
                  f"{rc['ours_flops_per_sample'] / 1e6:.2f} M, peer {ru['peer_flops_per_sample'] / 1e6:.2f} / "
                  f"{rc['peer_flops_per_sample'] / 1e6:.2f} M")
            print("peer: its defaults (weight norm on, legacy skip scaling) except dropout 0 (ours has none); "
                  "one-hot input and the conditioning repeated to sample rate (it has no frame-rate path) are built "
                  "inside its timed step, as ours does its embedding and repeat inside forward")
    print()
    print_end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
