"""launch/slurm.py against a real single-node Slurm cluster that these tests start themselves.

The cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd from Debian's packages; see
``tests/slurm_cluster.py``) lives in a temporary folder and is stopped at the end. Without root
the tests skip with the reason. Training is the real thing: DeepSpeed on CPU, one Slurm task per
rank, a tiny level-1 model on tiny shards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shardutil import make_audio_shards  # noqa: E402
from conftest import skip_because  # noqa: E402
from slurm_cluster import ClusterUnavailable, LocalSlurmCluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "launch" / "slurm.py"
STEPS = 400

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        skip_because("not-root", "the Slurm test cluster runs its daemons as SlurmUser=root")
    root = tmp_path_factory.mktemp("slurm")
    c = LocalSlurmCluster(root / "cluster")
    try:
        c.start()
    except ClusterUnavailable as e:
        pytest.skip(str(e))  # not allowlisted: under CI=true a failed install fails the run
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)
    yield c
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    subprocess.run(["scancel", "--user=root"], env=c.env, capture_output=True)
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurmdata")
    make_audio_shards(root / "audio", pieces=3, seconds=2.0, segment_seconds=1.0, per_shard=2, split="train")
    make_audio_shards(root / "audio", pieces=1, seconds=1.0, segment_seconds=1.0, per_shard=2, split="valid", seed=1)
    return root


def write_config(root: Path, data: Path, *, steps: int = STEPS, name: str = "slurmtiny", wandb: str = "disabled") -> Path:
    """A tiny 2-level stack (level 1 ≈10k parameters on 256-token crops). ``run.root`` is the
    only thing that differs between runs meant to be compared."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    level = lambda codes_in: textwrap.dedent(f"""\
            kind: ada
            hop: 4
            encoder: {{channels: 8, layers_per_stack: 2, stacks: 1, kernel_size: 3, input_embedding: 4}}
            quantiser: {{kind: amae, codes: 16, dim: 8}}
            decoder: {{residual_channels: 8, gate_channels: 16, skip_channels: 16, stacks: 1, layers_per_stack: 3,
                       cond_channels: 8}}
            optim: {{lr: 3.0e-3, warmup_steps: 2}}
            train: {{steps: {steps}, crop: {256 if not codes_in else 64}, micro_batch: 4, crops_per_segment: 2,
                     zero_stage: 2, log_every: 10, eval_every: {steps}, eval_batches: 1, sample_every: {steps},
                     sample_clips: 0, eval_clips: 0, save_every: 10, keep_checkpoints: 2}}
        """)
    path.write_text(
        f"stack: {name}\n"
        f"data: {{shards: {data / 'audio'}, codes: {root / 'codes'}, workers: 0, seed: 0}}\n"
        "levels:\n  level1:\n" + textwrap.indent(level(False), "    ")
        + "  level2:\n" + textwrap.indent(level(True), "    ")
        + f"run: {{root: {root / 'runs'}, wandb_mode: {wandb}, collective_timeout_s: 120}}\n")
    return path


def launch(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, str(SLURM), *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"launch/slurm.py {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def job_ids(output: str) -> list[str]:
    return re.findall(r"job (\d+(?:_\d+)?) on (?:slurm|local)", output)


def sacct_state(cluster: LocalSlurmCluster, job: str) -> str:
    r = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], env=cluster.env,
                       capture_output=True, text=True)
    states = [line.split("|")[1].split()[0] for line in r.stdout.splitlines() if line.split("|")[0] == job]
    return states[0] if states else "UNKNOWN"


def wait_state(cluster, job: str, want: set[str], timeout: float) -> str:
    deadline = time.time() + timeout
    state = "UNKNOWN"
    while time.time() < deadline:
        state = sacct_state(cluster, job)
        if state in want:
            return state
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} - want:
            break
        time.sleep(1)
    raise AssertionError(f"job {job} is {state}, not {want} after {timeout:.0f} s")


def run_dir(root: Path, level: str = "level1") -> Path:
    (d,) = list((root / "runs").glob(f"*/{level}/*/"))
    return d


def log_text(root: Path, kind: str = "train-level1") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((root / "runs").glob(f"*/submitit/{kind}/*/*.out")))


def export_weights(root: Path, level: str = "level1") -> dict[str, torch.Tensor]:
    from largewave.engine.export import read_export

    return read_export(run_dir(root, level) / "export.pt")["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ in {diff[:5]}"


@pytest.fixture(scope="module")
def reference(cluster, data, tmp_path_factory) -> Path:
    """An uninterrupted 2-task run on Slurm: what preempted runs must match."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root, data)
    r = launch("--stack", str(cfg), "--level", "1", "--cluster", "slurm", "--tasks-per-node", "2",
               "--time", "10", "--wait")
    assert "run folder" in r.stdout
    return root


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_dry_run_8_nodes_8_gpus_prints_the_golden_sbatch_script(tmp_path, no_slurm_env):
    """On a laptop where Slurm was never installed, as a user previews the script."""
    cfg = write_config(tmp_path / "dry", tmp_path)
    r = launch("--stack", str(cfg), "--level", "1", "--nodes", "8", "--gpus-per-node", "8", "--partition", "gpu",
               "--time", "2-00:00:00", "--account", "acme", "--qos", "high", "--constraint", "a100",
               "--cpus-per-task", "10", "--dry-run", env=no_slurm_env)
    script = r.stdout[r.stdout.index("#!/bin/bash"):]
    script = script.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>")
    golden = (Path(__file__).parent / "golden" / "sbatch_8x8.txt").read_text()
    assert script.strip() == golden.strip(), script
    # and the resolved config + derived quantities came first
    assert "effective batch 256" in r.stdout and "on 64 ranks" in r.stdout


@pytest.mark.parametrize("cluster", ["auto", "local", "debug"])
def test_dry_run_of_the_whole_chain_needs_no_slurm(tmp_path, no_slurm_env, cluster):
    cfg = write_config(tmp_path / "dry", tmp_path)
    r = launch("--stack", str(cfg), "--level", "all", "--cluster", cluster, "--dry-run", env=no_slurm_env)
    assert r.stdout.count("#!/bin/bash") >= 4, r.stdout[-2000:]
    assert r.stdout.count("#SBATCH --dependency='afterok:<job of the step above>'") >= 3
    assert "srun" in r.stdout and "Traceback" not in r.stderr


def test_two_tasks_train_as_two_deepspeed_ranks_and_checkpoint(reference, cluster):
    log = log_text(reference)
    assert "on 2 rank(s)" in log, log[-3000:]
    run = run_dir(reference)
    assert list((run / "checkpoints").glob(f"step-{STEPS:08d}/COMPLETE"))
    assert (run / "export.pt").exists()
    jobs = [json.loads(line) for line in (reference / "runs" / "slurmtiny" / "jobs.jsonl").read_text().splitlines()]
    wait_state(cluster, jobs[-1]["job_id"], {"COMPLETED"}, 60)


def _wait_for_checkpoint(root: Path, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list((root / "runs").glob("*/level1/*/checkpoints/step-*/COMPLETE"))
        if any(int(p.parent.name[5:]) >= at_least for p in runs):
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint at step >= {at_least} after {timeout} s:\n{log_text(root)[-3000:]}")


def test_usr2_preemption_requeues_and_resumes_to_the_same_weights(reference, cluster, data, tmp_path):
    cfg = write_config(tmp_path, data, wandb="offline")
    r = launch("--stack", str(cfg), "--level", "1", "--cluster", "slurm", "--tasks-per-node", "2", "--time", "10",
               "--no-wait")
    (job,) = job_ids(r.stdout)
    _wait_for_checkpoint(tmp_path, 4)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.env, check=True)
    # the requeued run prints "resumed" and then its first new step
    deadline = time.time() + 240
    first_new_step = None
    while time.time() < deadline and first_new_step is None:
        log = log_text(tmp_path)
        m = re.search(r"resum.*?step\s+(\d+)/", log, flags=re.S | re.I)
        if m:
            first_new_step = time.time()
        time.sleep(0.25)
    assert first_new_step is not None, log_text(tmp_path)[-4000:]
    print(f"\nUSR2 → first new step of the requeued job: {first_new_step - t_signal:.1f} s")
    wait_state(cluster, job, {"COMPLETED"}, 300)
    log = log_text(tmp_path)
    assert "SIGUSR2" in log and "requeued job" in log, log[-4000:]
    assert_same_weights(export_weights(tmp_path), export_weights(reference))
    # one W&B run id across both segments (offline: one folder per segment, same id)
    ids = {p.name.rsplit("-", 1)[1] for p in run_dir(tmp_path).glob("wandb/offline-run-*")}
    segments = list(run_dir(tmp_path).glob("wandb/offline-run-*"))
    assert len(segments) >= 2 and len(ids) == 1, segments


def test_slurm_partition_preemption_requeues_and_resumes_to_the_same_weights(reference, cluster, data, tmp_path):
    cfg = write_config(tmp_path, data)
    # take every CPU of the node in the low-priority partition …
    r = launch("--stack", str(cfg), "--level", "1", "--cluster", "slurm", "--tasks-per-node", "2",
               "--cpus-per-task", str(cluster.cpus // 2), "--partition", "debug", "--time", "10", "--no-wait")
    (job,) = job_ids(r.stdout)
    _wait_for_checkpoint(tmp_path, 4)
    # … so that a job in the high-priority partition preempts it (PreemptMode=REQUEUE)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", str(cluster.cpus), "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "sleep 3"], env=cluster.env, capture_output=True, text=True, check=True)
    wait_state(cluster, urgent.stdout.strip().split(";")[0], {"COMPLETED"}, 240)
    wait_state(cluster, job, {"COMPLETED"}, 300)
    log = log_text(tmp_path)
    assert "SIGTERM" in log and re.search(r"resum", log, flags=re.I), log[-4000:]
    assert_same_weights(export_weights(tmp_path), export_weights(reference))


def test_level2_without_codes_chains_precompute_then_training_with_a_dependency(reference, cluster):
    cfg = reference / "slurmtiny.yaml"
    r = launch("--stack", str(cfg), "--level", "2", "--cluster", "slurm", "--code-tasks", "2", "--time", "10",
               "--no-wait")
    ids = job_ids(r.stdout)
    assert len(ids) == 2, r.stdout
    codes_job, train_job = ids
    shown = subprocess.run(["scontrol", "show", "job", train_job], env=cluster.env, capture_output=True, text=True).stdout
    assert f"afterok:{codes_job}" in shown.replace("_*", ""), shown
    wait_state(cluster, train_job, {"COMPLETED"}, 400)
    from largewave.config import load_config
    from largewave import stack

    c = load_config(cfg)
    assert stack.codes_status(c, "level1")[0]
    assert (run_dir(reference, "level2") / "export.pt").exists()


def test_failing_job_surfaces_its_error_and_the_resubmit_command(cluster, data, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(data / "audio", broken / "audio")
    (broken / "audio" / "train-000000.tar").unlink()  # the manifest still lists it
    cfg = write_config(tmp_path, broken)
    r = launch("--stack", str(cfg), "--level", "1", "--cluster", "slurm", "--time", "10", "--wait", check=False)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "train-000000.tar" in err and "failed" in err, err[-3000:]
    assert "resubmit with: python launch/slurm.py" in err


def test_status_list_and_cancel(reference, cluster, tmp_path):
    cfg = str(reference / "slurmtiny.yaml")
    st = launch("--stack", cfg, "--status").stdout
    assert re.search(rf"train\s+level1\s+job \d+\s+COMPLETED\s+checkpoint: step {STEPS}", st), st
    assert "codes  level1" in st
    # the latest run's figures, as `largewave runs` shows them
    assert re.search(rf"level1\s+[0-9a-f]{{12}}\s+done\s+{STEPS}/{STEPS}\s+\d+\.\d+ @\d+", st), st
    ls = launch("--stack", cfg, "--list").stdout
    assert re.search(r"\d+\s+train\s+level1\s+slurm\s+.*COMPLETED", ls), ls
    # a long run of its own (own run root), then cancel everything of the stack that still runs
    mine = ["--stack", cfg, f"run.root={tmp_path / 'runs'}"]
    r = launch(*mine, "level1.train.steps=4000", "--level", "1", "--cluster", "slurm", "--time", "10", "--no-wait")
    (job,) = job_ids(r.stdout)
    wait_state(cluster, job, {"RUNNING"}, 60)
    out = launch(*mine, "--cancel").stdout
    assert f"cancelled train level1 job {job}" in out, out
    wait_state(cluster, job, {"CANCELLED"}, 60)


def test_local_executor_runs_the_same_tiny_training(reference, data, tmp_path):
    cfg = write_config(tmp_path, data)
    env_root = tmp_path
    launch("--stack", str(cfg), "--level", "1", "--cluster", "local", "--tasks-per-node", "2")
    assert_same_weights(export_weights(env_root), export_weights(reference))
