"""``largewave runs``: the figures, states and config differences read back from run folders.

The folders here are written with the same functions the trainer uses (``dump_yaml``,
``write_state``, the metrics.jsonl format, checkpoint markers); a real training run read by the
installed command is in ``test_cli_install.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from largewave import runs
from largewave.config import dump_yaml, load_config
from largewave.engine import checkpoint as ckpt
from largewave.engine.run_folder import write_state

REPO = Path(__file__).resolve().parent.parent


def make_run(root: Path, sig: str, overrides: list[str], rows: list[dict], level: str = "level1") -> Path:
    cfg = load_config("demo", overrides)
    run = root / "demo" / level / sig
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "signature.json").write_text("{}")
    with open(run / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 9, "valid/bits_')  # a line torn by a kill is skipped
    return run


ROWS = [{"step": 2, "train/bits_per_token": 6.0}, {"step": 2, "valid/bits_per_token": 3.0, "valid/codes_used": 20},
        {"step": 4, "valid/bits_per_token": 2.5, "valid/codes_used": 30, "valid/recon_lsd_db": 11.0,
         "valid/recon_flatness_excess_db": 4.0, "valid/recon_pitch_class_agreement": 0.9},
        {"step": 6, "train/bits_per_token": 4.0}, {"step": 6, "valid/bits_per_token": 2.7, "valid/codes_used": 25,
                                                   "valid/recon_lsd_db": 12.0, "valid/recon_pitch_class_agreement": 0.95}]


def test_best_last_state_diff_and_table(tmp_path):
    run = make_run(tmp_path, "aaaaaaaaaaaa", ["level1.train.steps=7", "level1.optim.lr=0.0007"], ROWS)
    write_state(run, "running", step=6, steps=7, wandb_path="offline:/x/offline-run-20260101_000000-abcd1234")
    (run / "checkpoints" / ckpt.tag_for(4)).mkdir(parents=True)
    ckpt.write_complete(run / "checkpoints" / ckpt.tag_for(4), 4, 1, 1)
    (run / "checkpoints" / ckpt.tag_for(6)).mkdir()  # incomplete: not the latest checkpoint

    info = runs.load_run(run)
    assert info.state == "running"  # its pid (this process) is alive
    assert info.best["valid/bits_per_token"] == (2.5, 4) and info.last["valid/bits_per_token"] == 2.7
    assert info.best["valid/codes_used"] == (30, 4) and info.best["valid/recon_pitch_class_agreement"] == (0.95, 6)
    assert info.step == 6 and info.steps == 7 and info.checkpoint == 4 and info.codes == 64
    assert info.diff == ["level1.optim.lr=0.0007", "level1.train.steps=7"]

    table = runs.format_table([info])
    line = table.splitlines()[2]
    for cell in ("level1", "aaaaaaaaaaaa", "running", "6/7", "2.500 @4", "2.700", "25/64", "12.0/+4.0/0.950",
                 "offline abcd1234", "level1.optim.lr=0.0007 level1.train.steps=7"):
        assert cell in line, (cell, line)

    # a process that died without a word (SIGKILL) is not shown as running
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = json.loads((run / "state.json").read_text())
    state["pid"] = dead.pid
    (run / "state.json").write_text(json.dumps(state))
    assert runs.load_run(run).state == "stopped"
    write_state(run, "failed", error="NonFiniteLossError: 3 consecutive non-finite losses")
    info = runs.load_run(run)
    assert info.state == "failed" and "non-finite" in runs.format_detail(info)


def test_curves_png_and_finding_runs(tmp_path):
    a = make_run(tmp_path, "abc123000000", [], ROWS)
    make_run(tmp_path, "abd456000000", ["level1.train.steps=9"], ROWS[:2])
    (tmp_path / "demo" / "samples" / "x").mkdir(parents=True)  # not a run
    found = runs.find_runs(tmp_path)
    assert [r.signature for r in found] == ["abc123000000", "abd456000000"]
    assert found[0].diff == [] and found[0].state == "stopped"  # no state.json, no export
    png = runs.draw_curves(found[0])
    assert png == a / "curves.png"
    img = Image.open(png)
    assert img.size == (900, 3 * 270)  # bits/token, reconstruction LSD, codes used
    assert len(set(img.convert("RGB").getdata())) > 4  # axes, text and coloured curves, not a blank page

    assert runs.resolve_run("abc", tmp_path) == a
    assert runs.resolve_run(str(a), tmp_path) == a
    with pytest.raises(FileNotFoundError, match="matches 2 runs"):
        runs.resolve_run("ab", tmp_path)
    with pytest.raises(FileNotFoundError, match="no run"):
        runs.resolve_run("zzz", tmp_path)


def test_command_line(tmp_path):
    make_run(tmp_path, "abc123000000", ["level1.train.steps=7"], ROWS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "largewave", "runs", "--root", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and "2.500 @4" in r.stdout and "level1.train.steps=7" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "largewave", "runs", "demo/level1", "--root", str(tmp_path), "--json"],
                       capture_output=True, text=True, env=env, timeout=60)
    out = json.loads(r.stdout)
    assert out["best"]["valid/bits_per_token"] == {"value": 2.5, "step": 4} and Path(out["curves"]).exists()
    r = subprocess.run([sys.executable, "-m", "largewave", "runs", "nope", "--root", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: no run 'nope'"), r.stderr
