"""The training engine end to end: real DeepSpeed (gloo, CPU), real WebDataset shards, real
offline W&B, the real level-1 model at a tiny size. Ranks are separate processes started with
the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Two uninterrupted 2-rank reference runs (ZeRO-3 with a VQ quantiser, whose training draws from the
torch RNG, and ZeRO-2 with an argmax quantiser and a weights EMA; gradient accumulation 2; one
loader worker) are trained once and reused: interrupted runs — SIGKILL while a checkpoint is being
written, SIGKILL at a random moment of training, a SIGUSR2 stop request to one rank, a checkpoint
left incomplete — must end with a training state (weights, fp32 master partitions, optimizer
moments, LR schedule, loader position, RNG states, buffers, EMA) and an export bitwise identical to
theirs.

The random kill moments are drawn from a seed printed by the test (``LARGEWAVE_TEST_SEED=<seed>``
in the environment replays it).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shardutil import make_audio_shards, make_code_shards  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
STEPS = 8
SAVE_EVERY = 2  # the first complete checkpoint is step SAVE_EVERY


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    make_audio_shards(root / "audio", pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=2, split="train")
    make_audio_shards(root / "audio", pieces=1, seconds=1.0, segment_seconds=1.0, per_shard=2, split="valid", seed=1)
    return root


def write_config(root: Path, name: str = "tiny", *, zero: int = 2, accum: int = 2, ema: float = 0.0,
                 steps: int = STEPS, wandb: str = "disabled", audio: Path | None = None,
                 quantiser: str = "amae", precision: str = "fp32") -> Path:
    """A tiny level-1 ADA (≈10k parameters) on 256-token crops. The shard folder is part of the
    run signature, so runs meant to continue one another name the same ``audio`` folder.
    ``log_every: 1`` gives one console line per step: the kill tests watch it for progress.
    ``precision`` is explicit (fp32): exact-resume tests must not depend on what ``auto`` resolves to."""
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        stack: {name}
        data: {{shards: {audio or root / 'audio'}, workers: 1, seed: 0}}
        levels:
          level1:
            kind: ada
            hop: 4
            encoder: {{channels: 8, layers_per_stack: 2, stacks: 1, kernel_size: 3}}
            quantiser: {{kind: {quantiser}, codes: 16, dim: 8}}
            decoder: {{residual_channels: 8, gate_channels: 16, skip_channels: 16, stacks: 1, layers_per_stack: 3,
                       cond_channels: 8}}
            optim: {{lr: 3.0e-3, warmup_steps: 2, ema: {ema}}}
            train: {{steps: {steps}, crop: 256, micro_batch: 4, crops_per_segment: 2, grad_accum: {accum}, precision: {precision},
                     zero_stage: {zero}, log_every: 1, eval_every: 4, eval_batches: 2, sample_every: {steps},
                     sample_clips: 1, sample_seconds: 0.02, eval_clips: 0, save_every: {SAVE_EVERY}, keep_checkpoints: 3}}
        run: {{root: {root}/runs, wandb_mode: {wandb}, collective_timeout_s: 120}}
        """))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The ranks of one launch of ``launch/train.py``, each in its own session (so that a kill
    takes its loader workers along)."""

    def __init__(self, config: Path, world: int, overrides: list[str], logs: Path):
        port = _free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
            env.pop("WANDB_MODE", None)
            with open(self.logs[r], "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(TRAIN), "--stack", str(config), "--level", "1", *overrides],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"training did not finish in {timeout} s:\n{self.output(0)[-3000:]}")
        return codes

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.returncode is not None:  # reaped: its process group id may belong to someone else now
                continue
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    def freeze(self) -> None:
        """SIGSTOP every rank (and its loader workers): what is on disk stops changing, so the
        moment of a kill can be inspected before it is made."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def kill(self) -> None:
        self._signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()


def run_folder(root: Path) -> Path:
    (sig,) = list((root / "runs").glob("*/level1/*"))
    return sig


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step-*/COMPLETE"))


def incomplete_folders(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step-*")
                  if re.fullmatch(r"step-\d{8}", p.name) and not (p / "COMPLETE").exists())


_STEP_LINE = re.compile(r"\] step +(\d+)/\d+ \|.*\| ([0-9.]+) s/step")


def logged_steps(job: "Job") -> dict[int, float]:
    """Steps finished so far, from rank 0's per-step console line (``log_every: 1``): step → its
    training time in seconds."""
    return {int(m.group(1)): float(m.group(2)) for m in _STEP_LINE.finditer(job.output(0))}


def train_to_end(config: Path, world: int, logs: Path, overrides: tuple[str, ...] = ()) -> Job:
    job = Job(config, world, list(overrides), logs)
    codes = job.wait()
    assert codes == [0] * world, f"exit codes {codes}:\n{job.output(0)[-4000:]}"
    return job


def assert_same_export(a: Path, b: Path) -> None:
    ea = torch.load(a / "export.pt", weights_only=False)
    eb = torch.load(b / "export.pt", weights_only=False)
    assert ea["step"] == eb["step"] == STEPS
    assert ea["state_dict"].keys() == eb["state_dict"].keys()
    diff = [k for k in ea["state_dict"] if not torch.equal(ea["state_dict"][k], eb["state_dict"][k])]
    assert not diff, f"weights differ from the uninterrupted run: {diff}"
    if "train_state_dict" in ea:
        diff = [k for k in ea["train_state_dict"] if not torch.equal(ea["train_state_dict"][k], eb["train_state_dict"][k])]
        assert not diff, f"raw (non-EMA) weights differ: {diff}"


def logged_losses(job: Job) -> list[float]:
    return [float(line.split("| loss ")[1].split()[0]) for line in job.output(0).splitlines() if "| loss " in line]


# Entries of a checkpoint that legitimately differ between two runs of the same training, as
# fnmatch patterns on "<file relative to the step folder>:<dotted key path>". Nothing else may
# differ, bit for bit. (Checked against what the files hold: DeepSpeed's model/optim states and
# our client_state hold no wall-clock times, hostnames or pids; the DeepSpeed version and config
# are the same for both runs and are compared.)
RUN_SPECIFIC = (
    # The resolved config names the run root, a per-run temporary folder here (it is not part of
    # the run signature: a run folder may be moved); the rest of the config is compared.
    "client_state/common.pt:config.run.root",
    # Each run has its own W&B run id (a resumed run keeps *its own*; the reference run has
    # another). W&B is disabled in these runs, so both are "" — ignored all the same, because the
    # property is "same training", not "same W&B run".
    "client_state/common.pt:wandb_run_id",
    "*model_states.pt:largewave.wandb_run_id",
    # When the checkpoint was declared complete: wall-clock time.
    "COMPLETE:time",
)


def _run_specific(file: str, key: str) -> bool:
    return any(fnmatch.fnmatchcase(f"{file}:{key}", pat) for pat in RUN_SPECIFIC)


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"tensor{tuple(x.shape)} {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"ndarray{x.shape} {x.dtype}"
    r = repr(x)
    return r if len(r) < 120 else r[:117] + "..."


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def state_differences(a, b, file: str = "", key: str = "", out: list[str] | None = None) -> list[str]:
    """Every place where ``a`` and ``b`` (nested dicts / lists / tuples / tensors / numpy arrays /
    scalars / plain objects, as ``torch.load`` returns them) differ, bitwise, outside
    ``RUN_SPECIFIC``; as "file:key: what" lines."""
    out = [] if out is None else out
    where = f"{file}:{key}"
    if _run_specific(file, key):
        return out
    if type(a) is not type(b):
        out.append(f"{where}: type {type(a).__name__} != {type(b).__name__} ({_describe(a)} vs {_describe(b)})")
    elif isinstance(a, dict):
        if list(a) != list(b):
            out.append(f"{where}: keys differ: only in the first {sorted(map(str, a.keys() - b.keys()))}, "
                       f"only in the second {sorted(map(str, b.keys() - a.keys()))}, or order")
        for k in a:
            if k in b:
                state_differences(a[k], b[k], file, f"{key}.{k}" if key else str(k), out)
    elif isinstance(a, (list, tuple)):  # also torch.Size, namedtuples
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            state_differences(x, y, file, f"{key}[{i}]", out)
    elif torch.is_tensor(a):
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: {_describe(a)} != {_describe(b)}")
        elif not torch.equal(_bits(a), _bits(b)):
            n = int((_bits(a) != _bits(b)).sum()) if a.element_size() == 1 else int((a != b).sum())
            worst = f" (max |diff| {float((a.double() - b.double()).abs().max()):.3g})" if a.is_floating_point() else ""
            out.append(f"{where}: {_describe(a)}: {n} of {a.numel()} elements differ{worst}")
    elif isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out.append(f"{where}: {_describe(a)} differs from {_describe(b)}")
    elif isinstance(a, float):
        if struct.pack("<d", a) != struct.pack("<d", b):
            out.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, (int, str, bytes, bool, type(None))):  # also IntEnum (ZeroStageEnum)
        if a != b:
            out.append(f"{where}: {_describe(a)} != {_describe(b)}")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's LossScaler
        state_differences(vars(a), vars(b), file, f"{key}.__dict__", out)
    elif a != b:
        out.append(f"{where}: {_describe(a)} != {_describe(b)}")
    return out


def assert_same_checkpoint(a_step_dir: Path, b_step_dir: Path) -> None:
    """The two complete checkpoint folders hold the same training state, bit for bit: the same
    files (per rank: DeepSpeed's ``*model_states.pt`` and ``*optim_states.pt`` — weights, fp32
    master partitions, Adam's ``exp_avg``/``exp_avg_sq``/``step``, LR-scheduler state, engine
    counters — and our ``client_state/rank-*.pt`` — RNG states, loader position, rank-local
    buffers — plus ``client_state/common.pt`` — step, samples seen, EMA, counters, config — and
    the ``COMPLETE`` marker), compared value by value after ``torch.load`` (not byte by byte:
    pickles of equal values need not be equal files)."""
    files = {str(p.relative_to(a_step_dir)) for p in a_step_dir.rglob("*") if p.is_file()}
    other = {str(p.relative_to(b_step_dir)) for p in b_step_dir.rglob("*") if p.is_file()}
    assert files == other, f"{a_step_dir} and {b_step_dir} hold different files: {sorted(files ^ other)}"
    assert {"COMPLETE", "client_state/common.pt"} <= files and any(f.endswith("optim_states.pt") for f in files) \
        and any(f.startswith("client_state/rank-") for f in files), sorted(files)
    diffs: list[str] = []
    for f in sorted(files):
        if f.endswith(".pt"):
            x = torch.load(a_step_dir / f, map_location="cpu", weights_only=False)
            y = torch.load(b_step_dir / f, map_location="cpu", weights_only=False)
        elif f == "COMPLETE":
            x, y = (json.loads((d / f).read_text()) for d in (a_step_dir, b_step_dir))
        else:
            x, y = ((d / f).read_bytes() for d in (a_step_dir, b_step_dir))
        state_differences(x, y, f, "", diffs)
    assert not diffs, (f"the training state in {a_step_dir} differs from the uninterrupted run's {b_step_dir} "
                       f"({len(diffs)} differences):\n  " + "\n  ".join(_per_file(diffs)))


def _per_file(diffs: list[str], most: int = 6) -> list[str]:
    """At most ``most`` differences of each file, so that every file that differs is named."""
    lines: list[str] = []
    for f in dict.fromkeys(d.split(":", 1)[0] for d in diffs):
        mine = [d for d in diffs if d.split(":", 1)[0] == f]
        lines += mine[:most] + ([f"{f}: ... and {len(mine) - most} more"] if len(mine) > most else [])
    return lines


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted 2-rank runs, trained on first use: {3: run folder, 2: run folder}."""
    cache: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in cache:
            root = tmp_path_factory.mktemp(f"ref{zero}")
            cfg = reference_config(root, data, zero)
            job = train_to_end(cfg, 2, root / "logs")
            losses = logged_losses(job)
            assert len(losses) == STEPS and losses[-1] < losses[0], losses
            cache[zero] = run_folder(root)
        return cache[zero]

    return get


def reference_config(root: Path, data: Path, zero: int) -> Path:
    """ZeRO-3: a VQ-VAE level (its training draws from the torch RNG: restored RNG states matter);
    ZeRO-2: an argmax level with a weights EMA."""
    return write_config(root, zero=zero, ema=0.9 if zero == 2 else 0.0, audio=data / "audio",
                        quantiser="vqvae" if zero == 3 else "amae")


def fresh_copy(data: Path, tmp_path: Path, zero: int) -> Path:
    return reference_config(tmp_path, data, zero)


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override, key", [
    ("level1.train.stepz=3", "levels.level1.train.stepz"),
    ("level1.train.zero_stage=5", "levels.level1.train.zero_stage"),
    ("level1.train.crop=400000", "levels.level1.train.crop"),
    ("run.collective_timeout_s=0", "run.collective_timeout_s"),
])
def test_bad_config_fails_before_training_naming_the_key(data, tmp_path, override, key):
    cfg = write_config(data)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(TRAIN), "--stack", str(cfg), "--level", "1", override], cwd=REPO,
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 2, r.stdout + r.stderr
    assert key in r.stderr, r.stderr
    assert "deepspeed" not in r.stdout.lower() and not (data / "runs").exists()
    assert time.time() - t0 < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_rank_zero1_trains_logs_to_wandb_and_exports(data, tmp_path):
    shutil.copytree(data / "audio", tmp_path / "audio")
    cfg = write_config(tmp_path, zero=1, accum=1, wandb="offline")
    job = train_to_end(cfg, 1, tmp_path / "logs")
    losses = logged_losses(job)
    assert losses[-1] < losses[0], losses
    run = run_folder(tmp_path)
    assert (run / "config.yaml").exists() and (run / "signature.json").exists()
    seg = run / "snapshot" / "segment-000"
    assert {"command.txt", "git.txt", "git.diff", "pip-freeze.txt"} <= {p.name for p in seg.iterdir()}

    # metrics.jsonl holds every scalar by step; the offline W&B run has the same run id and audio.
    from largewave.engine.wandb_log import BEST, read_metrics

    (folder,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert folder.name.endswith(f"-{run_id}") and (folder / f"run-{run_id}.wandb").stat().st_size > 0
    rows = read_metrics(run / "metrics.jsonl")
    keys = set().union(*(row.keys() for row in rows))
    for k in ("loss", "loss/nll", "loss/diversity", "train/bits_per_token", "lr", "grad_norm",
              "perf/tokens_per_s_per_rank", "perf/audio_s_per_s_per_rank", "perf/step_time_s",
              "perf/data_wait_fraction", "perf/memory_gib", "valid/bits_per_token", "valid/bits_per_second",
              "valid/uses_codes_gap_bits", "valid/codes_used"):
        assert k in keys, f"{k} not logged; logged: {sorted(keys)}"
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps) and steps[-1] == STEPS
    assert list(folder.rglob("files/media/audio/**/*.wav")), "no audio in the W&B run"

    # The W&B summary (wandb's own, through its public run API) holds the best validation figures,
    # and export.pt went to W&B as an Artifact with its exact bytes.
    summary = json.loads((run / "wandb" / "summary.json").read_text())
    valid = [row for row in rows if "valid/bits_per_token" in row]
    assert len(valid) >= 2, valid
    for key, best in BEST.items():
        values = [row[key] for row in rows if key in row]
        if values:
            assert summary[key][best] == pytest.approx((min if best == "min" else max)(values)), (key, summary[key])
            assert summary[key]["last"] == pytest.approx(values[-1])
    art = json.loads((run / "wandb" / "export_artifact.json").read_text())
    import base64
    import hashlib

    assert art["type"] == "model" and "latest" in art["aliases"] and art["metadata"]["step"] == STEPS
    assert art["md5"] == base64.b64encode(hashlib.md5((run / "export.pt").read_bytes()).digest()).decode()
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == STEPS and state["wandb_path"].startswith("offline:")

    # The export loads without DeepSpeed into a fresh model and computes what the trained weights do.
    probe = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from largewave.engine import load_export
        from largewave.models import build_level
        model, cfg = load_export({str(run / 'export.pt')!r})
        assert "deepspeed" not in sys.modules and "wandb" not in sys.modules
        states = torch.load({str(run / 'checkpoints' / f'step-{STEPS:08d}' / 'mp_rank_00_model_states.pt')!r},
                            weights_only=False)
        trained = build_level(cfg, "level1")
        trained.load_state_dict(states["module"])
        trained.eval()
        tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = model.nll(tokens), trained.nll(tokens)
            ca, cb = model.encode(tokens), trained.encode(tokens)
        assert torch.equal(a, b) and torch.equal(ca, cb), (a, b)
        print("export-ok", float(a))
        """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "export-ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_zero3_loss_goes_down(reference):
    run = reference(3)
    assert complete_steps(run) == [4, 6, 8]  # keep_checkpoints=3
    assert (run / "export.pt").exists()


def kill_seed() -> int:
    """The seed of this session's random kill moments: LARGEWAVE_TEST_SEED replays one."""
    return int(os.environ.get("LARGEWAVE_TEST_SEED") or random.SystemRandom().randrange(1_000_000))


def kill_while_saving(job: Job, runs: Path, rng: random.Random, say) -> dict:
    """SIGKILL every rank while the checkpoint of a step drawn from the saves after the first
    complete one is being written: its folder exists but has no COMPLETE marker. The ranks are
    frozen first, so that "still incomplete" is checked at the very moment of the kill; a save that
    finished between the look and the freeze moves the target to the next save."""
    targets = list(range(2 * SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    target = rng.choice(targets)
    say(f"target: kill while step {target} is being saved")
    deadline = time.time() + 240
    while job.running() and time.time() < deadline:
        found = list(runs.glob(f"*/level1/*/checkpoints/step-{target:08d}"))
        if found and not (found[0] / "COMPLETE").exists():
            job.freeze()
            if not (found[0] / "COMPLETE").exists():
                run = found[0].parents[1]
                state = {"run": run, "complete": complete_steps(run), "incomplete": incomplete_folders(run),
                         "logged": max(logged_steps(job), default=0)}
                job.kill()
                return state
            job.thaw()
            say(f"step {target} was saved before the ranks froze; next save")
            later = [t for t in targets if t > target]
            assert later, "every targeted save finished before it could be interrupted"
            target = later[0]
        # Once the step is done its save is near and short (tens of ms): look without sleeping.
        time.sleep(0.0 if target in logged_steps(job) else 0.001)
    raise AssertionError(f"the run ended before step {target} was being saved:\n{job.output(0)[-2000:]}")


def kill_at_random_moment(job: Job, runs: Path, rng: random.Random, say) -> dict:
    """SIGKILL every rank at a moment drawn uniformly over the steps after the first complete
    checkpoint: a step s in (SAVE_EVERY, STEPS], then a fraction f ∈ [0, 1) into it. Step s starts
    when step s-1 is done (its console line, and its checkpoint when it saves one) and is expected
    to take as long as step s-1 did; the kill comes at f of that, or as soon as step s is logged."""
    s = rng.randint(SAVE_EVERY + 1, STEPS)
    f = rng.random()
    say(f"target: kill {f:.3f} into step {s}")
    deadline = time.time() + 240
    t_start = None
    while job.running() and time.time() < deadline:
        logged = logged_steps(job)
        run = next(iter(runs.glob("*/level1/*")), None)
        if t_start is None and s - 1 in logged and run is not None \
                and ((s - 1) % SAVE_EVERY or s - 1 in complete_steps(run)):
            t_start = time.time()
            t_kill = t_start + f * logged[s - 1]
        if t_start is not None and (time.time() >= t_kill or s in logged):
            job.freeze()
            state = {"run": run, "complete": complete_steps(run), "incomplete": incomplete_folders(run),
                     "logged": max(logged_steps(job), default=0), "late": s in logged}
            job.kill()
            return state
        time.sleep(0.001)
    raise AssertionError(f"the run ended before step {s} could be interrupted:\n{job.output(0)[-2000:]}")


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("zero, moment", [(z, m) for z in (2, 3) for m in ("random", "while saving")],
                         ids=lambda v: f"zero{v}" if isinstance(v, int) else v.replace(" ", "-"))
def test_sigkill_and_relaunch_is_bitwise_identical(reference, data, tmp_path, zero, moment):
    """A run SIGKILLed on every rank (at a random moment of training, or while a checkpoint is
    being written) and relaunched resumes from its last complete checkpoint before the end —
    dropping the interrupted one — and ends in the uninterrupted run's exact training state."""
    seed = kill_seed()
    rng = random.Random(f"{seed}-{zero}-{moment}")
    notes = [f"LARGEWAVE_TEST_SEED={seed}"]

    def say(msg: str) -> None:
        notes.append(msg)
        print(msg, flush=True)

    print(notes[0], "(set it to replay this test's kill moment)", flush=True)
    ref = reference(zero)
    cfg = fresh_copy(data, tmp_path, zero)
    job = Job(cfg, 2, [], tmp_path / "logs-1")
    try:
        killer = kill_while_saving if moment == "while saving" else kill_at_random_moment
        at = killer(job, tmp_path / "runs", rng, say)
    finally:
        job.kill()
    run = at["run"]
    late = " (the drawn moment came after the step ended)" if at.get("late") else ""
    say(f"SIGKILL after step {at['logged']} was logged{late}; complete checkpoints {at['complete']}, "
        f"incomplete {[p.name for p in at['incomplete']]}")
    why = "\n".join(notes)
    assert run == run_folder(tmp_path) and not (run / "export.pt").exists(), why
    assert at["complete"], f"killed before the first complete checkpoint\n{why}"
    resume_step = at["complete"][-1]
    assert SAVE_EVERY <= resume_step < STEPS, f"the kill came after the last checkpoint: nothing to resume\n{why}"
    if moment == "while saving":
        (partial,) = at["incomplete"]
        assert int(partial.name[5:]) == resume_step + SAVE_EVERY, why
        assert partial.is_dir() and not (partial / "COMPLETE").exists(), why
    job2 = train_to_end(cfg, 2, tmp_path / "logs-2")
    out = job2.output(0)
    assert f"resumed at step {resume_step} from {run / 'checkpoints' / f'step-{resume_step:08d}'}" in out, \
        f"{why}\n{out[-3000:]}"
    for partial in at["incomplete"]:
        assert f"removed incomplete checkpoint {partial} (interrupted while saving)" in out, f"{why}\n{out[-3000:]}"
    resumed_steps = [int(m.group(1)) for m in _STEP_LINE.finditer(out)]
    assert resumed_steps == list(range(resume_step + 1, STEPS + 1)), f"{why}\n{resumed_steps}"
    # The whole training state, at every step both runs kept (the final one at least), bit for bit.
    common = sorted(set(complete_steps(run)) & set(complete_steps(ref)))
    assert STEPS in common and any(c > resume_step for c in common), (common, why)
    for step in common:
        tag = f"step-{step:08d}"
        assert_same_checkpoint(run / "checkpoints" / tag, ref / "checkpoints" / tag)
    assert_same_export(run, ref)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigusr2_to_one_rank_stops_all_with_a_checkpoint_then_resumes_identically(reference, data, tmp_path):
    ref = reference(3)
    cfg = fresh_copy(data, tmp_path, 3)
    job = Job(cfg, 2, [], tmp_path / "logs-1")
    deadline = time.time() + 240
    while time.time() < deadline and job.running():
        runs = list((tmp_path / "runs").glob("*/level1/*"))
        if runs and complete_steps(runs[0]):
            break
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    job.procs[1].send_signal(signal.SIGUSR2)  # as Slurm would, but to one rank only: the others must follow
    codes = job.wait()
    assert codes == [3, 3], f"exit codes {codes}:\n{job.output(0)[-3000:]}"
    out = job.output(0)
    assert "stop requested (SIGUSR2)" in out
    run = run_folder(tmp_path)
    stopped = int(out.split("stopped at step ")[1].split(";")[0])
    assert stopped < STEPS and stopped in complete_steps(run)
    state = json.loads((run / "state.json").read_text())  # what `largewave runs` shows
    assert state["state"] == "stopped" and state["step"] == stopped and "SIGUSR2" in state["error"], state
    job2 = train_to_end(cfg, 2, tmp_path / "logs-2")
    assert f"resumed at step {stopped}" in job2.output(0)
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == STEPS and state["error"] is None, state
    tag = f"step-{STEPS:08d}"
    assert_same_checkpoint(run / "checkpoints" / tag, ref / "checkpoints" / tag)
    assert_same_export(run, ref)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_incomplete_checkpoint_is_skipped_for_the_previous_one(reference, data, tmp_path):
    ref = reference(2)
    root = tmp_path / "copy"
    shutil.copytree(ref.parents[3], root, symlinks=True)
    cfg = reference_config(root, data, 2)
    run = run_folder(root)
    last = run / "checkpoints" / f"step-{STEPS:08d}"
    (last / "COMPLETE").unlink()  # as if killed before all ranks had written
    for f in last.glob("*optim_states.pt"):
        f.write_bytes(b"torn")
    (run / "export.pt").unlink()
    job = train_to_end(cfg, 2, root / "logs-resume")
    out = job.output(0)
    assert "removed incomplete checkpoint" in out and f"resumed at step {STEPS - 2}" in out, out[-3000:]
    assert_same_checkpoint(last, ref / "checkpoints" / last.name)
    assert_same_export(run, ref)


@pytest.fixture(scope="module")
def one_rank_resume(reference, data, tmp_path_factory):
    """The ZeRO-2 reference's step-4 checkpoint (2 ranks) resumed on 1 rank (DeepSpeed's universal
    checkpoint), then one more step: what the resumed trainer holds, and the original folder."""
    ref = reference(2)
    tmp_path = tmp_path_factory.mktemp("one-rank")
    root = tmp_path / "copy"
    shutil.copytree(ref.parents[3], root, symlinks=True)
    cfg = reference_config(root, data, 2)
    run = run_folder(root)
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "export.pt").unlink()
    dump = tmp_path / "resumed.pt"
    probe = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}")
        from largewave.config import load_config
        from largewave.engine.deepspeed_config import lr_lambda
        from largewave.engine.trainer import Trainer
        cfg = load_config({str(cfg)!r})
        t = Trainer(cfg, "level1")
        t.setup(); t.resume()
        opt = t.engine.optimizer
        (flat,) = [p for g in opt.optimizer.param_groups for p in g["params"]]
        assert flat is opt.single_partition_of_fp32_groups[0]
        adam = opt.optimizer.state[flat]
        res = dict(step=t.step, samples_seen=t.samples_seen(), lr=t.engine.get_lr()[0],
                   want_lr=cfg.level("level1").optim.lr * lr_lambda(cfg.level("level1"))(4),
                   global_steps=t.engine.global_steps, global_samples=t.engine.global_samples,
                   fp32=flat.detach().clone(), exp_avg=adam["exp_avg"].clone(), exp_avg_sq=adam["exp_avg_sq"].clone(),
                   adam_step=adam["step"].clone(), sched=t.engine.lr_scheduler.state_dict(),
                   params={{n: p.detach().clone() for n, p in t.module.named_parameters()}},
                   buffers={{n: b.detach().clone() for n, b in t.module.named_buffers()}},
                   ema={{"decay": t.ema.decay, "shadow": {{k: v.clone() for k, v in t.ema.shadow.items()}}}},
                   loader=t.loader.state_dict())
        stats = t.train_step()
        res["loss_after"] = stats["loss"]
        res["loader_after"] = t.loader.state_dict()
        t.teardown()
        torch.save(res, {str(dump)!r})
        print("PROBE-OK")
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert "PROBE-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(dump, weights_only=False), run / "checkpoints" / "step-00000004"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_checkpoint_resumes_on_one_rank(one_rank_resume):
    """Universal checkpoint: step, fp32 master weights, Adam moments, lr schedule, EMA and the
    global sample position carry over exactly — checked against the 2-rank run's own ZeRO-2
    partitions, not against the universal conversion the resume read."""
    res, ckpt = one_rank_resume

    def load(name: str):
        return torch.load(ckpt / name, map_location="cpu", weights_only=False)

    parts = [load(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"] for r in (0, 1)]
    assert [p["partition_count"] for p in parts] == [[2], [2]]

    def whole(get) -> torch.Tensor:
        """Rank 0's flat partition then rank 1's, each without its trailing alignment padding."""
        return torch.cat([get(p)[: get(p).numel() - p["group_paddings"][0]] for p in parts])

    fp32 = whole(lambda p: p["single_partition_of_fp32_groups"][0])
    moments = {k: whole(lambda p: p["base_optimizer_state"]["state"][0][k]) for k in ("exp_avg", "exp_avg_sq")}
    n = sum(v.numel() for v in res["params"].values())
    assert fp32.numel() == n and all(m.numel() == n for m in moments.values()), (fp32.numel(), n)
    assert [float(p["base_optimizer_state"]["state"][0]["step"]) for p in parts] == [4.0, 4.0]
    model = load("mp_rank_00_model_states.pt")
    common = load("client_state/common.pt")
    old = load("client_state/rank-00000.pt")["loader"]

    assert res["step"] == 4 and res["global_steps"] == 4 and float(res["adam_step"]) == 4.0, res["step"]
    # steps × micro-batch × accumulation × old ranks
    assert res["samples_seen"] == res["global_samples"] == common["samples_seen"] == 4 * 4 * 2 * 2
    assert abs(res["lr"] - res["want_lr"]) < 1e-12, (res["lr"], res["want_lr"])
    # Bitwise: the fp32 master weights (in the optimizer and in the module), both Adam moments,
    # the LR-scheduler state and the EMA weights.
    diffs: list[str] = []
    for key, want in (("fp32", fp32), *moments.items()):
        state_differences(res[key][:n], want, "1-rank optimizer vs 2-rank partitions", key, diffs)
        assert not res[key][n:].any(), f"{key}: non-zero alignment padding"
    flat_params = torch.cat([v.flatten() for v in res["params"].values()])
    state_differences(flat_params, fp32, "1-rank module vs 2-rank fp32 partitions", "parameters", diffs)
    state_differences(res["sched"], model["lr_scheduler"], "lr_scheduler", "", diffs)
    state_differences(res["ema"], common["ema"], "ema", "", diffs)
    assert not diffs, "the 1-rank resume differs from the 2-rank checkpoint:\n  " + "\n  ".join(_per_file(diffs))
    # The global position (batches × ranks) carries over exactly: 1 rank continues at 2 × the old
    # index in the same epoch (the epoch is long enough not to roll over here).
    new, after, accum = res["loader"], res["loader_after"], 2
    assert old["world_size"] == 2 and new["world_size"] == 1
    assert 2 * old["index"] + accum < new["batches_per_epoch"], (old, new)
    want = (old["epoch"], 2 * old["index"])
    assert (new["epoch"], new["index"]) == want, (f"1 rank resumed at (epoch, batch) {(new['epoch'], new['index'])}, "
                                                 f"not {want}: 2 ranks were at {(old['epoch'], old['index'])}")
    assert (after["epoch"], after["index"]) == (want[0], want[1] + accum), (want, after)
    assert math.isfinite(res["loss_after"]), res["loss_after"]  # and it trains on


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_checkpoint_resumes_on_one_rank_with_its_buffers(one_rank_resume):
    """Rank 0 of the new world size continues with old rank 0's buffers (a quantiser's usage
    statistics, a VQ-VAE codebook and EMA counts), as it continues with its loader position."""
    res, ckpt = one_rank_resume
    old = torch.load(ckpt / "client_state" / "rank-00000.pt", map_location="cpu", weights_only=False)["buffers"]
    diffs = state_differences(res["buffers"], old, "buffers", "")
    assert not diffs, "buffers not restored on 1 rank:\n  " + "\n  ".join(diffs)


@pytest.mark.timeout(240)
def test_nonfinite_losses_skip_updates_and_stop_the_run(data, tmp_path):
    """Weights made non-finite: every micro-batch is skipped on every rank without an optimizer
    update, counted, and ``max_nonfinite`` in a row stop the run with a clear error."""
    cfg = write_config(tmp_path, zero=2, accum=2, audio=data / "audio")
    probe = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}")
        from largewave.config import load_config
        from largewave.engine.trainer import NonFiniteLossError, Trainer
        t = Trainer(load_config({str(cfg)!r}, ["level1.train.max_nonfinite=3"]), "level1")
        t.setup(); t.resume()
        stats = t.train_step()  # a healthy step first
        assert t.engine.global_steps == 1, t.engine.global_steps
        before = {{k: v.detach().clone() for k, v in t.module.named_parameters()}}
        with torch.no_grad():
            t.module.decoder.out2.bias.fill_(float("nan"))
        try:
            t.train_step()
        except NonFiniteLossError as e:
            print("STOPPED", e)
        assert t.engine.global_steps == 1 and t.nonfinite_total == 3, (t.engine.global_steps, t.nonfinite_total)
        changed = [k for k, v in t.module.named_parameters() if k != "decoder.out2.bias" and not torch.equal(v, before[k])]
        assert not changed, changed
        t.teardown()
        print("NONFINITE-OK")
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=200, cwd=REPO, env=env)
    assert "NONFINITE-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 consecutive non-finite losses" in r.stdout and "max_nonfinite" in r.stdout
    assert "micro-batch skipped (2 in a row" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_upper_levels_train_on_code_shards_and_refuse_foreign_codes(tmp_path):
    """Level 2 trains on level-1 code shards; the prior on top refuses codes that its level
    below's export did not make, before anything starts."""
    for split, pieces in (("train", 3), ("valid", 1)):
        make_code_shards(tmp_path / "codes" / "level1", pieces=pieces, seconds=2.0, split=split, level=1, hop=4,
                         K=16, token_rate=4000.0)
        make_code_shards(tmp_path / "codes" / "level2", pieces=pieces, seconds=2.0, split=split, level=2, hop=4,
                         K=16, token_rate=1000.0)
    net = "{residual_channels: 8, gate_channels: 16, skip_channels: 16, stacks: 1, layers_per_stack: 3"
    train = "log_every: 2, eval_every: 2, eval_batches: 2, save_every: 2, sample_every: 4, sample_clips: 1, eval_clips: 0"
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(textwrap.dedent(f"""
        stack: tinystack
        data: {{shards: {tmp_path}/audio, codes: {tmp_path}/codes, workers: 1}}
        levels:
          level1:
            hop: 4
            encoder: {{channels: 8, layers_per_stack: 2}}
            quantiser: {{codes: 16, dim: 8}}
            decoder: {net}, cond_channels: 8}}
            train: {{crop: 256}}
          level2:
            hop: 4
            encoder: {{channels: 8, layers_per_stack: 2, input_embedding: 8}}
            quantiser: {{codes: 16, dim: 8}}
            decoder: {net}, cond_channels: 8}}
            optim: {{lr: 3.0e-3, warmup_steps: 1}}
            train: {{steps: 4, crop: 128, micro_batch: 4, {train}}}
          prior:
            kind: prior
            hop: 1
            decoder: {net}, cond_channels: 0}}
            train: {{steps: 4, crop: 64, micro_batch: 4, {train}}}
        run: {{root: {tmp_path}/runs, wandb_mode: disabled}}
        """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(TRAIN), "--stack", str(cfg), "--level", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "vocabulary        16 tokens at 4000 Hz" in r.stdout and "uses-the-codes gap" in r.stdout
    (export,) = list((tmp_path / "runs").glob("tinystack/level2/*/export.pt"))
    r = subprocess.run([sys.executable, str(TRAIN), "--stack", str(cfg), "--level", "prior"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data.codes" in r.stderr and "recompute the codes of level2" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_hung_rank_makes_the_others_fail_after_the_collective_timeout(data, tmp_path):
    cfg = write_config(tmp_path, zero=2, audio=data / "audio", steps=400)
    job = Job(cfg, 2, ["run.collective_timeout_s=10"], tmp_path / "logs")
    try:
        deadline = time.time() + 180
        while job.running() and time.time() < deadline:
            runs = list((tmp_path / "runs").glob("*/level1/*"))
            if runs and complete_steps(runs[0]):
                break
            time.sleep(0.05)
        assert job.running(), job.output(0)[-2000:]
        os.kill(job.procs[1].pid, signal.SIGSTOP)  # rank 1 hangs (as on a wedged node)
        t0 = time.time()
        code = job.procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        job.kill()
    assert code != 0 and waited < 60, (code, waited)
    out = job.output(0)
    assert "Timed out" in out and "run.collective_timeout_s" in out, out[-3000:]
