"""RHA, Aug.Mollify, early stopping, weight decay, a k*N real pool, and gap curves from model snapshots."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import trainer.regimes as regimes_module
import trainer.train as train_module
from studies.cli import main
from trainer.data import RealSource
from trainer.regularizers import MollifySchedule, mollify, validation_split
from trainer.train import TrainConfig, train


def config(tmp_path, name="run", **overrides):
    base = dict(dataset="fmnist", out=str(tmp_path / name), source="real", data_root=str(tmp_path / "data"),
                epochs=4, eval_every=1, checkpoint_every=1, batch_size=16, eval_batch_size=16, seed=0)
    return TrainConfig(**{**base, **overrides})


def snapshot(run, epoch):
    return load_file(str(run / "snapshots" / f"epoch-{epoch:06d}.safetensors"))


def test_rha_freezes_the_decoder_bit_for_bit_and_trains_the_encoder_on_model_samples(tmp_path, support,
                                                                                      monkeypatch):
    support.store(tmp_path / "data")
    model = {"arch": "conv", "mz": 1, "nc": 8}
    sampled = []
    real_sample = train_module.VAE.sample

    def count_samples(self, n, generator=None):
        sampled.append(n)
        return real_sample(self, n, generator)

    monkeypatch.setattr(train_module.VAE, "sample", count_samples)
    run = train(config(tmp_path, rha=True, rha_start_epoch=2, track_gaps=True, track_robustness_every=1,
                       track_amortization_every=1, arch="conv", **{k: v for k, v in model.items() if k != "arch"}))
    assert json.loads((run / "config.json").read_text())["rha_start_epoch"] == 2
    assert sum(sampled) == 2 * 48  # epochs 3 and 4: one model sample per real image of the epoch
    weights = {e: snapshot(run, e) for e in (1, 2, 3, 4)}
    decoder = [k for k in weights[2] if k.startswith("decoder.")]
    encoder = [k for k in weights[2] if k.startswith("encoder.") and "weight" in k]
    assert any("running_mean" in k for k in decoder)  # BatchNorm statistics are frozen too
    for epoch in (3, 4):
        assert all(torch.equal(weights[2][k], weights[epoch][k]) for k in decoder)
        assert any(not torch.equal(weights[2][k], weights[epoch][k]) for k in encoder)
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in decoder)  # before RHA it trained


def test_mollification_schedule_starts_at_one_anneals_and_is_zero_after():
    schedule = MollifySchedule(steps=100)
    variances = [schedule.variance(step) for step in range(130)]
    assert variances[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(variances, variances[1:]))  # never increases
    assert 0 < variances[99] < 0.01 and variances[100:] == [0.0] * 30
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mollify(x, 0.0, torch.Generator(), clamp=False), x)
    noisy = mollify(torch.full((20000,), 0.5), 0.25, torch.Generator().manual_seed(0), clamp=False)
    assert noisy.mean().item() == pytest.approx(0.5, abs=0.01)  # mid-grey stays, noise std sqrt(v)/2 in [0, 1]
    assert noisy.std().item() == pytest.approx(0.25, abs=0.01)


def test_a_mollified_run_follows_its_schedule_per_step_and_trains_on_clean_data_after(tmp_path, support,
                                                                                    monkeypatch):
    support.store(tmp_path / "data")
    seen = []
    real_mollify = regimes_module.mollify

    def record(x, variance, generator, clamp):
        seen.append(variance)
        return real_mollify(x, variance, generator, clamp)

    monkeypatch.setattr(regimes_module, "mollify", record)
    run = train(config(tmp_path, mollify=True, mollify_epochs=2))
    saved = json.loads((run / "config.json").read_text())
    assert saved["mollify_schedule"]["steps"] == 2 * 3 and saved["mollify_schedule"]["tau"] == 0.7
    schedule = MollifySchedule(steps=6)
    assert seen == [schedule.variance(step) for step in range(12)]  # 3 steps per epoch, 4 epochs
    assert seen[0] == pytest.approx(1.0) and seen[6:] == [0.0] * 6


def test_early_stopping_never_trains_on_validation_images_keeps_the_best_model_and_stops(tmp_path, support,
                                                                                       monkeypatch):
    support.store(tmp_path / "data", n_train=40)
    from vaegen.data import open_dataset

    store = open_dataset("fmnist", "train", root=tmp_path / "data").images
    kept, held_out = validation_split(40, 0.25, 0)
    assert len(held_out) == 10 and not set(kept) & set(held_out)
    trained_on = []
    real_share = RealSource.epoch_share
    monkeypatch.setattr(RealSource, "epoch_share", lambda self, epoch: trained_on.append(real_share(self, epoch))
                        or trained_on[-1])
    val_script = iter([5.0, 7.0, 6.0, 6.5, 1.0, 1.0, 1.0, 1.0])  # best after epoch 2, then no gain
    real_elbo = train_module.mean_elbo

    def scripted(vae, images, split, *args):
        return next(val_script) if split == "validation" else real_elbo(vae, images, split, *args)

    monkeypatch.setattr(train_module, "mean_elbo", scripted)
    run = train(config(tmp_path, epochs=8, early_stopping_split=0.25, early_stopping_patience=2,
                       track_gaps=True, track_robustness_every=1))
    validation = {store[i].tobytes() for i in held_out}
    assert all(image.tobytes() not in validation for share in trained_on for image in share)
    done = json.loads((run / "done.json").read_text())
    assert (done["epochs"], done["best_epoch"], done["stopped_early"]) == (4, 2, True)
    final, best = load_file(str(run / "model.safetensors")), snapshot(run, 2)
    assert all(torch.equal(final[k], best[k]) for k in best)  # the kept model is epoch 2's
    saved = json.loads((run / "config.json").read_text())
    assert saved["validation"]["indices"] == held_out.tolist() and saved["n_train"] == 30
    assert [m["val_elbo"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == \
        [5.0, 7.0, 6.0, 6.5]
    monkeypatch.setattr(train_module, "mean_elbo", real_elbo)
    result = CliRunner().invoke(main, ["eval", str(run), "--quick", "--gaps", "generalization", "--iwae-k", "0",
                                       "--smoothness-pairs", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval" / "gaps.json").read_text())["n_train"] == 30  # D_train without the held-out


def test_weight_decay_uses_adamw_and_shrinks_the_weights(tmp_path, support):
    support.store(tmp_path / "data")
    plain = train(config(tmp_path, "plain", epochs=2))
    decayed = train(config(tmp_path, "decayed", epochs=2, weight_decay=0.5))
    assert json.loads((decayed / "config.json").read_text())["optimizer"] == "AdamW"
    assert json.loads((plain / "config.json").read_text())["optimizer"] == "Adam"
    norm = {name: sum(v.square().sum().item() for v in load_file(str(run / "model.safetensors")).values())
            for name, run in (("plain", plain), ("decayed", decayed))}
    assert norm["decayed"] < norm["plain"]


def test_a_real_pool_of_four_epochs_gives_fresh_images_for_four_epochs_at_the_same_compute(support):
    images = support.numbered_images(400)
    source = RealSource(images, 32, seed=1, epoch_size=100)
    epochs = [set(support.image_ids(source.epoch_share(e)).tolist()) for e in range(8)]
    assert all(len(e) == 100 for e in epochs) and source.share_size(0) == 100
    assert set().union(*epochs[:4]) == set(range(400))  # disjoint, covering the pool
    assert set().union(*epochs[4:]) == set(range(400)) and epochs[4] != epochs[0]  # a new pass, a new order
    with pytest.raises(Exception, match="--epoch-size"):
        RealSource(images, 32, seed=1, epoch_size=401)


def test_gap_tracking_only_adds_snapshots_the_training_is_bit_identical(tmp_path, support):
    # studies reuse a tracked run for an untracked request on this (studies/study.py train_key)
    support.store(tmp_path / "data")
    plain = train(config(tmp_path, "plain", epochs=3))
    tracked = train(config(tmp_path, "tracked", epochs=3, track_gaps=True, track_amortization_every=2,
                           track_robustness_every=1, track_amortization_images=6, track_robustness_images=4))
    assert (tracked / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert not (plain / "snapshots").exists() and len(list((tracked / "snapshots").iterdir())) == 3


def test_tracked_gaps_at_the_last_epoch_equal_what_eval_measures_on_the_final_model(tmp_path, support):
    support.store(tmp_path / "data")
    run = train(config(tmp_path, epochs=4, track_gaps=True, track_amortization_every=2, track_robustness_every=1,
                       track_amortization_images=6, track_robustness_images=4, track_robustness_seeds=2))
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [f"epoch-{e:06d}.safetensors" for e in (1, 2, 3, 4)]
    small = ["--quick", "--iwae-k", "0", "--qstar-max-iters", "40", "--attack-iters", "5"]
    result = CliRunner().invoke(main, ["eval", str(run), *small, "--amortization-images", "6",
                                       "--attack-images", "4", "--attack-seeds", "2"])
    assert result.exit_code == 0, result.output
    gaps = json.loads((run / "eval" / "gaps.json").read_text())
    curves = [json.loads(line) for line in (run / "eval" / "gap_curves.jsonl").read_text().splitlines()]
    assert [(c["epoch"], c["gap"]) for c in curves] == [
        (1, "robustness"), (2, "amortization"), (2, "robustness"), (3, "robustness"), (4, "amortization"),
        (4, "robustness")]
    last = {c["gap"]: c for c in curves if c["epoch"] == 4}
    for gap in ("amortization", "robustness"):
        assert last[gap]["mean"] == gaps[gap]["gap"] and last[gap]["ci95"] == gaps[gap]["ci95"]
    assert all(np.isfinite(c["mean"]) and c["ci95"][0] <= c["mean"] <= c["ci95"][1] for c in curves)
    assert gaps["gap_curves"]["points"] == 6 and gaps["gap_curves"]["settings"]["robustness_images"] == 4
    # without its snapshots (a study's copy for an untracked request), the run is evaluated without curves
    shutil.rmtree(run / "snapshots")
    result = CliRunner().invoke(main, ["eval", str(run), *small, "--amortization-images", "6",
                                       "--attack-images", "4", "--attack-seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "gap_curves" not in json.loads((run / "eval" / "gaps.json").read_text())
    assert not (run / "eval" / "gap_curves.jsonl").exists()
