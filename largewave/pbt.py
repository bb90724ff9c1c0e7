"""Population based training (PBT) for a level, the way the paper trains VQ-VAE levels.

A population of ``members`` trains the same level with different hyperparameters. Training goes
in rounds of ``interval`` steps. After each round every member is scored on the validation split
(bits per token, plus a penalty for unused codes: ``score = bits/token + usage_weight · (1 −
codes used / K)``, lower is better); the bottom fraction **exploit** a top member — they continue
from a copy of its checkpoint — and **explore** — their hyperparameters are perturbed (× 0.8 or
× 1.25; the EMA decay moves in ``1 − decay``).

Every member-round is its own run folder, ``runs/<stack>/pbt/<name>/round-RRR/member-MM/``,
warm-started (``train.init_from``) from the previous round's checkpoint of the member itself or of
the member it copies, and paused at the round's end (``train.pause_at``). A warm start loads the
weights, buffers and optimizer state, but builds the learning-rate schedule from the member's own
(new) hyperparameters, uses its own W&B run id and reads its own data order (its own data seed) at
the same step — so an exploited member really runs with its new hyperparameters.

The controller's state (``pbt.json``) is written after every round: rerunning the same command
continues from the last finished round. Lineage (who copied whom, hyperparameters, scores) is in
``lineage.jsonl`` and logged to W&B (one run for the controller, grouped with its members).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from largewave.config import StackConfig, _level_key

# hyperparameter → (config key, lower bound, upper bound, kind)
SEARCH_SPACE = {
    "lr": ("optim.lr", 1e-6, 1e-1, "scale"),
    "commitment_weight": ("quantiser.commitment_weight", 1e-3, 10.0, "scale"),
    "decay": ("quantiser.decay", 0.5, 0.9999, "one_minus"),
    "diversity_weight": ("quantiser.diversity_weight", 1e-4, 10.0, "scale"),
}


@dataclass
class Member:
    index: int
    hparams: dict[str, float]
    parent: Optional[int] = None  # member copied at the start of this round (exploit), or None
    score: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)

    def overrides(self, level: str) -> list[str]:
        return [f"{level}.{SEARCH_SPACE[k][0]}={v!r}" for k, v in self.hparams.items()]


@dataclass
class PBTConfig:
    name: str = "pbt"
    members: int = 4
    rounds: int = 4
    interval: int = 100  # steps per round
    fraction: float = 0.25  # bottom / top fraction
    usage_weight: float = 1.0  # bits/token penalty for an unused codebook
    seed: int = 0

    def __post_init__(self):
        if self.members < 2:
            raise ValueError(f"--members {self.members}: a population needs at least 2 members")
        if self.rounds < 1 or self.interval < 1:
            raise ValueError("--rounds and --interval must be >= 1")
        if not 0 < self.fraction <= 0.5:
            raise ValueError(f"--fraction {self.fraction} must be in (0, 0.5]")


def default_space(cfg: StackConfig, level: str) -> list[str]:
    q = cfg.level(level).quantiser
    if q.kind == "vqvae":
        return ["lr", "commitment_weight"] + (["decay"] if q.ema else [])
    if q.kind == "amae":
        return ["lr", "diversity_weight"]
    return ["lr"]


def initial_population(cfg: StackConfig, level: str, pc: PBTConfig, space: list[str]) -> list[Member]:
    """Members spread log-uniformly around the config's values (× 1/3 … × 3)."""
    rng = random.Random(pc.seed)
    lv = cfg.level(level)
    base = {"lr": lv.optim.lr, "commitment_weight": lv.quantiser.commitment_weight, "decay": lv.quantiser.decay,
            "diversity_weight": lv.quantiser.diversity_weight}
    out = []
    for i in range(pc.members):
        hp = {}
        for k in space:
            if i == 0:
                hp[k] = base[k]  # member 0 keeps the config's own values
            elif SEARCH_SPACE[k][3] == "one_minus":
                hp[k] = _clip(k, 1 - (1 - base[k]) * math.exp(rng.uniform(-math.log(3), math.log(3))))
            else:
                hp[k] = _clip(k, base[k] * math.exp(rng.uniform(-math.log(3), math.log(3))))
        out.append(Member(index=i, hparams=hp))
    return out


def _clip(k: str, v: float) -> float:
    _, lo, hi, _ = SEARCH_SPACE[k]
    return float(min(hi, max(lo, v)))


def perturb(hparams: dict[str, float], rng: random.Random) -> dict[str, float]:
    out = {}
    for k, v in hparams.items():
        f = rng.choice([0.8, 1.25])
        out[k] = _clip(k, 1 - (1 - v) * f if SEARCH_SPACE[k][3] == "one_minus" else v * f)
    return out


def score(metrics: dict[str, float], k: int, usage_weight: float) -> float:
    used = metrics.get("codes_used", k)
    return float(metrics["bits_per_token"]) + usage_weight * (1.0 - min(1.0, used / k))


def exploit_explore(members: list[Member], pc: PBTConfig, rng: random.Random) -> list[tuple[int, int]]:
    """Bottom members copy a random top member and perturb its hyperparameters. Returns (copier, donor)."""
    ranked = sorted(members, key=lambda m: m.score)
    n = max(1, int(round(pc.fraction * len(members))))
    top, bottom = ranked[:n], ranked[-n:]
    pairs = []
    for m in bottom:
        donor = rng.choice(top)
        if donor.index == m.index:
            continue
        m.parent = donor.index
        m.hparams = perturb(donor.hparams, rng)
        pairs.append((m.index, donor.index))
    return pairs


class PBT:
    """Drives the rounds. ``run_round(members, round, overrides_of) -> {index: metrics}`` trains every
    member for one round and returns its final validation metrics; the launcher provides it
    (submitit jobs on Slurm or on this machine)."""

    def __init__(self, cfg: StackConfig, level: str, pc: PBTConfig, space: Optional[list[str]] = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.level, self.pc, self.log = cfg, _level_key(level), pc, log
        self.space = space or default_space(cfg, self.level)
        for k in self.space:
            if k not in SEARCH_SPACE:
                raise ValueError(f"unknown PBT hyperparameter {k!r} (known: {', '.join(SEARCH_SPACE)})")
        self.root = Path(cfg.run.root) / cfg.stack / "pbt" / pc.name
        self.state_path = self.root / "pbt.json"
        self.rng = random.Random(pc.seed)

    def member_root(self, rnd: int, index: int) -> Path:
        return self.root / f"round-{rnd:03d}" / f"member-{index:02d}"

    def member_overrides(self, m: Member, rnd: int, prev: Optional[dict[int, str]]) -> list[str]:
        """Config overrides of member ``m`` in round ``rnd``: its hyperparameters, its own run root
        and data seed, the steps of the whole schedule, where to pause, what to start from."""
        lv = self.cfg.level(self.level)
        total = self.pc.rounds * self.pc.interval
        ov = [f"run.root={self.member_root(rnd, m.index)}", f"data.seed={self.cfg.data.seed + m.index}",
              f"{self.level}.train.steps={total}", f"{self.level}.train.pause_at={(rnd + 1) * self.pc.interval}",
              f"{self.level}.train.eval_every={min(lv.train.eval_every, self.pc.interval)}",
              f"{self.level}.train.save_every={min(lv.train.save_every, self.pc.interval)}",
              *m.overrides(self.level)]
        if rnd > 0 and prev is not None:
            source = m.parent if m.parent is not None else m.index
            ov.append(f"{self.level}.train.init_from={prev[source]}")
        return ov

    def _save(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    def _lineage(self, record: dict[str, Any]) -> None:
        with open(self.root / "lineage.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, run_round: Callable[[list[Member], int, Callable[[Member], list[str]]], dict[int, dict]],
            wandb_log: Optional[Callable[[dict[str, Any], int], None]] = None) -> list[Member]:
        k = self.cfg.level(self.level).quantiser.codes
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            members = [Member(**m) for m in state["members"]]
            start, prev = state["next_round"], {int(i): p for i, p in state["checkpoints"].items()}
            self.rng.setstate(_rng_state_from_json(state["rng"]))
            self.log(f"[pbt] {self.root}: continuing at round {start} of {self.pc.rounds}")
        else:
            members = initial_population(self.cfg, self.level, self.pc, self.space)
            start, prev = 0, None
        for rnd in range(start, self.pc.rounds):
            t0 = time.time()
            self.log(f"[pbt] round {rnd + 1}/{self.pc.rounds}: " + "; ".join(
                f"m{m.index}" + (f"←m{m.parent}" if m.parent is not None else "") + " "
                + ", ".join(f"{h}={v:.3g}" for h, v in m.hparams.items()) for m in members))
            results = run_round(members, rnd, lambda m, rnd=rnd, prev=prev: self.member_overrides(m, rnd, prev))
            for m in members:
                m.metrics = {key: float(v) for key, v in results[m.index]["metrics"].items()}
                m.score = score(m.metrics, k, self.pc.usage_weight)
            checkpoints = {m.index: results[m.index]["checkpoint"] for m in members}
            for m in sorted(members, key=lambda m: m.score):
                rec = {"round": rnd, "member": m.index, "parent": m.parent, "hparams": m.hparams, "score": m.score,
                       "metrics": m.metrics, "checkpoint": checkpoints[m.index], "step": (rnd + 1) * self.pc.interval}
                self._lineage(rec)
                if wandb_log is not None:
                    wandb_log({f"pbt/m{m.index}/score": m.score,
                               **{f"pbt/m{m.index}/{h}": v for h, v in m.hparams.items()},
                               f"pbt/m{m.index}/parent": -1 if m.parent is None else m.parent},
                              (rnd + 1) * self.pc.interval)
            best = min(members, key=lambda m: m.score)
            self.log(f"[pbt] round {rnd + 1} scored in {time.time() - t0:.0f} s: " + "; ".join(
                f"m{m.index} {m.score:.3f}" for m in sorted(members, key=lambda m: m.score))
                + f" (best m{best.index})")
            for m in members:
                m.parent = None
            if rnd < self.pc.rounds - 1:
                for copier, donor in exploit_explore(members, self.pc, self.rng):
                    self.log(f"[pbt]   m{copier} copies m{donor} and explores: "
                             + ", ".join(f"{h}={v:.3g}" for h, v in members[copier].hparams.items()))
            prev = checkpoints
            self._save({"members": [asdict(m) for m in members], "next_round": rnd + 1,
                        "checkpoints": {str(i): p for i, p in checkpoints.items()},
                        "rng": _rng_state_to_json(self.rng.getstate())})
        return members


def _rng_state_to_json(state) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_state_from_json(state) -> tuple:
    return (state[0], tuple(state[1]), state[2])
