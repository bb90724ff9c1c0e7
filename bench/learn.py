"""The learning curve of level 1: does it learn, how fast, and how much do its codes carry?

    python bench/learn.py                                   # demo level 1, a wider level 1, and the
                                                            # unconditioned WaveNet baseline, 2 at a time
    python bench/learn.py --curves demo --minutes 3         # one curve, shorter
    python bench/learn.py --curves demo level1.train.steps=6000 --minutes 60   # a long run

Each curve is a real training run (``launch/train.py``, DeepSpeed, the demo corpus) of level 1,
one thread, pinned to one core (``taskset``) when there is more than one, with an evaluation at
fixed step points (every ``--eval-every`` steps): valid bits/token, the uses-the-codes gap, and the
quality figures of :mod:`largewave.quality` (LSD, flatness excess, pitch-class agreement of the
reconstructions of the fixed valid clips, against the chance and noise baselines). A curve stops
at its step count or after ``--minutes`` of wall time (a SIGUSR2 stop request: it saves and
exits like a preempted job), whichever comes first.

Curves:

* ``demo``: level 1 of ``configs/demo.yaml`` as the demo trains it;
* ``wide``: the same with a wider decoder (residual 64, gate 128, skip 128);
* ``wavenet``: an unconditioned WaveNet with the demo decoder, trained the same way: its valid
  bits/token minus the ADA's is the information its codes carry.

After the curves, each ADA curve's export reconstructs the clips at every pair of several
temperatures (``--temperatures``) and nucleus cut-offs (``--top-p``), which is how the default
reconstruction settings (``quality.temperatures``, ``quality.top_p``) were chosen.

Prints a table per curve and writes ``<out>/learn.png`` (bits/token and LSD against steps and
against minutes) and ``<out>/learn.json``. Runs go to ``<out>/runs`` (default ``runs/bench-learn``);
rerunning resumes them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import cpu_description  # noqa: E402

DEMO_RANKS = 2  # launch/demo.py trains every level on 2 ranks

CURVES = {
    "demo": [],
    "wide": ["level1.decoder.residual_channels=64", "level1.decoder.gate_channels=128",
             "level1.decoder.skip_channels=128"],
    "wavenet": ["level1.kind=wavenet", "level1.hop=1", "level1.decoder.cond_channels=0"],
}


def run_curve(name: str, overrides: list[str], args, core: int | None) -> dict:
    """Train one curve to its end or time cap; returns its record."""
    import yaml

    from largewave.config import resolve_config_path

    extra = CURVES[name] + overrides
    # level 1 alone: a plain WaveNet makes no codes for the levels above it to stack on
    raw = yaml.safe_load(resolve_config_path(args.config).read_text())
    raw["stack"] = f"learn-{name}"
    raw["levels"] = {"level1": raw["levels"]["level1"]}
    for key in ("gate", "temperatures", "top_p"):  # the quality settings of the levels left out go too
        if isinstance(raw.get("quality", {}).get(key), dict):
            raw["quality"][key] = {k: v for k, v in raw["quality"][key].items() if k == "level1"}
    stack_yaml = args.out / f"learn-{name}.yaml"
    stack_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))
    over = [f"run.root={args.out / 'runs'}", "run.wandb_mode=disabled",
            f"level1.train.eval_every={args.eval_every}", f"level1.train.save_every={args.eval_every}",
            f"level1.train.log_every={min(50, args.eval_every)}", f"level1.train.eval_batches={args.eval_batches}",
            f"level1.train.eval_clips={args.clips}", f"level1.train.eval_clip_seconds={args.clip_seconds}",
            "level1.train.sample_every=1000000", f"data.shards={args.shards}", "data.workers=1",
            # one rank accumulating DEMO_RANKS micro-batches: the demo's global batch and steps
            f"level1.train.grad_accum={DEMO_RANKS}", *extra]
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--stack", str(stack_yaml), "--level", "1", *over]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = args.out / f"{name}.log"
    print(f"[{name}] {shlex.join(cmd)}\n[{name}] log: {log}", flush=True)
    t0 = time.time()
    times: dict[int, float] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        stop = threading.Timer(args.minutes * 60, lambda: proc.send_signal(signal.SIGUSR2))
        stop.start()
        for line in proc.stdout:
            out.write(line)
            out.flush()
            m = re.search(r"eval step (\d+): [\d.]+ bits/tok", line)
            if m:
                times[int(m.group(1))] = (time.time() - t0) / 60
                print(f"[{name}] {line.split('] ', 1)[-1].rstrip()}", flush=True)
            elif "reconstruction LSD" in line or "samples: centroid" in line:
                print(f"[{name}] {line.split(': ', 1)[-1].rstrip()}", flush=True)
        rc = proc.wait()
        stop.cancel()
    if rc not in (0, 3):
        print(f"[{name}] training exited {rc}; see {log}", flush=True)
    run = sorted((args.out / "runs" / f"learn-{name}" / "level1").glob("*/metrics.jsonl"),
                 key=lambda p: p.stat().st_mtime)
    rows: dict[int, dict] = {}
    if run:
        from largewave.engine.wandb_log import read_metrics

        for r in read_metrics(run[-1]):
            if any(k.startswith("valid/") for k in r):
                rows.setdefault(int(r["step"]), {}).update({k.removeprefix("valid/"): v for k, v in r.items()
                                                             if k.startswith("valid/")})
    points = [dict(step=s, minutes=times.get(s), **rows[s]) for s in sorted(rows)]
    return {"name": name, "overrides": extra, "exit": rc, "run": str(run[-1].parent) if run else None,
            "points": points}


def sampling_sweep(record: dict, temperatures: list[float], nuclei: list[float], args) -> list[dict]:
    """Reconstruction figures of a curve's final export at every (temperature, top-p) pair."""
    import torch

    from largewave.engine import evaluate
    from largewave.engine.export import load_export

    run = Path(record["run"] or "/nonexistent")
    export = run / "export.pt"
    if export.exists():
        model, cfg = load_export(export)
    else:  # stopped by the time cap: the newest complete checkpoint
        from largewave.config import load_config
        from largewave.engine.checkpoint import latest_complete
        from largewave.engine.trainer import consolidated_weights
        from largewave.models import build_level

        ck = latest_complete(run / "checkpoints")
        if ck is None or not (run / "config.yaml").exists():
            return []
        cfg = load_config(run / "config.yaml")
        model = build_level(cfg, "level1")
        model.load_state_dict(consolidated_weights(ck.path, cfg.level("level1").train.zero_stage))
    model.eval()
    torch.set_num_threads(1)
    probe = evaluate.QualityProbe(cfg, "level1", args.clips, args.clip_seconds)
    out = []
    for t in temperatures:
        for p in nuclei:
            figs, _ = probe.run(model, torch.device("cpu"), t, seed=0, top_p=p)
            out.append({"temperature": t, "top_p": p, **figs})
    return out


def table(record: dict) -> str:
    lines = [f"{record['name']} ({' '.join(record['overrides']) or 'the demo config'})",
             f"  {'step':>6} {'min':>6} {'bits/tok':>9} {'gap':>6} {'LSD':>6} {'flat+':>6} {'pitch':>6}"
             f" {'chance LSD/pitch':>17} {'noise LSD/pitch':>16}"]
    for p in record["points"]:
        def f(key, fmt):
            return format(p[key], fmt) if key in p else "-"
        lines.append(f"  {p['step']:>6} {f('minutes', '6.1f') if p.get('minutes') is not None else '     -'} "
                     f"{f('bits_per_token', '9.3f')} {f('uses_codes_gap_bits', '6.2f')} {f('recon_lsd_db', '6.1f')} "
                     f"{f('recon_flatness_excess_db', '+6.1f')} {f('recon_pitch_class_agreement', '6.3f')} "
                     f"{f('chance_lsd_db', '8.1f')}/{f('chance_pitch_class_agreement', '.3f'):<8} "
                     f"{f('noise_lsd_db', '7.1f')}/{f('noise_pitch_class_agreement', '.3f')}")
    for s in record.get("sweep", []):
        if "recon_lsd_db" in s:
            lines.append(f"  export at temperature {s['temperature']:.2f}, top-p {s.get('top_p', 1.0):.2f}: LSD {s['recon_lsd_db']:.1f} dB, flatness excess "
                         f"{s['recon_flatness_excess_db']:+.1f} dB, pitch-class {s['recon_pitch_class_agreement']:.3f}, "
                         f"{s['output_dbfs']:.1f} dBFS")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """bits/token and LSD against steps and against minutes, one colour per curve (Pillow)."""
    from PIL import Image, ImageDraw

    W, H, M = 460, 300, 48
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    panels = [("bits_per_token", "step", "valid bits/token vs step "), ("bits_per_token", "minutes", "vs minutes"),
              ("recon_lsd_db", "step", "reconstruction LSD (dB) vs step"), ("recon_lsd_db", "minutes", "vs minutes")]
    img = Image.new("RGB", (2 * W, 2 * H + 30), "white")
    d = ImageDraw.Draw(img)
    for i, r in enumerate(records):
        d.text((10 + 150 * i, 2 * H + 10), r["name"], fill=colours[i % len(colours)])
    for k, (y, x, title) in enumerate(panels):
        ox, oy = (k % 2) * W, (k // 2) * H
        series = [[(p[x], p[y]) for p in r["points"] if p.get(x) is not None and y in p] for r in records]
        pts = [q for s in series for q in s]
        d.text((ox + M, oy + 6), title, fill="black")
        d.rectangle([ox + M, oy + 24, ox + W - 12, oy + H - M + 10], outline="black")
        if not pts:
            continue
        x0, x1 = min(q[0] for q in pts), max(q[0] for q in pts)
        y0, y1 = min(q[1] for q in pts), max(q[1] for q in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def at(q):
            return (ox + M + (q[0] - x0) / (x1 - x0) * (W - M - 12),
                    oy + H - M + 10 - (q[1] - y0) / (y1 - y0) * (H - M - 14 - 24 + 10))
        for s, c in zip(series, colours * 3):
            if len(s) > 1:
                d.line([at(q) for q in s], fill=c, width=2)
            for q in s:
                px, py = at(q)
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=c)
        d.text((ox + M, oy + H - M + 14), f"{x0:.4g}", fill="black")
        d.text((ox + W - 80, oy + H - M + 14), f"{x1:.4g} {x}", fill="black")
        d.text((ox + 2, oy + 24), f"{y1:.2f}", fill="black")
        d.text((ox + 2, oy + H - M), f"{y0:.2f}", fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="stack config (default demo)")
    ap.add_argument("--curves", nargs="+", default=["demo", "wide", "wavenet"], choices=sorted(CURVES))
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-time cap per curve (default 10)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (default 250)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--clips", type=int, default=4, help="fixed valid clips for the figures (default 4)")
    ap.add_argument("--clip-seconds", type=float, default=1.0)
    ap.add_argument("--temperatures", default="0.8,0.9,0.95,1.0",
                    help="reconstruction temperatures tried on each export at the end (comma list; '' = none)")
    ap.add_argument("--top-p", default="1.0,0.95,0.9,0.8",
                    help="nucleus cut-offs tried with each temperature (comma list; default 1.0,0.95,0.9,0.8)")
    ap.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1),
                    help="curves trained at once, each on its own core (default: 2 where there are 2 cores)")
    ap.add_argument("--shards", default=None, help="audio shards (default: the config's data.shards)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-learn")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every curve")
    args = ap.parse_args(argv)

    from largewave.config import ConfigError, load_config
    from largewave.stack import audio_ready, shards_command

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.shards = str(Path(args.shards or cfg.path(cfg.data.shards)).resolve())
    if not audio_ready(load_config(args.config, [*args.overrides, f"data.shards={args.shards}"])):
        print(f"error: no audio shards at {args.shards}; build them first ({shards_command(cfg)})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# CPU: {cpu_description()}; load average {os.getloadavg()[0]:.2f}; {args.parallel} curve(s) at a time, "
          f"1 thread each, ≤ {args.minutes:g} min per curve", flush=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    records: dict[str, dict] = {}
    pending = list(args.curves)
    while pending:
        batch, pending = pending[: args.parallel], pending[args.parallel:]
        threads = []
        for i, name in enumerate(batch):
            core = cores[i % len(cores)] if len(cores) > 1 else None
            th = threading.Thread(target=lambda n=name, c=core: records.__setitem__(n, run_curve(n, args.overrides, args, c)))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    nuclei = [float(p) for p in args.top_p.split(",") if p.strip()] or [1.0]
    for name in args.curves:
        if temps and name != "wavenet":
            records[name]["sweep"] = sampling_sweep(records[name], temps, nuclei, args)
    ordered = [records[n] for n in args.curves]
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")
    for r in ordered:
        print(table(r))
    if "wavenet" in records and any(n != "wavenet" for n in records):
        base = records["wavenet"]["points"]
        for r in ordered:
            if r["name"] == "wavenet" or not r["points"] or not base:
                continue
            common = {p["step"]: p for p in base}
            both = [p for p in r["points"] if p["step"] in common and "bits_per_token" in p]
            if both:
                p = both[-1]
                print(f"# at step {p['step']}: {r['name']} {p['bits_per_token']:.3f} bits/token, unconditioned WaveNet "
                      f"{common[p['step']]['bits_per_token']:.3f}: the codes carry "
                      f"{common[p['step']]['bits_per_token'] - p['bits_per_token']:.3f} bits/token")
    (args.out / "learn.json").write_text(json.dumps(ordered, indent=1) + "\n")
    plot(ordered, args.out / "learn.png")
    print(f"# wrote {args.out / 'learn.png'} and {args.out / 'learn.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
