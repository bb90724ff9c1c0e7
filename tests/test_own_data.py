"""The README's "Your own recordings" commands, run as written on a generated folder of recordings
(MAESTRO-like: nested folders, 22.05 kHz stereo WAV and FLAC, a split CSV), through a few steps of
level-1 training of ``configs/piano.yaml``. Only the input path is replaced, and only training-size
overrides are appended (steps, crop, batch); a README that drifts from the code fails here."""
from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from largewave.data.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SMALL = ["level1.train.steps=2", "level1.train.micro_batch=1", "level1.train.crop=2048", "level1.train.eval_every=1000",
         "level1.train.eval_batches=1", "level1.train.eval_clips=0", "level1.train.sample_every=1000",
         "level1.train.save_every=2", "level1.train.log_every=1", "run.wandb_mode=disabled", "data.workers=1"]


def readme_commands() -> list[str]:
    """The shell block after the ``own-data`` marker, one command per entry (continuations joined)."""
    text = README.read_text()
    m = re.search(r"<!-- own-data[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert m, "README.md lost its own-data block"
    return [c.strip() for c in m.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def make_recordings(root: Path) -> None:
    """Six 62-s pieces in composer folders, stereo at 22.05 kHz, and a MAESTRO-style CSV."""
    rng = np.random.default_rng(0)
    sr = 22050
    rows = []
    for i, split in enumerate(["train"] * 4 + ["validation", "test"]):
        t = np.arange(int(62 * sr)) / sr
        f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
        note = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3)) * np.exp(-(t % 2.0))
        x = 0.2 * np.stack([note, 0.8 * note], 1) + 0.002 * rng.standard_normal((len(t), 2))
        rel = f"2018/composer{i}/piece{i}.{'wav' if i % 2 else 'flac'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, x.astype(np.float32), sr)
        rows.append({"canonical_composer": f"Composer {i}", "canonical_title": f"Piece {i}", "split": split,
                     "year": 2018, "midi_filename": rel.rsplit(".", 1)[0] + ".midi", "audio_filename": rel,
                     "duration": 62.0})
    with open(root / "maestro-v3.0.0.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_own_recordings_commands_train_level1(tmp_path):
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["shards/build_audio.py", "launch/train.py"]
    recordings = tmp_path / "maestro-v3.0.0"
    make_recordings(recordings)
    work = tmp_path / "work"  # a checkout's layout, so that relative paths land here, not in the repo
    work.mkdir()
    for d in ("shards", "launch", "configs", "largewave"):
        (work / d).symlink_to(REPO / d)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outputs = []
    for cmd in commands:
        argv = shlex.split(cmd.replace("/data/maestro-v3.0.0", str(recordings)))
        assert argv[0] == "python"
        if argv[1] == "launch/train.py":
            argv += SMALL
        r = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=500)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        outputs.append(r.stdout + r.stderr)
    m = read_manifest(work / "data" / "piano" / "audio")  # where configs/piano.yaml's data.shards points
    assert (len(m.shards("train")) > 0, m.samples("train"), m.samples("valid"), m.samples("test")) == (True, 4, 1, 1)
    assert "step       2/2" in outputs[1] and "data              data/piano/audio" in outputs[1]
    assert list((work / "runs" / "piano" / "level1").glob("*/export.pt"))


def test_code_usage_histogram_of_paper_scale_codebooks():
    """K = 2048 (configs/piano.yaml) is more bins than wandb.Histogram takes (512): summed into groups."""
    from largewave.engine.wandb_log import HISTOGRAM_BINS, WandbLogger

    counts = np.arange(2048, dtype=np.float64)
    h = WandbLogger.histogram(None, counts)
    assert len(h.histogram) == HISTOGRAM_BINS and sum(h.histogram) == counts.sum() and h.bins[-1] == 2048
    assert list(WandbLogger.histogram(None, np.arange(64)).histogram) == list(range(64))
