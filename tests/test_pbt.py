"""Population based training: a tiny VQ-VAE population completes exploit/explore rounds for real
(DeepSpeed on CPU, submitit's local executor), and an exploited member runs with its new
hyperparameters from a copy of its donor's checkpoint."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_slurm import write_config  # noqa: E402
from shardutil import make_audio_shards  # noqa: E402

from largewave.config import load_config  # noqa: E402
from largewave.engine.deepspeed_config import lr_lambda  # noqa: E402
from largewave.pbt import Member, PBTConfig, exploit_explore, perturb, score  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_exploit_explore_moves_the_bottom_to_perturbed_copies_of_the_top():
    rng = random.Random(0)
    members = [Member(i, {"lr": 1e-3 * (i + 1), "decay": 0.99}) for i in range(4)]
    for m, s in zip(members, [3.0, 1.0, 2.0, 4.0]):
        m.score = s
    pairs = exploit_explore(members, PBTConfig(members=4, fraction=0.25), rng)
    assert pairs == [(3, 1)]  # the worst copies the best
    lr = members[3].hparams["lr"]
    assert lr in (pytest.approx(2e-3 * 0.8), pytest.approx(2e-3 * 1.25))
    assert members[3].hparams["decay"] in (pytest.approx(1 - 0.01 * 0.8), pytest.approx(1 - 0.01 * 1.25))
    assert members[0].parent is None and members[3].parent == 1


def test_score_penalises_unused_codes():
    assert score({"bits_per_token": 5.0, "codes_used": 16}, 16, 1.0) == pytest.approx(5.0)
    assert score({"bits_per_token": 5.0, "codes_used": 4}, 16, 1.0) == pytest.approx(5.75)


def test_perturb_stays_in_bounds():
    rng = random.Random(1)
    hp = {"lr": 0.09, "decay": 0.9999}
    for _ in range(20):
        hp = perturb(hp, rng)
        assert 1e-6 <= hp["lr"] <= 0.1 and 0.5 <= hp["decay"] <= 0.9999


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_vqvae_population_completes_exploit_explore_rounds(tmp_path):
    make_audio_shards(tmp_path / "audio", pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=2, split="train")
    make_audio_shards(tmp_path / "audio", pieces=1, seconds=1.0, segment_seconds=1.0, per_shard=2, split="valid",
                      seed=1)
    cfg_path = write_config(tmp_path, tmp_path, steps=40)
    overrides = ["level1.quantiser.kind=vqvae", "level1.train.eval_batches=2", "level1.train.eval_clips=0",
                 "run.wandb_mode=offline"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "launch/pbt.py", "--stack", str(cfg_path), "--level", "1", "--members", "3",
                        "--rounds", "2", "--interval", "4", "--fraction", "0.34", "--cluster", "local", *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "runs" / "slurmtiny" / "pbt" / "pbt"
    lineage = [json.loads(line) for line in (root / "lineage.jsonl").read_text().splitlines()]
    assert sorted((x["round"], x["member"]) for x in lineage) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    copied = [x for x in lineage if x["round"] == 1 and x["parent"] is not None]
    assert len(copied) == 1, lineage
    me = copied[0]
    donor = next(x for x in lineage if x["round"] == 0 and x["member"] == me["parent"])
    worst = max((x for x in lineage if x["round"] == 0), key=lambda x: x["score"])
    assert me["member"] == worst["member"] and me["member"] != donor["member"]
    for k, v in me["hparams"].items():  # explored: the donor's values perturbed
        d = donor["hparams"][k]
        ratios = (0.8, 1.25)
        if k == "decay":
            assert any(math.isclose(1 - v, (1 - d) * f, rel_tol=1e-6) for f in ratios), (k, v, d)
        else:
            assert any(math.isclose(v, d * f, rel_tol=1e-6) for f in ratios), (k, v, d)
    # the exploited member really ran from the donor's checkpoint, with its own new schedule
    log = "\n".join(p.read_text() for p in root.glob(f"submitit/round-001-member-{me['member']:02d}/*/*.out"))
    assert f"warm start at step 4 from {donor['checkpoint']}" in log, log[-3000:]
    cfg = load_config(cfg_path, overrides + ["level1.train.steps=8", f"level1.optim.lr={me['hparams']['lr']!r}"])
    expected_lr = me["hparams"]["lr"] * lr_lambda(cfg.level("level1"))(4)
    assert f"this run's lr schedule: {expected_lr:.3g} now" in log, log[-3000:]
    assert (Path(me["checkpoint"]) / "COMPLETE").exists() and me["checkpoint"].endswith("step-00000008")
    # its own W&B run: different id from the donor's
    ids = {}
    for rec in (me, donor):
        run = Path(rec["checkpoint"]).parent.parent
        ids[rec["member"], rec["round"]] = (run / "wandb" / "run_id").read_text().strip()
    assert len(set(ids.values())) == 2, ids
