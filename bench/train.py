"""Training throughput of the reference level-1 model under the engine, against the hardware.

The model: the reference level-1 decoder of ``bench/sampling.py`` (V = 256, 3 stacks of dilations
1…512, 64 residual / 128 gate / 256 skip / 64 conditioning channels, kernel 2) with its encoder
(64 channels, 10 dilated layers, kernel 3, strided down by hop 8) and an argmax quantiser
(K = 2048, 64-dim). Measured in one run on this machine:

- **ceiling**: fp32 (bf16 on GPU) matrix-multiply FLOP/s of large square matmuls, with all cores;
- **plain**: a plain PyTorch loop (``model.loss`` → ``backward`` → ``AdamW.step``) on 1 process;
- **engine, 1 rank** and **engine, 2 ranks**: DeepSpeed ZeRO-2 through the trainer's objective
  and config, ranks started like torchrun would (each rank gets cores / ranks threads).

Inputs are random tokens already in memory: this measures the model and the engine, not the
loader (``bench/loader.py`` measures that). Training FLOPs are counted from the model's
convolutions and matmuls (forward multiply-adds × 2 FLOPs × 3 for forward + backward).

    python bench/train.py [--crop 4096] [--micro-batch 1] [--steps 3] [--ranks 1 2]
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


def matmul_ceiling(device, dtype, seconds: float = 2.0) -> float:
    """FLOP/s of back-to-back large square matmuls (the best this machine's matrix unit does)."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def training_flops_per_sample(model, crop: int) -> float:
    """Forward multiply-adds of one crop, counted on the model's convolutions and matmuls, × 6."""
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
        out = model.loss(torch.randint(0, 256, (1, crop)))
    del out
    model.train()
    for h in hooks:
        h.remove()
    # the quantiser's K×D straight-through einsum is a matmul outside nn modules
    q = getattr(model, "quantiser", None)
    if q is not None and hasattr(q, "embedding"):
        macs[0] += (crop // model.hop) * q.embedding.numel()
    return 6.0 * macs[0]


# ---- one measured process ----------------------------------------------------------------------


def worker(args) -> None:
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

    if args.plain and rt.world_size == 1:
        plain = build_level(cfg, "level1").to(dev)
        opt = torch.optim.AdamW(plain.parameters(), lr=lv.optim.lr)
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            with autocast:
                loss = plain.loss(tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), lv.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        result["plain_step_s"] = sorted(times)[len(times) // 2]
        del plain, opt

    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    _as_objective(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(lv, rt.world_size, rt.precision),
                                           lr_scheduler=make_scheduler(lv))
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, _, _ = engine(tokens)
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    # every rank waits for the slowest: take the max over ranks of each rank's median step
    med = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]
    result["engine_step_s"] = distributed.all_reduce_max([med], dev)[0]

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


def launch(ranks: int, threads: int, plain: bool, args) -> dict:
    port = _free_port()
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), LOCAL_WORLD_SIZE=str(ranks))
        cmd = [sys.executable, __file__, "--worker", "--crop", str(args.crop), "--micro-batch", str(args.micro_batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + ([] if plain else ["--no-plain"]) \
            + (["--scratch", args.scratch] if args.scratch else [])
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
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain PyTorch loop")
    ap.add_argument("--scratch", default=None, help="folder for the checkpoint timing (default: system temp)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(cores)
    ceiling = matmul_ceiling(dev, dtype)
    cfg = reference_config(args.crop, args.micro_batch)
    d = cfg.derived("level1")
    print(f"reference level-1 model: receptive field {d['receptive_field_tokens']} samples "
          f"({d['receptive_field_ms']:.0f} ms), hop {d['hop']}, crop {args.crop}, micro-batch {args.micro_batch}")
    print(f"{'cpu' if not cuda else torch.cuda.get_device_name()}: {cores} cores; "
          f"{'bf16' if cuda else 'fp32'} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s (all cores)")
    rows, saves = [], []
    base = None
    # 1 rank on all cores is the reference for scaling; 1 rank on one core (with the plain loop,
    # the least noisy comparison on a shared machine) shows per-core efficiency; N ranks split
    # the cores as torchrun would.
    plan = [(1, cores, False)] + ([(1, 1, args.plain)] if cores > 1 and not cuda else []) \
        + [(n, max(1, cores // n), False) for n in args.ranks if n > 1]
    if cuda or cores == 1:
        plan[0] = (1, cores, args.plain)
    for ranks, threads, plain in plan:
        if cuda and ranks > torch.cuda.device_count():
            continue
        r = launch(ranks, threads, plain, args)
        samples = args.crop * args.micro_batch * ranks
        sps = samples / r["engine_step_s"]
        flops = r["flops_per_sample"] * args.micro_batch * ranks / r["engine_step_s"]
        if base is None:
            base = sps
            print(f"parameters {r['parameters']:,}; training FLOPs per audio sample "
                  f"{r['flops_per_sample'] / args.crop / 1e6:.2f} M")
        if "plain_step_s" in r:
            psps = args.crop * args.micro_batch / r["plain_step_s"]
            pfl = r["flops_per_sample"] * args.micro_batch / r["plain_step_s"]
            rows.append(("plain PyTorch, 1 process", r["threads"], psps, pfl, r["plain_step_s"], None))
        rows.append((f"engine ZeRO-2, {ranks} rank{'s' if ranks > 1 else ''}", r["threads"], sps, flops,
                     r["engine_step_s"], sps / base))
        saves.append(f"{ranks} rank(s) × {threads} thread(s): checkpoint {r['checkpoint_mib']:.1f} MiB, save {r['save_s']:.2f} s, "
                     f"load {r['load_s']:.2f} s")
    print(f"\n{'':28s} {'threads/rank':>12s} {'audio samples/s':>16s} {'real-time x':>11s} {'GFLOP/s':>9s} "
          f"{'of ceiling':>10s} {'s/step':>8s} {'vs 1 rank, all cores':>21s}")
    for name, threads, sps, fl, step, scale in rows:
        print(f"{name:28s} {threads:>12d} {sps:>16,.0f} {sps / cfg.audio.sample_rate:>11.3f} {fl / 1e9:>9.2f} "
              f"{fl / ceiling:>10.1%} {step:>8.3f} {'' if scale is None else f'{scale:.2f}x':>21s}")
    print("\n" + "\n".join(saves))
    plain = [r for r in rows if r[0].startswith("plain")]
    same = [r for r in rows if r[0].endswith(" 1 rank") and plain and r[1] == plain[0][1]]
    if plain and same:
        print(f"\nengine overhead vs plain loop (1 process, same threads): {same[0][4] / plain[0][4] - 1:+.1%} "
              f"time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
