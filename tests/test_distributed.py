"""Reading the distributed environment: torchrun, Slurm (submitit), or nothing."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from largewave.distributed import first_host, read_env  # noqa: E402


def test_torchrun_environment():
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.launcher) == \
        (3, 1, 4, "node7", 29400, "torchrun")
    assert env.as_environ()["WORLD_SIZE"] == "4"


def test_slurm_environment_takes_the_first_host_and_a_port_from_the_job_id():
    base = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu[003-005,010],cpu01"}
    env = read_env(base)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "slurm")
    assert env.master_addr == "gpu003"
    assert env.master_port == 20000 + 123456 % 20000
    assert read_env(dict(base, SLURM_PROCID="0")).master_port == env.master_port  # every task agrees


def test_torchrun_variables_win_over_slurm_ones():
    env = read_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert env.launcher == "torchrun" and env.rank == 0


def test_nothing_is_one_process_on_a_free_port():
    env = read_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


def test_node_list_parsing():
    assert first_host("node01") == "node01"
    assert first_host("a[1-3]") == "a1"
    assert first_host("rack2-n[08,11-12]-ib,rack3-n01") == "rack2-n08-ib"
    assert first_host("x,y") == "x"


def test_ranks_on_a_node_share_its_cores():
    """Each CPU rank gets the node's CPUs divided by the ranks on the node, whoever started it:
    two ranks with two threads each on two cores run many times slower than with one each."""
    import os

    from largewave.distributed import cpu_threads_per_rank, local_world_size

    cpus = len(os.sched_getaffinity(0))
    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "2"}) == 2
    assert local_world_size({"SLURM_TASKS_PER_NODE": "3(x2),1"}) == 3
    # submitit's local executor sets none of the above
    assert local_world_size({"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}) == 2
    assert cpu_threads_per_rank({"SUBMITIT_LOCAL_NTASKS": str(cpus)}) == 1
    assert cpu_threads_per_rank({}) == cpus
    assert cpu_threads_per_rank({"SLURM_CPUS_PER_TASK": "3", "SLURM_NTASKS_PER_NODE": "8"}) == 3


def test_cpu_work_flushes_subnormals():
    """Training, sampling and codes run with subnormals flushed to zero on CPU: a trained decoder
    makes them, and they made a training step 2x slower (README: Benchmarks)."""
    import torch

    from largewave.distributed import flush_denormals

    torch.set_flush_denormal(False)  # other tests in this process may have turned it on
    try:
        tiny = torch.tensor([1e-40])
        assert (tiny * 1.0).item() != 0.0
        flush_denormals()
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
