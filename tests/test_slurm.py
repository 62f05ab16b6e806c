"""vaegen on a real Slurm cluster: the single-node one scripts/local-services.sh starts on this machine.

`srun -n 2` launches of the stages write what torchrun launches write (vaegen.launch translates the step's
SLURM_* variables); studies' runs go through `studies.slurm.SlurmExecutor` as one submitit job array, survive a
requeue and a dead driver."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from services import local_service

from vaegen.errors import VaegenError

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


def dm_args(inputs: Path, out: Path) -> list[str]:
    return ["dm", "train", "--dataset", "fmnist", "--data-root", str(inputs / "data"), "--preset", "tiny",
            "--max-steps", "3", "--batch-size", "8", "--checkpoint-every", "2", "--grid-samples", "4",
            "--out", str(out)]


@pytest.fixture(scope="module")
def torchrun_dm(inputs) -> dict[str, str]:
    """The weights of a 2-process DM training under torchrun, which the Slurm launches must reproduce."""
    torchrun(2, "vaegen", dm_args(inputs, inputs / "dm-torchrun"))
    models = file_hashes(inputs / "dm-torchrun", "*.safetensors")
    assert models
    return models


def test_srun_two_tasks_train_the_same_dm_as_torchrun(inputs, torchrun_dm):
    srun(2, "vaegen", dm_args(inputs, inputs / "dm-srun"))
    assert json.loads((inputs / "dm-srun" / "train_run.json").read_text())["starts"][-1]["num_processes"] == 2
    assert file_hashes(inputs / "dm-srun", "*.safetensors") == torchrun_dm


# --- studies on Slurm: studies.slurm.SlurmExecutor -----------------------------------------------------------------

@pytest.fixture(scope="module")
def studies():
    """studies.jobs and studies.slurm, with the Slurm tasks on one thread and no GPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield SimpleNamespace(jobs=importlib.import_module("studies.jobs"),
                              slurm=importlib.import_module("studies.slurm"))


def run_job(studies, inputs: Path, out: Path, seed: int, epochs: int = 2, *extra: str):
    """A study's VAE run: train on the test shards, then a quick generalization-gap evaluation."""
    train = ("train", "--dataset", "fmnist", "--data-root", str(inputs / "data"), "--shards", str(inputs / "shards"),
             "--epochs", str(epochs), "--eval-every", "1", "--batch-size", "16", "--seed", str(seed), *extra,
             "--out", str(out))
    return studies.jobs.RunJob(out.name, str(out), train, (("eval", ("eval", str(out), "--gaps", "generalization",
                                                                     "--iwae-k", "0", "--quick")),))


def run_locally(studies, job) -> None:
    for args in job.commands():
        assert studies.jobs.run_vaegen(args, {**os.environ, "OMP_NUM_THREADS": "1"}) == 0, args


def executor(studies, folder: Path, **options):
    slurm = studies.slurm.SlurmExecutor(folder, time_min=10, cpus_per_task=1, array_parallelism=2, **options)
    slurm.squeue_every_s = 2.0  # tests wait for seconds, not minutes
    return slurm


def without_volatile(value, run: Path):
    """A JSON value with the run's own path named RUN and without timestamps and durations."""
    if isinstance(value, dict):
        return {k: without_volatile(v, run) for k, v in value.items() if k not in ("created", "seconds")}
    if isinstance(value, list):
        return [without_volatile(v, run) for v in value]
    return value.replace(str(run), "RUN") if isinstance(value, str) else value


def run_contents(run: Path) -> dict:
    """Every file of a run directory, JSON normalized by `without_volatile`. Left out: the pickled RNG states of the
    checkpoint, which hold Python's unseeded `random` state (vaegen draws nothing from it)."""
    contents = {}
    for path in sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith("random_states")):
        name = str(path.relative_to(run))
        if path.suffix == ".jsonl":
            contents[name] = [without_volatile(json.loads(line), run) for line in path.read_text().splitlines()]
        elif path.suffix == ".json":
            contents[name] = without_volatile(json.loads(path.read_text()), run)
        else:
            contents[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return contents


def test_a_job_array_of_two_runs_writes_what_local_runs_write(studies, inputs, tmp_path):
    local = [run_job(studies, inputs, tmp_path / "local" / f"seed{seed}", seed) for seed in (0, 1)]
    on_slurm = [run_job(studies, inputs, tmp_path / "slurm" / f"seed{seed}", seed) for seed in (0, 1)]
    slurm = executor(studies, tmp_path / "study" / "slurm")
    for job in on_slurm:
        assert slurm.submit(job)
    slurm.wait()
    for job in local:
        run_locally(studies, job)

    submitted = json.loads((tmp_path / "study" / "slurm" / "submitted.json").read_text())
    assert sorted(submitted) == sorted(job.out for job in on_slurm)
    assert len({job_id.split("_")[0] for job_id in submitted.values()}) == 1  # one array
    for job in on_slurm:
        assert job.commands() == []
    for here, there in zip(local, on_slurm):
        assert run_contents(Path(there.out)) == run_contents(Path(here.out))
        assert (Path(there.out) / "eval" / "gaps.json").exists()


def test_a_failed_command_is_named_and_the_other_runs_finish(studies, inputs, tmp_path):
    good = run_job(studies, inputs, tmp_path / "good", 0, 1)
    bad = run_job(studies, inputs, tmp_path / "bad", 0, 1, "--scale", "999")  # more samples than the shards hold
    slurm = executor(studies, tmp_path / "slurm")
    slurm.submit(good)
    slurm.submit(bad)
    with pytest.raises(VaegenError, match=r"vaegen train .*--scale 999.* exited with 2 in Slurm job \S+ \(log "):
        slurm.wait()
    assert good.commands() == [] and bad.commands()


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


def test_a_task_requeued_mid_training_ends_with_the_weights_of_an_uninterrupted_run(studies, inputs, tmp_path):
    requeued, reference = (run_job(studies, inputs, tmp_path / name, 0, 30, "--checkpoint-every", "1")
                           for name in ("requeued", "reference"))
    slurm = executor(studies, tmp_path / "slurm")
    slurm.submit(requeued)
    with ThreadPoolExecutor(2) as pool:
        waited = pool.submit(slurm.wait)
        uninterrupted = pool.submit(run_locally, studies, reference)
        metrics_file = Path(requeued.out) / "metrics.jsonl"
        wait_for(lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3, 120, "epoch 3")
        job_id = json.loads((tmp_path / "slurm" / "submitted.json").read_text())[requeued.out]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before a time limit
        waited.result(timeout=300)
        uninterrupted.result(timeout=300)

    log = (tmp_path / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2
    # The train command saved its epoch and exited (it did not die of SIGUSR2), and resumed after the requeue.
    assert re.search(r"stopped by SIGTERM: checkpoint saved after epoch \d+ of 30", log)
    here, there = run_contents(Path(reference.out)), run_contents(Path(requeued.out))
    for name in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.bin", "metrics.jsonl",
                 "eval/gaps.json"):
        assert there[name] == here[name], name


DEAD_DRIVER = """
import pickle, sys
from studies.slurm import SlurmExecutor

slurm = SlurmExecutor(sys.argv[2], time_min=10, extra_sbatch=["--hold"])  # held: queued until the test releases it
slurm.submit(pickle.loads(open(sys.argv[1], "rb").read()))
slurm.wait()
"""


def test_a_rerun_after_the_driver_died_submits_only_the_missing_run(studies, inputs, tmp_path, capfd):
    finished, queued, missing = (run_job(studies, inputs, tmp_path / name, 0, 1)
                                 for name in ("finished", "queued", "missing"))
    (Path(finished.out) / "eval").mkdir(parents=True)  # what `commands()` reads as a finished run
    (Path(finished.out) / "done.json").write_text("{}")
    (Path(finished.out) / "eval" / "gaps.json").write_text("{}")
    folder = tmp_path / "slurm"
    (tmp_path / "queued.pkl").write_bytes(pickle.dumps(queued))
    driver = subprocess.Popen([sys.executable, "-c", DEAD_DRIVER, str(tmp_path / "queued.pkl"), str(folder)])
    record = folder / "submitted.json"
    wait_for(record.exists, 60, "the first driver's submission")
    driver.kill()
    driver.wait()
    held = json.loads(record.read_text())[queued.out]

    slurm = executor(studies, folder)
    for job in (finished, queued, missing):
        slurm.submit(job)
    subprocess.run(["scontrol", "release", held], check=True)
    slurm.wait()

    submitted = json.loads(record.read_text())
    assert sorted(submitted) == sorted([queued.out, missing.out]) and submitted[queued.out] == held
    assert len(list(folder.glob("*_submission.sh"))) == 2  # the dead driver's and the rerun's, one task each
    assert queued.commands() == [] and missing.commands() == []
    assert f"still queued or running as Slurm job {held}" in capfd.readouterr().err


def test_a_prerequisite_is_one_job_waited_for_and_its_failure_is_named(studies, inputs, tmp_path):
    slurm = executor(studies, tmp_path / "slurm")
    slurm.run("dm", dm_args(inputs, tmp_path / "dm"))
    assert (tmp_path / "dm" / "train_run.json").exists()
    bad = dm_args(tmp_path / "nowhere", tmp_path / "dm-bad")
    with pytest.raises(VaegenError, match=r"`vaegen dm train .*nowhere.*` exited with 2 in Slurm job \S+ \(log "):
        slurm.run("dm", bad)


def test_a_prerequisite_over_several_gpus_runs_under_accelerate_launch(studies, inputs, tmp_path, torchrun_dm):
    """The task `run` submits for `prerequisite_gpus=2`, on 2 CPUs here (this cluster has no GPUs; accelerate's
    --multi_gpu launcher falls back to gloo): the processes accelerate starts inside a Slurm job get their ranks
    from accelerate, not from the job's SLURM_* variables."""
    import submitit

    out = tmp_path / "dm"
    slurm = submitit.SlurmExecutor(folder=tmp_path / "slurm")
    slurm.update_parameters(time=10, cpus_per_task=2)
    job = slurm.submit(studies.slurm.StageTask(dm_args(inputs, out), 2))
    wait_for(job.paths.result_pickle.exists, 300, "the job's result")  # (submitit's job.wait() needs sacct)
    assert job.exception() is None, job.stdout()
    assert json.loads((out / "train_run.json").read_text())["starts"][-1]["num_processes"] == 2
    assert file_hashes(out, "*.safetensors") == torchrun_dm


# --- a whole study through the CLI: `vaegen study ... --executor slurm` -------------------------------------------

@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is missing")
def test_a_study_on_slurm_builds_its_inputs_in_jobs_and_trains_the_runs_a_local_study_trains(tmp_path):
    study = ["study", "compare", "--preset", "smoke", "--subset", "50", "--epochs", "2", "--dm-max-steps", "5",
             "--no-reuse"]
    env = {**launch_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    slurm = subprocess.run([sys.executable, "-m", "vaegen", *study, "--executor", "slurm", "--time-min", "10",
                            "--array-parallelism", "2", "--out", "runs/studies/on-slurm"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    submitted = json.loads((tmp_path / "runs/studies/on-slurm/slurm/submitted.json").read_text())
    runs = ("normal-seed0", "dmaapx-k5-seed0", "aug-naive-seed0", "aug-tuned-seed0")
    assert {f"runs/studies/on-slurm/runs/{run}" for run in runs} <= set(submitted)  # every run a task
    assert any(key.startswith("vaegen dm train") for key in submitted)  # and the prerequisites jobs
    assert (tmp_path / "runs/dm/fmnist-n50-s0-tiny-steps5/dm.json").exists()  # the DM was trained in a Slurm job
    local = subprocess.run([sys.executable, "-m", "vaegen", *study, "--jobs", "2", "--out", "runs/studies/local"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "$ vaegen dm train" not in local.stderr  # the inputs the Slurm study built serve the local one
    for run in runs:
        on_slurm, here = (tmp_path / f"runs/studies/{d}/runs/{run}" for d in ("on-slurm", "local"))
        assert file_hashes(on_slurm, "*.safetensors") == file_hashes(here, "*.safetensors"), run
        assert json.loads((on_slurm / "eval/gaps.json").read_text())["generalization"] == \
            json.loads((here / "eval/gaps.json").read_text())["generalization"]
    assert (tmp_path / "runs/studies/on-slurm/report.md").exists()
