"""The quality gate can fail, and does not fail honest users: an untrained level 1 (0 steps) fails
it, the smoke recipe's level 1 passes it — real training on the rendered demo piano, the smoke
demo's own settings (``launch/demo.py --smoke``), real DeepSpeed. Equal-RMS noise fails every
floor of the demo's gate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largewave import quality
from largewave.cli.demo import RANKS, SMOKE_OVERRIDES
from largewave.config import LevelGate, load_config
from largewave.report import Report, _floor_checks, stack_report

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> list[str]:
    """The smoke demo's config, with its own folders: a minute of rendered piano in shards."""
    root = tmp_path_factory.mktemp("learning")
    # one rank accumulating RANKS micro-batches: the smoke demo's global batch (it trains on RANKS ranks)
    overrides = [*SMOKE_OVERRIDES, f"level1.train.grad_accum={RANKS}", f"run.root={root / 'runs'}",
                 f"data.raw_dir={root / 'raw'}",
                 f"data.shards={root / 'audio'}", f"data.codes={root / 'codes'}", "run.wandb_mode=disabled"]
    r = subprocess.run([sys.executable, str(REPO / "shards" / "build_audio.py"), "--config", "demo", "--quiet",
                        *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return overrides


def train_level1(overrides: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--stack", "demo", "--level", "1",
                        *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_untrained_level1_fails_the_gate_and_the_smoke_recipe_passes(smoke):
    untrained = [*smoke, "level1.train.steps=0"]
    train_level1(untrained)
    rep = stack_report(load_config("demo", untrained), levels=["level1"])
    failed = [c.name for c in rep.checks if c.required and not c.ok]
    assert not rep.ok and "level1 reconstruction LSD beats noise" in failed, rep.format()

    out = train_level1(smoke)
    cfg = load_config("demo", smoke)
    rep = stack_report(cfg, levels=["level1"])
    assert rep.ok, rep.format()
    m = rep.levels["level1"]
    assert m["gap_bits"] > 0 and m["recon_lsd_db"] < m["noise_lsd_db"]
    print(rep.format())

    # the trainer's evaluation scored the same figures, printed them and wrote them to metrics.jsonl
    assert "reconstruction LSD" in out and "chance/noise" in out
    from largewave import stack

    run = stack.run_dir(cfg, "level1") / "metrics.jsonl"
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    evals = [r for r in rows if "valid/recon_lsd_db" in r]
    steps = cfg.level("level1").train.steps
    assert evals and evals[-1]["step"] == steps
    for k in ("valid/recon_flatness_excess_db", "valid/recon_pitch_class_agreement", "valid/noise_lsd_db",
              "valid/bits_per_token", "valid/uses_codes_gap_bits"):
        assert k in evals[-1] or k in {k2 for r in rows if r["step"] == steps for k2 in r}, k
    assert list(run.parent.glob(f"samples/step-{steps:08d}/quality-clip0.png"))


def test_noise_fails_every_floor_of_the_demo_gate():
    """A level whose reconstructions are equal-RMS noise fails the demo's floors."""
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    clip = sum(np.sin(2 * np.pi * f * t) * np.exp(-2 * t) for f in (261.6, 329.6, 392.0)) * 0.1
    clip = clip + 1e-3 * rng.standard_normal(len(clip))
    m = {"recon_" + k: v for k, v in quality.figures(clip, quality.noise_like(clip, seed=1)).as_dict().items()}
    m.update({"noise_" + k: v for k, v in quality.figures(clip, quality.noise_like(clip, seed=2)).as_dict().items()})
    m.update({"chance_" + k: v for k, v in quality.figures(clip, np.roll(clip, 8000) * 0.5).as_dict().items()})
    m["gap_bits"] = 0.0
    gate = load_config("demo").quality.gate["level1"]
    strict = LevelGate(gap_bits=0.0, lsd_db=12.0, flatness_excess_db=6.0, pitch_class=0.95, beat_chance=True)
    for g in (gate, strict):
        rep = Report()
        _floor_checks(rep, "level1", m, g)
        assert not rep.ok and not rep.checks[0].ok  # the gap floor (> 0)
    failed = [c.name for c in rep.checks if not c.ok]
    assert {"level1 reconstruction LSD", "level1 reconstruction flatness excess",
            "level1 reconstruction pitch-class agreement", "level1 reconstruction LSD beats chance"} <= set(failed)
