"""What a stack's runs did, from their folders alone (no W&B needed): ``largewave runs``.

A run folder (``{run.root}/{stack}/{level}/{signature}/``) holds everything read here:

* ``metrics.jsonl`` — every logged scalar by step (written by rank 0, whatever the W&B mode);
* ``state.json`` — running / done / paused / stopped / failed, step, W&B run path (see
  :func:`largewave.engine.run_folder.write_state`);
* ``config.yaml`` — the config the run was trained with, compared with the stack's shipped YAML;
* ``checkpoints/step-*/COMPLETE`` and ``export.pt``.

:func:`find_runs` lists them, :func:`format_table` prints the table, :func:`format_detail` one
run, and :func:`draw_curves` its learning curves as a PNG.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from largewave.engine.checkpoint import latest_complete
from largewave.engine.run_folder import live_state, read_state
from largewave.engine.wandb_log import BEST, read_metrics

RECON = (("recon_lsd_db", "LSD", "{:.1f}"), ("recon_flatness_excess_db", "flat", "{:+.1f}"),
         ("recon_pitch_class_agreement", "pc", "{:.3f}"))


@dataclass
class RunInfo:
    path: Path
    stack: str
    level: str
    signature: str
    state: str
    step: int
    steps: Optional[int]
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # key → (best value, its step)
    last: dict[str, float] = field(default_factory=dict)  # key → last value
    codes: Optional[int] = None  # K of this level's quantiser (None: no codes)
    checkpoint: Optional[int] = None  # step of the latest complete checkpoint
    export: bool = False
    wandb: Optional[str] = None
    diff: Optional[list[str]] = None  # key=value where the run differs from the stack's YAML (None: no YAML)
    error: Optional[str] = None
    updated: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["path"] = str(self.path)
        d["best"] = {k: {"value": v, "step": s} for k, (v, s) in self.best.items()}
        return d


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(config: dict[str, Any], level: str) -> Optional[list[str]]:
    """``key=value`` for every setting of the run that differs from its stack's shipped YAML (the
    audio, data and own-level sections; ``run.*`` and ``quality.*`` change nothing trained), or
    None when the stack has no YAML under that name."""
    from largewave.config import ConfigError, load_config

    try:
        base = load_config(config.get("stack", "")).to_dict()
    except ConfigError:
        return None
    mine, theirs = _flatten(config), _flatten(base)
    keep = ("audio.", "data.", f"levels.{level}.")
    out = []
    for k in sorted(set(mine) | set(theirs)):
        if k.startswith(keep) and mine.get(k) != theirs.get(k):
            out.append(f"{k.removeprefix('levels.')}={mine.get(k)}")
    return out


def load_run(path: str | Path) -> RunInfo:
    """Everything :func:`format_table` shows about one run folder."""
    path = Path(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        config = {}
    level = path.parent.name
    lv = (config.get("levels") or {}).get(level) or {}
    rows = read_metrics(path / "metrics.jsonl")
    best: dict[str, tuple[float, int]] = {}
    last: dict[str, float] = {}
    for row in rows:
        step = int(row.get("step", -1))
        for k, v in row.items():
            if k == "step" or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            last[k] = v
            direction = BEST.get(k)
            if direction and (k not in best or (v < best[k][0] if direction == "min" else v > best[k][0])):
                best[k] = (v, step)
    state = read_state(path)
    ck = latest_complete(path / "checkpoints")
    export = (path / "export.pt").exists()
    if state:
        shown = live_state(state)
    else:  # a folder from before state.json existed: judged from what it holds
        shown = "done" if export else "stopped"
    step = max([int(state.get("step", 0) or 0), rows[-1].get("step", 0) if rows else 0, ck.step if ck else 0])
    quantiser = lv.get("quantiser") or {}
    has_codes = lv.get("kind") == "ada" and quantiser.get("kind") != "continuous"
    return RunInfo(
        path=path, stack=config.get("stack") or path.parent.parent.name, level=level, signature=path.name,
        state=shown, step=int(step), steps=(lv.get("train") or {}).get("steps"), best=best, last=last,
        codes=quantiser.get("codes") if has_codes else None, checkpoint=ck.step if ck else None, export=export,
        wandb=state.get("wandb_path") or _wandb_fallback(path), diff=config_diff(config, level) if config else None,
        error=state.get("error") if shown == "failed" else None,
        updated=max([float(state.get("updated", 0) or 0)] + [p.stat().st_mtime for p in (path / "metrics.jsonl",
                                                                                              path / "config.yaml")
                                                              if p.exists()]))


def _wandb_fallback(path: Path) -> Optional[str]:
    """The W&B run of a folder without state.json: its newest offline segment, or its run id."""
    offline = sorted((path / "wandb").glob("offline-run-*"))
    if offline:
        return f"offline:{offline[-1]}"
    rid = path / "wandb" / "run_id"
    return f"run id {rid.read_text().strip()}" if rid.exists() and rid.read_text().strip() else None


def find_runs(root: str | Path, stack: Optional[str] = None) -> list[RunInfo]:
    """Every run folder under ``root`` (``{root}/{stack}/{level}/{signature}/``), by stack, level
    and time; ``stack`` keeps one stack."""
    root = Path(root)
    stacks = [root / stack] if stack else sorted(p for p in root.glob("*") if p.is_dir())
    found = []
    for s in stacks:
        for sig in sorted(s.glob("*/*/signature.json")):
            if sig.parent.parent.name in ("samples", "submitit", "pbt"):
                continue
            found.append(load_run(sig.parent))
    order = {name: i for i, name in enumerate(["level1", "level2", "level3", "level4", "prior"])}
    return sorted(found, key=lambda r: (r.stack, order.get(r.level, 9), r.updated))


def _fmt(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _short_wandb(path: Optional[str]) -> str:
    """The table's W&B column: ``entity/project/id`` online, ``offline <id>`` (the folder is in
    ``largewave runs RUN``)."""
    if not path:
        return "-"
    if path.startswith("offline:"):
        return "offline " + path.rsplit("-", 1)[-1]
    return path


def row_cells(r: RunInfo) -> dict[str, str]:
    bpt = r.best.get("valid/bits_per_token")
    recon = [_fmt(r.last.get(f"valid/{k}"), fmt) for k, _, fmt in RECON]
    codes = r.last.get("valid/codes_used")
    return {
        "level": r.level, "signature": r.signature, "state": r.state,
        "step": f"{r.step}/{r.steps if r.steps is not None else '?'}",
        "best bits/tok": f"{bpt[0]:.3f} @{bpt[1]}" if bpt else "-",
        "last": _fmt(r.last.get("valid/bits_per_token")),
        "codes used": f"{int(codes)}/{r.codes}" if codes is not None and r.codes else "-",
        "recon LSD/flat/pc": "/".join(recon) if any(c != "-" for c in recon) else "-",
        "checkpoint": "-" if r.checkpoint is None else str(r.checkpoint),
        "W&B": _short_wandb(r.wandb),
        "config vs YAML": "?" if r.diff is None else (" ".join(r.diff) if r.diff else "same"),
    }


def format_table(runs: list[RunInfo]) -> str:
    if not runs:
        return "no runs"
    out = []
    for stack in dict.fromkeys(r.stack for r in runs):
        rows = [row_cells(r) for r in runs if r.stack == stack]
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in cols[:-1]}
        line = lambda row: "  ".join(f"{row[c]:<{widths[c]}}" for c in cols[:-1]) + "  " + row[cols[-1]]  # noqa: E731
        out.append(f"stack {stack}")
        out.append(line({c: c for c in cols}))
        out.extend(line(row) for row in rows)
        out.append("")
    return "\n".join(out).rstrip()


def format_detail(r: RunInfo) -> str:
    lines = [f"run        {r.path}", f"stack      {r.stack}, {r.level}, signature {r.signature}",
             f"state      {r.state}" + (f": {r.error}" if r.error else ""),
             f"progress   step {r.step} of {r.steps if r.steps is not None else '?'}; latest complete checkpoint: "
             + ("none" if r.checkpoint is None else f"step {r.checkpoint}") + ("; export.pt" if r.export else ""),
             f"W&B        {r.wandb or 'disabled'}",
             "config     " + ("(no shipped YAML for this stack name)" if r.diff is None else
                             ("same as the stack's YAML" if not r.diff else "differs from the stack's YAML: "
                              + " ".join(r.diff)))]
    keys = sorted(k for k in r.last if k.startswith("valid/"))
    if keys:
        lines.append("validation (best, at step · last):")
        for k in keys:
            b = r.best.get(k)
            lines.append(f"  {k.removeprefix('valid/'):<34} " + (f"{b[0]:10.4f} @{b[1]:<7d}" if b else " " * 19)
                         + f"  {r.last[k]:10.4f}")
    for k in ("train/bits_per_token", "perf/audio_s_per_s", "perf/step_time_s"):
        if k in r.last:
            lines.append(f"  {k:<34} last {r.last[k]:.4f}")
    return "\n".join(lines)


# ---- learning curves ---------------------------------------------------------------------------

_PANELS = (
    ("bits per token", (("train/bits_per_token", (70, 110, 200)), ("valid/bits_per_token", (220, 90, 40)),
                        ("valid/bits_per_token_shuffled_codes", (150, 150, 150)))),
    ("reconstruction LSD (dB)", (("valid/recon_lsd_db", (220, 90, 40)), ("valid/chance_lsd_db", (150, 150, 150)),
                                 ("valid/noise_lsd_db", (90, 170, 90)))),
    ("codes used", (("valid/codes_used", (120, 80, 180)),)),
)


def curves(rows: list[dict[str, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key → (steps, values) for every finite scalar of a metrics.jsonl."""
    acc: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                xs, ys = acc.setdefault(k, ([], []))
                xs.append(float(row["step"]))
                ys.append(float(v))
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in acc.items()}


def draw_curves(run: RunInfo, out: Optional[Path] = None) -> Optional[Path]:
    """The run's learning curves (bits/token; reconstruction LSD and codes used where logged) as a
    PNG beside the run (``curves.png``), drawn with Pillow; None when nothing was logged."""
    from PIL import Image, ImageDraw, ImageFont

    data = curves(read_metrics(run.path / "metrics.jsonl"))
    panels = [(title, [(k, c) for k, c in series if k in data]) for title, series in _PANELS]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return None
    W, H, L, R, T, B = 900, 270, 70, 20, 40, 40
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x_max = max(float(data[k][0].max()) for _, s in panels for k, _ in s) or 1.0
    for i, (title, series) in enumerate(panels):
        top = i * H
        y_all = np.concatenate([data[k][1] for k, _ in series])
        lo, hi = float(y_all.min()), float(y_all.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        x0, x1, y0, y1 = L, W - R, top + H - B, top + T
        sx = lambda x: x0 + (x1 - x0) * x / x_max  # noqa: E731
        sy = lambda y: y0 - (y0 - y1) * (y - lo) / (hi - lo)  # noqa: E731
        d.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
        for j in range(5):  # ticks and grid
            yv = lo + (hi - lo) * j / 4
            d.line([x0, sy(yv), x1, sy(yv)], fill=(230, 230, 230))
            d.text((4, sy(yv) - 6), f"{yv:.3g}", fill=(0, 0, 0), font=font)
            xv = x_max * j / 4
            d.text((sx(xv) - 10, y0 + 6), f"{xv:.0f}", fill=(0, 0, 0), font=font)
        d.text((x0, top + 4), f"{run.stack}/{run.level}/{run.signature}: {title}", fill=(0, 0, 0), font=font)
        legend_x = x1 - 10
        for k, colour in reversed(series):
            legend_x -= 8 * len(k) + 30
            d.line([legend_x, top + 26, legend_x + 16, top + 26], fill=colour, width=3)
            d.text((legend_x + 20, top + 20), k, fill=colour, font=font)
        for k, colour in series:
            xs, ys = data[k]
            pts = [(sx(x), sy(y)) for x, y in zip(xs, ys)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for x, y in pts if len(pts) <= 50 else pts[-1:]:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text(((x0 + x1) / 2 - 12, y0 + 20), "step", fill=(0, 0, 0), font=font)
    out = Path(out) if out else run.path / "curves.png"
    img.save(out, format="PNG")
    return out


def resolve_run(what: str, root: str | Path) -> Path:
    """A run folder from a path, a signature (or its prefix) or ``stack/level`` (the newest)."""
    p = Path(what)
    if (p / "signature.json").exists():
        return p
    root = Path(root)
    if (root / p / "signature.json").exists():
        return root / p
    matches = [s.parent for s in root.glob("*/*/*/signature.json") if s.parent.name.startswith(what)]
    if not matches and what.count("/") == 1:
        matches = [s.parent for s in (root / what).glob("*/signature.json")]
        matches = sorted(matches, key=lambda q: load_run(q).updated)[-1:]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no run {what!r}: give a run folder, a signature or STACK/LEVEL (runs under {root})")
    raise FileNotFoundError(f"{what!r} matches {len(matches)} runs: " + ", ".join(str(m) for m in matches[:6]))

