"""vaegen on a real Slurm cluster: the single-node one scripts/local-services.sh starts on this machine.

`srun -n 2` launches of the stages write what torchrun launches write (vaegen.launch translates the step's
SLURM_* variables); studies' runs go through `studies.slurm.SlurmExecutor` as one submitit job array, survive a
requeue and a dead driver."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from services import local_service

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BIN = Path(sys.executable).parent  # the console scripts of this environment (vaegen, vaegen-train, ...)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with local_service("slurm"):
        yield


def launch_env() -> dict:
    """This environment without any launcher's rank variables, one thread per process, no GPU."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    return {**env, "SLURM_CONF": os.environ["SLURM_CONF"], "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched(command: list[str]) -> None:
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "being written by" not in proc.stderr


def srun(tasks: int, program: str, args: list[str]) -> None:
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the other at a barrier.
    launched(["srun", "--ntasks", str(tasks), "--kill-on-bad-exit=1", "--time", "10", str(BIN / program), *args])


def torchrun(processes: int, module: str, args: list[str]) -> None:
    launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_port", str(free_port()), "-m", module, *args])


def file_hashes(directory: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob(pattern))}


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, support):
    root = tmp_path_factory.mktemp("slurm")
    support.store(root / "data", n_train=64, n_test=16)
    support.shard_run(root / "shards", 64 * 2, 20, n_train=64)
    return root


# --- srun launches -----------------------------------------------------------------------------------------------

def test_srun_two_tasks_train_the_same_vae_as_torchrun(inputs):
    args = ["--dataset", "fmnist", "--data-root", str(inputs / "data"), "--shards", str(inputs / "shards"),
            "--epochs", "2", "--eval-every", "1", "--batch-size", "16"]
    srun(2, "vaegen-train", [*args, "--out", str(inputs / "vae-srun")])
    torchrun(2, "trainer", [*args, "--out", str(inputs / "vae-torchrun")])
    srun_run, torchrun_run = inputs / "vae-srun", inputs / "vae-torchrun"
    assert json.loads((srun_run / "config.json").read_text())["num_processes"] == 2
    assert file_hashes(srun_run, "*.safetensors") == file_hashes(torchrun_run, "*.safetensors")
    assert metrics(srun_run) == metrics(torchrun_run) and [m["epoch"] for m in metrics(srun_run)] == [1, 2]


def test_srun_two_tasks_train_the_same_dm_as_torchrun(inputs):
    args = ["dm", "train", "--dataset", "fmnist", "--data-root", str(inputs / "data"), "--preset", "tiny",
            "--max-steps", "3", "--batch-size", "8", "--checkpoint-every", "2", "--grid-samples", "4"]
    srun(2, "vaegen", [*args, "--out", str(inputs / "dm-srun")])
    torchrun(2, "vaegen", [*args, "--out", str(inputs / "dm-torchrun")])
    assert json.loads((inputs / "dm-srun" / "train_run.json").read_text())["starts"][-1]["num_processes"] == 2
    models = file_hashes(inputs / "dm-srun", "*.safetensors")
    assert models and models == file_hashes(inputs / "dm-torchrun", "*.safetensors")
