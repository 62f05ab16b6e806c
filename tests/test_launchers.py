"""Which process am I (`vaegen.launch`), and every stage under every launcher we support.

The fast tests pin the rule on environments as each launcher leaves them; the slow ones run `dm train`, `generate`
and `train` with 2 processes under `accelerate launch` and under torchrun, and compare the bytes they write."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vaegen.errors import VaegenError
from vaegen.launch import process_identity

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                    "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "PMI_SIZE", "PMI_RANK",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


@pytest.fixture
def launched(monkeypatch):
    """Set a launcher's environment (after clearing every launcher's variables)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
    return set_env


def test_a_plain_command_is_the_one_main_process(launched):
    launched()
    identity = process_identity()
    assert (identity.rank, identity.world_size, identity.is_main, identity.launcher) == (0, 1, True, "single")


def test_torchrun_and_accelerate_ranks_are_read_from_their_variables(launched):
    launched(WORLD_SIZE=4, RANK=3, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2)
    identity = process_identity()
    assert (identity.rank, identity.world_size, identity.local_rank, identity.local_world_size) == (3, 4, 1, 2)
    assert not identity.is_main


def test_an_srun_step_names_its_tasks_and_the_batch_script_is_one_process(launched):
    launched(SLURM_STEP_NUM_TASKS=6, SLURM_PROCID=4, SLURM_LOCALID=0, SLURM_NODEID=2,
             SLURM_STEP_TASKS_PER_NODE="2(x2),1,1")
    identity = process_identity()
    assert (identity.rank, identity.world_size, identity.local_world_size, identity.launcher) == (4, 6, 1, "slurm")
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        os.environ.pop(name)  # sbatch's batch step: Slurm variables, but no srun step
    assert process_identity().world_size == 1


def test_torchrun_inside_srun_takes_torchruns_ranks(launched):
    launched(SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0, WORLD_SIZE=8, RANK=5, LOCAL_RANK=1)
    assert (process_identity().rank, process_identity().world_size) == (5, 8)


@pytest.mark.parametrize("variables", [dict(WORLD_SIZE=2), dict(WORLD_SIZE=2, RANK=1),
                                       dict(SLURM_STEP_NUM_TASKS=2), dict(PMI_SIZE=2), dict(WORLD_SIZE=2, RANK="x")])
def test_ranks_that_cannot_be_told_apart_are_refused_in_one_line(launched, variables):
    launched(**variables)
    with pytest.raises(VaegenError, match="rank|cannot tell"):
        process_identity()


def test_a_held_lock_whose_holder_has_not_written_its_name_says_another_process(tmp_path):
    from vaegen.runlock import lock_path, run_lock

    out = tmp_path / "run"
    path = lock_path(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, name not yet written: the window a second rank used to hit
    try:
        with pytest.raises(VaegenError) as refused:
            with run_lock(out):
                pass
    finally:
        os.close(fd)
    assert "another process" in str(refused.value) and "?" not in str(refused.value)


# --- the stages under accelerate launch and torchrun, 2 processes on the CPU (gloo) -----------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK",
                                                                     "WORLD_SIZE"))}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launcher(name: str, processes: int) -> list[str]:
    port = str(free_port())
    if name == "accelerate":
        # `--multi_gpu` is accelerate's torchrun-based launcher; on a machine without GPUs the stages run it on
        # gloo. (`--cpu --num_processes N` starts one process: accelerate's CPU multi-process path is mpirun.)
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", port]
    return [sys.executable]


def run_stage(name: str, processes: int, module: str, args: list[str]) -> None:
    proc = subprocess.run([*launcher(name, processes), "-m", module, *args], env=launch_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "being written by" not in proc.stderr


def file_hashes(directory: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in patterns for p in sorted(directory.glob(pattern))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, support):
    root = tmp_path_factory.mktemp("launchers")
    support.store(root / "data", n_train=64, n_test=16)
    support.dm(root / "dm")
    support.shard_run(root / "shards", 64 * 2, 20, n_train=64)
    return root


LAUNCHERS = ("accelerate", "torchrun")


@pytest.mark.slow
def test_dm_train_with_two_processes_writes_the_same_model_under_either_launcher(inputs):
    models = {}
    for name in LAUNCHERS:
        out = inputs / f"dm-{name}"
        run_stage(name, 2, "vaegen", ["dm", "train", "--dataset", "fmnist", "--data-root", str(inputs / "data"),
                                      "--preset", "tiny", "--max-steps", "3", "--batch-size", "8",
                                      "--checkpoint-every", "2", "--grid-samples", "4", "--out", str(out)])
        assert json.loads((out / "train_run.json").read_text())["starts"][-1]["num_processes"] == 2
        models[name] = file_hashes(out, ("*.safetensors",))
    assert models["accelerate"] == models["torchrun"] and models["torchrun"]


@pytest.mark.slow
def test_generate_with_two_processes_writes_one_processs_bytes_under_either_launcher(inputs):
    args = ["--dm", str(inputs / "dm"), "--dataset", "fmnist", "--data-root", str(inputs / "data"), "--scale", "1",
            "--steps", "1", "--chunk", "4", "--shard-size", "8", "--batch-size", "4"]
    shards = {}
    for name, processes in (("single", 1), *((n, 2) for n in LAUNCHERS)):
        out = inputs / f"gen-{name}"
        run_stage(name, processes, "generator", [*args, "--out", str(out)])
        assert json.loads((out / "generation.json").read_text())["runs"][-1]["world_size"] == processes
        shards[name] = file_hashes(out, ("*.tar", "*.json.idx", "index.json"))
    assert shards["single"] == shards["accelerate"] == shards["torchrun"] and len(shards["single"]) >= 8


@pytest.mark.slow
def test_train_with_two_processes_writes_the_same_vae_under_either_launcher(inputs):
    vaes = {}
    for name in LAUNCHERS:
        out = inputs / f"vae-{name}"
        run_stage(name, 2, "trainer", ["--dataset", "fmnist", "--data-root", str(inputs / "data"), "--shards",
                                       str(inputs / "shards"), "--epochs", "2", "--eval-every", "1",
                                       "--batch-size", "16", "--out", str(out)])
        assert json.loads((out / "config.json").read_text())["num_processes"] == 2
        metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        vaes[name] = (file_hashes(out, ("*.safetensors",)), metrics)
    assert vaes["accelerate"] == vaes["torchrun"]
    assert len(vaes["torchrun"][0]) == 1 and [m["epoch"] for m in vaes["torchrun"][1]] == [1, 2]
