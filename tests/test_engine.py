"""The training engine end to end: real DeepSpeed (gloo, CPU), real WebDataset shards, real
offline W&B, the real level-1 model at a tiny size. Ranks are separate processes started with
the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Two uninterrupted 2-rank reference runs (ZeRO-3 and ZeRO-2 with a weights EMA; gradient
accumulation 2; one loader worker) are trained once and reused: interrupted runs — SIGKILL while
a checkpoint is being written, SIGKILL at a random moment of training, a SIGUSR2 stop request to
one rank, a checkpoint left incomplete — must end with an export bitwise identical to theirs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shardutil import make_audio_shards, make_code_shards  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
STEPS = 8


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    make_audio_shards(root / "audio", pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=2, split="train")
    make_audio_shards(root / "audio", pieces=1, seconds=1.0, segment_seconds=1.0, per_shard=2, split="valid", seed=1)
    return root


def write_config(root: Path, name: str = "tiny", *, zero: int = 2, accum: int = 2, ema: float = 0.0,
                 steps: int = STEPS, wandb: str = "disabled", audio: Path | None = None) -> Path:
    """A tiny level-1 ADA (≈10k parameters) on 256-token crops. The shard folder is part of the
    run signature, so runs meant to continue one another name the same ``audio`` folder."""
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        stack: {name}
        data: {{shards: {audio or root / 'audio'}, workers: 1, seed: 0}}
        levels:
          level1:
            kind: ada
            hop: 4
            encoder: {{channels: 8, layers_per_stack: 2, stacks: 1, kernel_size: 3}}
            quantiser: {{kind: amae, codes: 16, dim: 8}}
            decoder: {{residual_channels: 8, gate_channels: 16, skip_channels: 16, stacks: 1, layers_per_stack: 3,
                       cond_channels: 8}}
            optim: {{lr: 3.0e-3, warmup_steps: 2, ema: {ema}}}
            train: {{steps: {steps}, crop: 256, micro_batch: 4, crops_per_segment: 2, grad_accum: {accum},
                     zero_stage: {zero}, log_every: 2, eval_every: 4, eval_batches: 2, sample_every: {steps},
                     sample_clips: 1, sample_seconds: 0.02, save_every: 2, keep_checkpoints: 3}}
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

    def kill(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()


def run_folder(root: Path) -> Path:
    (sig,) = list((root / "runs").glob("*/level1/*"))
    return sig


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step-*/COMPLETE"))


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


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted 2-rank runs, trained on first use: {3: run folder, 2: run folder}."""
    cache: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in cache:
            root = tmp_path_factory.mktemp(f"ref{zero}")
            cfg = write_config(root, zero=zero, ema=0.9 if zero == 2 else 0.0, audio=data / "audio")
            job = train_to_end(cfg, 2, root / "logs")
            losses = logged_losses(job)
            assert len(losses) == STEPS // 2 and losses[-1] < losses[0], losses
            cache[zero] = run_folder(root)
        return cache[zero]

    return get


def fresh_copy(data: Path, tmp_path: Path, zero: int) -> Path:
    return write_config(tmp_path, zero=zero, ema=0.9 if zero == 2 else 0.0, audio=data / "audio")


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

    # The offline W&B run holds the metric keys and audio.
    from largewave.engine.wandb_log import offline_runs, read_offline_run

    (folder,) = offline_runs(run)
    rec = read_offline_run(folder)
    assert rec["run_id"] == (run / "wandb" / "run_id").read_text().strip()
    keys = set().union(*(row.keys() for row in rec["history"]))
    for k in ("loss", "loss/nll", "loss/diversity", "train/bits_per_token", "lr", "grad_norm",
              "perf/tokens_per_s_per_rank", "perf/audio_s_per_s_per_rank", "perf/step_time_s",
              "perf/data_wait_fraction", "perf/memory_gib", "valid/bits_per_token", "valid/bits_per_second",
              "valid/uses_codes_gap_bits", "valid/codes_used", "valid/code_usage/_type"):
        assert k in keys, f"{k} not logged; logged: {sorted(keys)}"
    audio = [k for row in rec["history"] for k, v in row.items() if k.endswith("/_type") and v == "audio-file"]
    assert audio, "no audio item in the W&B run"
    assert list(folder.rglob("files/media/audio/**/*.wav"))
    steps = [row["_step"] for row in rec["history"]]
    assert steps == sorted(steps)

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


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("zero, moment", [(3, "while saving"), (2, "random")])
def test_sigkill_and_relaunch_is_bitwise_identical(reference, data, tmp_path, zero, moment):
    ref = reference(zero)
    cfg = fresh_copy(data, tmp_path, zero)
    job = Job(cfg, 2, [], tmp_path / "logs-1")
    rng = random.Random(int(os.environ.get("LARGEWAVE_TEST_SEED", time.time_ns() % 10_000)))
    delay = rng.uniform(0.0, 1.0)
    killed_at = None
    deadline = time.time() + 240
    while job.running() and time.time() < deadline:
        runs = list((tmp_path / "runs").glob("*/level1/*"))
        steps = complete_steps(runs[0]) if runs else []
        if moment == "while saving" and steps:
            partial = [p for p in (runs[0] / "checkpoints").glob("step-*") if not (p / "COMPLETE").exists()]
            if partial:
                killed_at = f"while writing {partial[0].name}"
                break
        elif moment == "random" and steps:
            time.sleep(delay)
            killed_at = f"{delay:.2f} s after step {steps[-1]} was saved"
            break
        time.sleep(0.002)
    assert job.running(), f"the run ended before it could be killed:\n{job.output(0)[-2000:]}"
    job.kill()
    print(f"SIGKILL {killed_at}")
    run = run_folder(tmp_path)
    assert not (run / "export.pt").exists()
    resume_step = complete_steps(run)[-1]
    job2 = train_to_end(cfg, 2, tmp_path / "logs-2")
    assert f"resumed at step {resume_step}" in job2.output(0)
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
    job2 = train_to_end(cfg, 2, tmp_path / "logs-2")
    assert f"resumed at step {stopped}" in job2.output(0)
    assert_same_export(run, ref)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_incomplete_checkpoint_is_skipped_for_the_previous_one(reference, data, tmp_path):
    ref = reference(2)
    root = tmp_path / "copy"
    shutil.copytree(ref.parents[3], root, symlinks=True)
    cfg = write_config(root, zero=2, ema=0.9, audio=data / "audio")
    run = run_folder(root)
    last = run / "checkpoints" / f"step-{STEPS:08d}"
    (last / "COMPLETE").unlink()  # as if killed before all ranks had written
    for f in last.glob("*optim_states.pt"):
        f.write_bytes(b"torn")
    (run / "export.pt").unlink()
    job = train_to_end(cfg, 2, root / "logs-resume")
    out = job.output(0)
    assert "removed incomplete checkpoint" in out and f"resumed at step {STEPS - 2}" in out, out[-3000:]
    assert_same_export(run, ref)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_checkpoint_resumes_on_one_rank(reference, data, tmp_path):
    """Universal checkpoint: step, optimizer state, lr schedule and global sample position."""
    ref = reference(2)
    root = tmp_path / "copy"
    shutil.copytree(ref.parents[3], root, symlinks=True)
    cfg = write_config(root, zero=2, ema=0.9, audio=data / "audio")
    run = run_folder(root)
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "export.pt").unlink()
    probe = textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}")
        from largewave.config import load_config
        from largewave.engine.deepspeed_config import lr_lambda
        from largewave.engine.trainer import Trainer
        cfg = load_config({str(cfg)!r})
        t = Trainer(cfg, "level1")
        t.setup(); t.resume()
        opt = t.engine.optimizer
        inner = opt.optimizer
        (flat,) = [p for g in inner.param_groups for p in g["params"]]
        state = inner.state[flat]
        ckpt = t.ckpt_root / "step-00000004"
        uni = ckpt.with_name(ckpt.name + "-universal") / "zero"
        names = [n for n, _ in t.module.named_parameters()]
        exp_avg = torch.cat([torch.load(uni / n / "exp_avg.pt", weights_only=False)["param"].flatten() for n in names])
        fp32 = torch.cat([torch.load(uni / n / "fp32.pt", weights_only=False)["param"].flatten() for n in names])
        old = torch.load(ckpt / "client_state" / "rank-00000.pt", weights_only=False)["loader"]
        res = dict(step=t.step, sched=t.engine.lr_scheduler.last_epoch, lr=t.engine.get_lr()[0],
                   want_lr=cfg.level("level1").optim.lr * lr_lambda(cfg.level("level1"))(4),
                   adam_step=float(state["step"]),
                   exp_avg_equal=bool(torch.equal(state["exp_avg"][: exp_avg.numel()], exp_avg)),
                   weights_equal=bool(torch.equal(torch.cat([p.detach().flatten() for p in t.module.parameters()]), fp32)),
                   old_index=old["index"], old_epoch=old["epoch"], old_world=old["world_size"],
                   new=t.loader.state_dict(), samples_seen=t.samples_seen())
        assert res["samples_seen"] == 4 * 4 * 2 * 2, res["samples_seen"]  # steps × micro × accum × old ranks
        stats = t.train_step()
        res["loss_after"] = stats["loss"]
        t.teardown()
        print("RESULT " + json.dumps(res))
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert res["step"] == 4 and res["sched"] == 4 and res["adam_step"] == 4
    assert abs(res["lr"] - res["want_lr"]) < 1e-12
    assert res["exp_avg_equal"] and res["weights_equal"]
    assert res["old_world"] == 2 and res["new"]["world_size"] == 1
    # The global position (batches × ranks) carries over: 1 rank continues after 2 × the old index.
    assert res["new"]["epoch"] * res["new"]["batches_per_epoch"] + res["new"]["index"] == \
        res["old_epoch"] * res["new"]["batches_per_epoch"] + 2 * res["old_index"] or res["new"]["epoch"] > res["old_epoch"]
    assert res["loss_after"] == res["loss_after"]  # finite, trains on


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
    train = "log_every: 2, eval_every: 2, eval_batches: 2, save_every: 2, sample_every: 4, sample_clips: 1"
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
