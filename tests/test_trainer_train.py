"""The training loop and its CLI: outputs, exact resume, NaN stop, and one-line errors on bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import trainer.train as train_module
from studies.cli import main
from trainer.models import FCVAE, load_vae
from trainer.train import TrainConfig, train
from vaegen.errors import VaegenError

torch.set_num_threads(1)


def small_config(tmp_path, **overrides):
    base = dict(dataset="fmnist", out=str(tmp_path / "run"), source="real", data_root=str(tmp_path / "data"),
                epochs=6, eval_every=2, checkpoint_every=2, batch_size=16, eval_batch_size=16, seed=0)
    return TrainConfig(**{**base, **overrides})


def metrics(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


def test_training_writes_config_metrics_model_and_done_marker(tmp_path, support):
    support.store(tmp_path / "data")
    out = train(small_config(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "config.json", "done.json", "metrics.jsonl", "model.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "fmnist" and config["subset"] is None and config["data_root"].endswith("data")
    assert config["arch"] == "fc" and config["likelihood"] == "gaussian" and config["lr"] == 1e-3
    assert config["n_train"] == 48 and "code_version" in config["run_record"]
    points = metrics(out)
    assert [m["epoch"] for m in points] == [2, 4, 6] and [m["images"] for m in points] == [96, 192, 288]
    assert points[-1]["train_elbo"] > points[0]["train_elbo"]  # it learns
    assert all(np.isfinite(m["test_elbo"]) for m in points)
    vae = load_vae(out)
    assert vae.config["arch"] == "fc" and vae.config["sigma"] == 0.1


def test_same_seed_gives_bit_identical_runs(tmp_path, support):
    support.store(tmp_path / "data")
    a = train(small_config(tmp_path, out=str(tmp_path / "a"), epochs=2))
    b = train(small_config(tmp_path, out=str(tmp_path / "b"), epochs=2))
    assert metrics(a) == metrics(b)


@pytest.mark.parametrize("source", ["real", "shards", "augmented"])
def test_interrupted_run_resumes_to_the_uninterrupted_runs_exact_metrics_and_weights(tmp_path, monkeypatch, source,
                                                                                     support):
    support.store(tmp_path / "data")
    extra = {"augment": "naive", "augment_p": 0.5} if source == "augmented" else {}
    if source == "shards":
        support.shard_run(tmp_path / "shards", 48 * 3, 40, n_train=48)
        extra = dict(source="shards", shards=str(tmp_path / "shards"), scale=3)
    full = train(small_config(tmp_path, out=str(tmp_path / "full"), **extra))

    real_generator = train_module.torch_generator

    def crash_in_epoch_5(seed, purpose, *keys, device="cpu"):
        if purpose == "vae-binarize" and keys[0] == 4 and keys[2] == 1:  # (epoch, rank, batch)
            raise RuntimeError("simulated kill in the middle of epoch 5")
        return real_generator(seed, purpose, *keys, device=device)

    monkeypatch.setattr(train_module, "torch_generator", crash_in_epoch_5)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(small_config(tmp_path, out=str(tmp_path / "resumed"), **extra))
    monkeypatch.setattr(train_module, "torch_generator", real_generator)
    resumed = tmp_path / "resumed"
    assert json.loads((resumed / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 4
    assert not (resumed / "done.json").exists() and not (resumed / "model.json").exists()
    train(small_config(tmp_path, out=str(resumed), resume=True, **extra))

    assert metrics(resumed) == metrics(full)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, support):
    support.store(tmp_path / "data")
    original = FCVAE.decode
    calls = {"n": 0}

    def decode_nan_in_epoch_3(self, z):
        calls["n"] += 1
        params = original(self, z)
        return params * float("nan") if calls["n"] > 6 and self.training else params  # 3 steps per epoch

    monkeypatch.setattr(FCVAE, "decode", decode_nan_in_epoch_3)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--dataset", "fmnist", "--source", "real", "--data-root",
                                       str(tmp_path / "data"), "--epochs", "5", "--batch-size", "16",
                                       "--checkpoint-every", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "loss became nan in epoch 3" in result.output
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 2
    assert not (out / "model.json").exists() and not (out / "done.json").exists()


def run_cli(*args):
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    return result, error_lines


@pytest.mark.parametrize("problem, message", [
    ("no-store", "no dataset store"), ("wrong-dataset", "are 'cifar10' samples"),
    ("wrong-shape", "hold (3, 32, 32) images"), ("corrupt", "corrupted"),
    ("empty-pool", "the pool is empty"), ("too-small", "the pool needs"),
    ("augment-shards", "--augment augments real data"), ("no-shards", "training on shards needs --shards"),
])
def test_bad_input_stops_before_training_with_one_line_and_exit_2(tmp_path, problem, message, support):
    data, shards, out = tmp_path / "data", tmp_path / "shards", tmp_path / "run"
    if problem != "no-store":
        support.store(data)
    if problem == "wrong-dataset":
        support.shard_run(shards, 96, 48, dataset="cifar10")
    elif problem == "wrong-shape":
        support.shard_run(shards, 96, 48, channels=3)
    elif problem == "too-small":
        support.shard_run(shards, 40, 20)
    elif problem in ("corrupt", "augment-shards", "no-store"):
        support.shard_run(shards, 96, 48)
        if problem == "corrupt":
            blob = bytearray((shards / "shard-000001.tar").read_bytes())
            blob[2000] ^= 1
            (shards / "shard-000001.tar").write_bytes(bytes(blob))
    elif problem == "empty-pool":
        support.shard_run(shards, 96, 48)
        (shards / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": []}))
    args = ["--dataset", "fmnist", "--data-root", data, "--epochs", 1, "--out", out]
    if problem != "no-shards":
        args += ["--shards", shards]
    if problem == "augment-shards":
        args += ["--augment", "naive"]
    result, errors = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_existing_run_needs_resume_and_a_finished_run_is_skipped(tmp_path, support):
    support.store(tmp_path / "data")
    args = ["--dataset", "fmnist", "--source", "real", "--data-root", tmp_path / "data", "--epochs", 1,
            "--batch-size", 16, "--out", tmp_path / "run"]
    assert run_cli(*args)[0].exit_code == 0
    result, errors = run_cli(*args)
    assert result.exit_code == 2 and "holds a finished run" in errors[0]
    result, _ = run_cli(*args, "--resume")
    assert result.exit_code == 0 and "already finished" in result.output
    (tmp_path / "run" / "done.json").unlink()
    result, errors = run_cli(*args[:-2], "--seed", 5, *args[-2:], "--resume")
    assert result.exit_code == 2 and "different settings (seed)" in errors[0]


def test_binary_mnist_trains_a_bernoulli_vae_and_augmented_and_mixed_sources_train(tmp_path, support):
    support.store(tmp_path / "data", dataset="binary-mnist")
    out = train(small_config(tmp_path, dataset="binary-mnist", epochs=1, eval_every=1, out=str(tmp_path / "b")))
    assert load_vae(out).likelihood.name == "bernoulli" and metrics(out)[0]["test_elbo"] < 0
    out = train(small_config(tmp_path, dataset="binary-mnist", epochs=1, augment="tuned", out=str(tmp_path / "a")))
    augmentation = json.loads((out / "config.json").read_text())["data"]["augmentation"]
    assert [op["name"] for op in augmentation] == ["translate", "scale", "rotate", "aniso", "aniso_rotate"]  # table 9
    assert all(0 <= op["probability"] <= 1 for op in augmentation)
    support.shard_run(tmp_path / "shards", 96, 48, dataset="binary-mnist")
    out = train(small_config(tmp_path, dataset="binary-mnist", epochs=2, source="shards", mix_real=0.5,
                             shards=str(tmp_path / "shards"), out=str(tmp_path / "m")))
    assert json.loads((out / "config.json").read_text())["data"]["kind"] == "mixed"


def test_mixed_source_with_augmentation_augments_only_the_real_part(tmp_path, support):
    from trainer.augment import Augmenter
    from trainer.data import MixedSource, open_shard_pool

    n = 40
    real = support.numbered_images(n, start=10_000)
    real[:, :, 8:24, 8:24] = 200  # a block that a flip or shift visibly moves
    pool = open_shard_pool(support.shard_run(tmp_path / "shards", 2 * n, 20), "fmnist", (1, 32, 32), n, scale=2)
    flip_all = Augmenter([{"name": "translate", "max_px": 3}], p=1.0)
    source = MixedSource(real, pool, 0.5, 16, seed=0, augmenter=flip_all)
    plain = MixedSource(real, pool, 0.5, 16, seed=0)
    changed_real = changed_synthetic = 0
    for a, b in zip(source.batches(0), plain.batches(0)):
        is_real = support.image_ids(b) >= 10_000
        differs = (a != b).flatten(1).any(1).numpy()
        changed_real += int(differs[is_real].sum())
        changed_synthetic += int(differs[~is_real].sum())
    assert changed_real > 10 and changed_synthetic == 0
    source.close()
    plain.close()
    support.store(tmp_path / "data")
    out = train(small_config(tmp_path, epochs=1, source="shards", mix_real=0.5, augment="tuned",
                             shards=str(tmp_path / "shards"), scale=1, out=str(tmp_path / "mixed-aug")))
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["kind"] == "mixed" and data["augmented"] == "the real part" and data["augment"] == "tuned"


def cli_env():
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def wait_while_running(proc, condition, seconds: float = 120) -> None:
    """Poll until `condition()` holds or `proc` exits; past `seconds`, kill it and fail (never hang the suite)."""
    import time

    deadline = time.monotonic() + seconds
    while proc.poll() is None and not condition():
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the condition was not met within {seconds} s")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_uninterrupted_runs_exact_metrics(tmp_path, support):
    import signal
    import subprocess
    import sys

    support.store(tmp_path / "data", n_train=96)
    support.shard_run(tmp_path / "shards", 96 * 4, 50, n_train=96)
    args = [sys.executable, "-m", "trainer", "--dataset", "fmnist", "--data-root", str(tmp_path / "data"),
            "--shards", str(tmp_path / "shards"), "--epochs", "40", "--eval-every", "2", "--checkpoint-every", "1",
            "--batch-size", "8"]
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, env=cli_env(), capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "trainer_state.json"
    wait_while_running(proc, lambda: state.exists() and json.loads(state.read_text())["epoch"] >= 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "done.json").exists(), "the run finished before it could be killed"
    subprocess.run([*args, "--out", str(tmp_path / "killed"), "--resume"], check=True, env=cli_env(),
                   capture_output=True)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "full")


@pytest.mark.slow
def test_two_process_run_on_cpu_trains_on_disjoint_shards_with_equal_batch_counts(tmp_path, support):
    """A real 2-process run (torchrun + Accelerate on gloo): unequal batch counts would hang or fail DDP."""
    import subprocess
    import sys

    support.store(tmp_path / "data", n_train=96)
    support.shard_run(tmp_path / "shards", 96 * 2, 20, n_train=96)  # epochs cut through shards unevenly
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer",
                    "--dataset", "fmnist", "--data-root", str(tmp_path / "data"), "--shards", str(tmp_path / "shards"),
                    "--epochs", "3", "--eval-every", "1", "--batch-size", "16", "--out", str(out)],
                   check=True, env=cli_env(), capture_output=True, timeout=300)
    config = json.loads((out / "config.json").read_text())
    assert config["num_processes"] == 2 and (out / "done.json").exists()
    assert sorted(p.name for p in (out / "checkpoint").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_bf16_run_trains_with_float32_elbos(tmp_path, support):
    # A subprocess: Accelerate fixes the mixed-precision mode once per process.
    import subprocess
    import sys

    support.store(tmp_path / "data")
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "trainer", "--dataset", "fmnist", "--source", "real", "--data-root",
                    str(tmp_path / "data"), "--epochs", "2", "--eval-every", "1", "--batch-size", "16", "--bf16",
                    "--out", str(out)], check=True, env=cli_env(), capture_output=True, timeout=300)
    points = metrics(out)
    assert json.loads((out / "config.json").read_text())["bf16"] is True
    fp32 = metrics(train(small_config(tmp_path, out=str(tmp_path / "fp32"), epochs=2, eval_every=1)))
    for half, full in zip(points, fp32, strict=True):
        for key in ("train_elbo", "test_elbo", "batch_elbo"):
            # bf16 matmuls (8-bit mantissa) move the trajectory a little; the float32 ELBO sums keep it close
            assert half[key] != full[key] and half[key] == pytest.approx(full[key], rel=0.02), (key, half, full)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_a_signal_finishes_the_epoch_checkpoints_it_and_the_resumed_run_is_identical(tmp_path, support, signum,
                                                                                      code):
    import signal
    import subprocess
    import sys

    support.store(tmp_path / "data", n_train=96)
    args = [sys.executable, "-m", "trainer", "--dataset", "fmnist", "--source", "real", "--data-root",
            str(tmp_path / "data"), "--epochs", "60", "--eval-every", "2", "--checkpoint-every", "50",
            "--batch-size", "8"]
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, env=cli_env(), capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "signalled")], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "signalled" / "metrics.jsonl"
    wait_while_running(proc, lambda: log.exists() and len(log.read_text().splitlines()) >= 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name}: checkpoint saved after epoch ") and \
        "--resume" in last and "Traceback" not in err
    epoch = int(last.split("after epoch ")[1].split()[0])
    assert json.loads((tmp_path / "signalled/checkpoint/trainer_state.json").read_text())["epoch"] == epoch < 60
    subprocess.run([*args, "--out", str(tmp_path / "signalled"), "--resume"], check=True, env=cli_env(),
                   capture_output=True)
    assert metrics(tmp_path / "signalled") == metrics(tmp_path / "full")


def test_sigma_is_in_every_runs_config_and_a_resume_with_another_sigma_is_refused(tmp_path, support):
    support.store(tmp_path / "data")
    support.store(tmp_path / "data", dataset="binary-mnist")
    for dataset, model_sigma in (("fmnist", 0.2), ("binary-mnist", None)):
        out = train(small_config(tmp_path, dataset=dataset, sigma=0.2, epochs=1, out=str(tmp_path / dataset)))
        assert json.loads((out / "config.json").read_text())["sigma"] == 0.2
        assert json.loads((out / "model.json").read_text()).get("sigma") == model_sigma  # only where it matters
    (tmp_path / "fmnist" / "done.json").unlink()
    result, errors = run_cli("--dataset", "fmnist", "--source", "real", "--data-root", tmp_path / "data",
                             "--epochs", 1, "--batch-size", 16, "--eval-every", 2, "--checkpoint-every", 2,
                             "--eval-batch-size", 16, "--out", tmp_path / "fmnist", "--resume")
    assert result.exit_code == 2 and len(errors) == 1 and "different settings (model, sigma)" in errors[0], result.output


def test_a_run_started_before_a_setting_existed_resumes_with_that_settings_default(tmp_path, support):
    support.store(tmp_path / "data")
    run = train(small_config(tmp_path, epochs=2))
    config = json.loads((run / "config.json").read_text())
    del config["augment_output"]  # as written by a version without --augment-output
    (run / "config.json").write_text(json.dumps(config))
    (run / "done.json").unlink()
    with pytest.raises(VaegenError, match=r"different settings \(augment, augment_output\)"):
        train(small_config(tmp_path, epochs=2, resume=True, augment="naive", augment_output="float"))
    train(small_config(tmp_path, epochs=2, resume=True))  # the default is what the old run did
    assert (run / "done.json").exists()


def test_float_augmentation_needs_a_gaussian_likelihood_and_trains_on_unclamped_inputs(tmp_path, support,
                                                                                      monkeypatch):
    support.store(tmp_path / "data")
    support.store(tmp_path / "data", dataset="binary-mnist")
    base = ["--source", "real", "--data-root", tmp_path / "data", "--epochs", 1, "--augment", "naive",
            "--augment-output", "float"]
    result, errors = run_cli("--dataset", "binary-mnist", *base, "--out", tmp_path / "b")
    assert result.exit_code == 2 and len(errors) == 1 and "needs --augment and a Gaussian" in errors[0]
    assert not (tmp_path / "b").exists()
    inputs = []
    real_forward = FCVAE.forward

    def record(self, x, *args):
        inputs.append(x.detach().clone())
        return real_forward(self, x, *args)

    monkeypatch.setattr(FCVAE, "forward", record)
    out = train(small_config(tmp_path, epochs=1, augment="naive", augment_p=1.0, augment_output="float"))
    assert json.loads((out / "config.json").read_text())["augment_output"] == "float"
    seen = torch.cat(inputs)
    assert seen.min() < 0 or seen.max() > 1  # brightness/contrast left unclamped
    assert not torch.equal(seen * 255, (seen * 255).round())  # and unrounded


def test_calibrated_gaussian_run_saves_its_sigma_so_the_saved_model_scores_what_the_trainer_logged(tmp_path,
                                                                                                  support):
    from accelerate import Accelerator

    support.store(tmp_path / "data")
    out = train(small_config(tmp_path, likelihood="gaussian-calibrated", epochs=4))
    points = metrics(out)
    assert points[-1]["train_elbo"] > points[0]["train_elbo"]
    vae = load_vae(out)  # what the evaluator loads: model.json + model.safetensors
    assert vae.likelihood.name == "gaussian-calibrated" and "sigma" not in vae.config
    sigma = vae.likelihood.log_sigma().exp().item()
    assert 0.01 < sigma < 0.5 and sigma != pytest.approx(0.1, rel=0.01)  # fitted, not the fixed default
    from vaegen.data import open_dataset

    test = open_dataset("fmnist", "test", root=tmp_path / "data").images
    assert train_module.mean_elbo(vae, test, "test", Accelerator(cpu=True), 16, 0) == points[-1]["test_elbo"]


def test_a_run_from_a_device_resident_pool_ends_with_the_streamed_runs_exact_weights(tmp_path, support):
    support.store(tmp_path / "data")
    support.shard_run(tmp_path / "shards", 48 * 3, 40, n_train=48)
    runs = {mode: train(small_config(tmp_path, out=str(tmp_path / mode), source="shards", epochs=4, scale=3,
                                     shards=str(tmp_path / "shards"), mix_real=0.25, pool_on_device=mode))
            for mode in ("off", "on")}
    assert [json.loads((runs[m] / "config.json").read_text())["data"]["pool_on_device"] for m in runs] == [False, True]
    assert metrics(runs["off"]) == metrics(runs["on"])
    assert (runs["off"] / "model.safetensors").read_bytes() == (runs["on"] / "model.safetensors").read_bytes()
    (runs["on"] / "done.json").unlink()  # where the pool lives is no setting of the run: a resume may change it
    train(small_config(tmp_path, out=str(runs["on"]), source="shards", epochs=4, scale=3, resume=True,
                       shards=str(tmp_path / "shards"), mix_real=0.25, pool_on_device="off"))
    assert (runs["on"] / "done.json").exists()


def test_report_to_tensorboard_logs_the_config_and_the_same_elbos_as_metrics_jsonl(tmp_path, support):
    pytest.importorskip("tensorboard")  # the `tracking` extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    support.store(tmp_path / "data")
    out = train(small_config(tmp_path, report_to="tensorboard", early_stopping_split=0.25))
    points = metrics(out)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for key in ("train_elbo", "test_elbo", "val_elbo", "batch_elbo"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [m["epoch"] for m in points] == [2, 4, 6]
        assert [e.value for e in logged] == [np.float32(m[key]) for m in points]  # TensorBoard keeps float32
    (logged_config,) = [path.read_text() for path in (out / "tensorboard").glob("*/hparams.yml")]
    assert "dataset: fmnist" in logged_config and "model.arch: fc" in logged_config


def test_a_tracker_whose_package_is_missing_is_a_one_line_error_before_anything_is_written(tmp_path, support,
                                                                                         monkeypatch):
    import vaegen.tracking as tracking

    support.store(tmp_path / "data")
    monkeypatch.setitem(tracking._AVAILABLE, "mlflow", lambda: False)
    result, errors = run_cli("--dataset", "fmnist", "--source", "real", "--data-root", tmp_path / "data",
                             "--epochs", 1, "--report-to", "mlflow", "--out", tmp_path / "run")
    assert result.exit_code == 2 and len(errors) == 1 and "needs the mlflow package" in errors[0], result.output
    assert not (tmp_path / "run").exists()


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run's transaction log (run-*.wandb): a 7-byte W&B header, then
    LevelDB's log format (32 KiB blocks of chunks: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_report_to_wandb_offline_logs_the_config_and_the_metrics_lines(tmp_path, support, monkeypatch):
    pytest.importorskip("wandb")  # the `tracking` extra
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    support.store(tmp_path / "data")
    out = train(small_config(tmp_path, report_to="wandb", tracker_group="a-study", epochs=4))
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "a-study" and run.display_name == "run"
    def key(item):
        return item.key or "/".join(item.nested_key)

    history = [{"_step": r.history.step.num, **{key(item): json.loads(item.value_json) for item in r.history.item}}
               for r in records if r.WhichOneof("record_type") == "history"]
    points = metrics(out)
    assert [h["_step"] for h in history] == [m["epoch"] for m in points] == [2, 4]
    assert all(h["test_elbo"] == m["test_elbo"] and h["train_elbo"] == m["train_elbo"] for h, m in zip(history, points))
    config = {key(item): item.value_json for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert json.loads(config["dataset"]) == "fmnist" and json.loads(config["model.arch"]) == "fc"


def test_checkpoints_are_swapped_in_whole_pruned_to_the_newest_and_a_kill_between_renames_leaves_one(tmp_path,
                                                                                                  monkeypatch):
    import os

    from accelerate import Accelerator

    import vaegen.checkpoints as ckpt

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpt.save_checkpoint(accelerator, tmp_path / "checkpoints" / f"step-{step:08d}", prune="step-*", keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path / "checkpoints", "step-*")] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]

    ckpt.save_checkpoint(accelerator, tmp_path / "checkpoint", {"epoch": 1}, "state.json")
    real_replace, calls = os.replace, []

    def killed_before_the_second_rename(src, dst):  # os is one module: only count the checkpoint's renames
        if Path(dst).parent == tmp_path:
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(accelerator, tmp_path / "checkpoint", {"epoch": 2}, "state.json")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists()  # moved aside, the new one not yet in place
    found = ckpt.resume_point(tmp_path / "checkpoint")
    assert found.name == ".checkpoint.old" and ckpt.load_checkpoint(accelerator, found, "state.json") == {"epoch": 1}
    ckpt.save_checkpoint(accelerator, tmp_path / "checkpoint", {"epoch": 2}, "state.json")
    assert ckpt.resume_point(tmp_path / "checkpoint").name == "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint", "checkpoints"]
