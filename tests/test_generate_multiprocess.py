"""Shard generation under `accelerate launch`: 2 processes and 2 machine ranks (loopback, gloo on CPU) write
exactly the bytes one process writes.

On a CPU-only machine accelerate's `--cpu` flag starts several processes only through MPI; its torchrun
launcher (`--multi_gpu`) works everywhere, and `generate` then runs distributed on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from test_generate_shards import REPO, gen_args, make_store, make_tiny_dm, run_cli, shard_bytes

from vaegen import shardformat as sf

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("genmp")
    make_tiny_dm(root / "dm")
    make_store(root / "data")
    one = root / "one"
    assert run_cli(gen_args(root, one, 3)).exit_code == 0  # 24 samples, 6 shards, one process
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_two_processes_write_the_same_bytes_as_one(env):
    out = env / "two"
    cmd = [*LAUNCH, "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           "-m", "generator", *gen_args(env, out, 3)[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / sf.GENERATION_NAME).read_text())["runs"][-1]["world_size"] == 2
    assert shard_bytes(out) == shard_bytes(env / "one") and len(shard_bytes(out)) == 6
    assert (out / sf.INDEX_NAME).read_bytes() == (env / "one" / sf.INDEX_NAME).read_bytes()


def test_two_machine_ranks_on_loopback_write_the_same_bytes_as_one_process(env):
    out, port = env / "nodes", free_port()
    procs = [subprocess.Popen([*LAUNCH, "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                               "-m", "generator", *gen_args(env, out, 3)[1:]],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((out / sf.GENERATION_NAME).read_text())["runs"][-1]["world_size"] == 2
    assert shard_bytes(out) == shard_bytes(env / "one")
    assert (out / sf.INDEX_NAME).read_bytes() == (env / "one" / sf.INDEX_NAME).read_bytes()
