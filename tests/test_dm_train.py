"""DM training: diffusers-format output, exact resume after a kill, refusals, data order."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from generator.sampling import load_dm
from generator.train_dm import DMTrainConfig, batch_indices, train_dm
from vaegen.data import DEBIAN_FMNIST_DIR, build_store
from vaegen.errors import VaegenError

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="needs dataset-fashion-mnist")

# A few steps of the tiny preset on a 256-image subset: enough to exercise every part of the loop.
RUN = dict(dataset="fmnist", preset="tiny", subset=256, max_steps=24, batch_size=8, checkpoint_every=4,
           grid_samples=2, seed=3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_store("fmnist", root, subset=256, subset_seed=0, download=False)
    return root


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train_dm(DMTrainConfig(out=str(out), data_root=str(data_root), **RUN))
    return out


def test_snapshots_are_loadable_dms_and_the_last_one_is_the_plain_run(finished_run, data_root, tmp_path):
    out = tmp_path / "snapshots"
    train_dm(DMTrainConfig(out=str(out), data_root=str(data_root), snapshot_steps=(8, 24), **RUN))
    weights = "diffusion_pytorch_model.safetensors"
    # Snapshotting leaves training untouched, and the last snapshot is the plain run's model byte for byte.
    assert (out / weights).read_bytes() == (finished_run / weights).read_bytes()
    assert (out / "snapshots/step-00000024" / weights).read_bytes() == (finished_run / weights).read_bytes()
    early = load_dm(str(out / "snapshots/step-00000008"))
    record = json.loads((out / "snapshots/step-00000008/dm.json").read_text())
    assert record["steps"] == 8 and not record["finished"] and early.sha256 == record["weights_sha256"]
    assert early.sha256 != load_dm(str(out)).sha256
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-00000008", "step-00000024"]


def test_output_loads_with_plain_diffusers_and_records_what_made_it(finished_run):
    unet = UNet2DModel.from_pretrained(finished_run)
    assert unet.config.in_channels == 1 and unet.config.sample_size == 32
    record = json.loads((finished_run / "dm.json").read_text())
    assert record["dataset"] == "fmnist" and record["subset"] == 256 and record["preset"] == "tiny"
    assert record["steps"] == 24 and record["images_seen"] == 24 * 8 and record["finished"]
    assert record["code_version"] and "config" in record and "command" in record
    dm = load_dm(str(finished_run))
    assert dm.kind == "edm" and dm.sha256 == record["weights_sha256"]
    scheduler = json.loads((finished_run / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EDMEulerScheduler" and scheduler["sigma_data"] == 0.5
    log = [json.loads(line) for line in (finished_run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 24 and all(np.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in log)
    assert (finished_run / "samples.png").stat().st_size > 0
    assert [p.name for p in (finished_run / "checkpoints").iterdir()] and not list(finished_run.glob(".*tmp*"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(finished_run, data_root, tmp_path):
    out = tmp_path / "killed"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    command = [sys.executable, "-c", "from studies.cli import main; main()", "dm", "train", *args,
               f"--out={out}", f"--data-root={data_root}", "--threads=1"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = out / "checkpoints" / "step-00000004"
    deadline = time.time() + 120
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists() and process.returncode == -signal.SIGKILL
    assert not (out / "dm.json").exists()  # killed mid-run: nothing a later stage could take for a model

    train_dm(DMTrainConfig(out=str(out), data_root=str(data_root), resume=True, **RUN))
    for name in ("diffusion_pytorch_model.safetensors", "checkpoints/step-00000024/model.safetensors"):
        assert (out / name).read_bytes() == (finished_run / name).read_bytes(), name  # EMA and raw weights
    ours = torch.load(out / "checkpoints/step-00000024/optimizer.bin", weights_only=False)["state"]
    theirs = torch.load(finished_run / "checkpoints/step-00000024/optimizer.bin", weights_only=False)["state"]
    assert all(torch.equal(ours[i]["exp_avg_sq"], theirs[i]["exp_avg_sq"]) for i in theirs)
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log))  # lines after the checkpoint were dropped, not duplicated
    assert logged_losses(out) == logged_losses(finished_run)  # the line after the resume too (step 10, from 4)


def logged_losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_at_the_current_step_and_the_resumed_run_ends_the_same(
        finished_run, data_root, tmp_path, signum, code):
    out = tmp_path / "signalled"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    command = [sys.executable, "-m", "vaegen", "dm", "train", *args, f"--out={out}", f"--data-root={data_root}",
               "--threads=1", "--checkpoint-every=1000"]  # no regular checkpoint: only the signal's
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name}: checkpoint saved at step ") and "--resume" in last
    step = int(last.split("at step ")[1].split()[0])
    assert 0 < step < 24 and [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert not (out / "dm.json").exists()

    train_dm(DMTrainConfig(out=str(out), data_root=str(data_root), resume=True, **{**RUN, "checkpoint_every": 1000}))
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (finished_run / "diffusion_pytorch_model.safetensors").read_bytes()
    assert logged_losses(out) == logged_losses(finished_run)


def test_existing_run_is_not_overwritten_and_resume_refuses_changed_settings(finished_run, data_root, tmp_path):
    with pytest.raises(VaegenError, match="--resume"):
        train_dm(DMTrainConfig(out=str(finished_run), data_root=str(data_root), **RUN))
    with pytest.raises(VaegenError, match="lr"):
        train_dm(DMTrainConfig(out=str(finished_run), data_root=str(data_root), resume=True, **{**RUN, "lr": 0.1}))
    with pytest.raises(VaegenError, match="no checkpoint"):
        train_dm(DMTrainConfig(out=str(tmp_path / "new"), data_root=str(data_root), resume=True, **RUN))


def test_missing_subset_store_names_the_command_that_builds_it(data_root, tmp_path):
    with pytest.raises(VaegenError, match="vaegen data fmnist --subset 99 --subset-seed 5"):
        train_dm(DMTrainConfig(out=str(tmp_path / "x"), data_root=str(data_root),
                          **{**RUN, "subset": 99, "subset_seed": 5}))


def test_data_order_is_a_pure_function_of_the_step_covering_each_epoch_once():
    n, batch = 10, 4
    stream = np.concatenate([batch_indices(step, batch, n, seed=1) for step in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert np.array_equal(batch_indices(3, batch, n, seed=1), stream[12:16])
    assert not np.array_equal(batch_indices(0, batch, n, seed=2), stream[:4])


def test_report_to_tensorboard_logs_the_same_losses_as_the_training_log(data_root, tmp_path):
    pytest.importorskip("tensorboard")  # the `tracking` extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    train_dm(DMTrainConfig(out=str(out), data_root=str(data_root), report_to="tensorboard",
                           **{**RUN, "max_steps": 20}))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = EventAccumulator(str(out / "tensorboard")).Reload().Scalars("loss")
    assert [e.step for e in logged] == [entry["step"] for entry in log] and len(log) >= 2
    assert [e.value for e in logged] == [np.float32(entry["loss"]) for entry in log]
    assert (out / "dm.json").exists()  # the run finished with its trackers closed
