"""`vaegen eval` end to end on tiny run directories: outputs, refusals, determinism, atomic replacement."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from studies.cli import main
from trainer.models import build_vae, save_vae
from vaegen.data import store_attrs, store_path, write_store

QUICK_SMALL = ["--quick", "--iwae-k", "20", "--qstar-max-iters", "60", "--attack-iters", "5", "--attack-images", "4",
               "--attack-seeds", "2"]


def write_eval_store(root: Path, dataset="fmnist", channels=1, n_train=80, n_test=40):
    """data/<dataset>.zarr (vaegen.data's writer): a bright square whose position is the label, so probes can
    learn it."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 4).astype(np.uint8)
        images = rng.integers(0, 40, (n, channels, 32, 32)).astype(np.uint8)
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 2)
            images[i, :, 4 + 14 * r: 14 + 14 * r, 4 + 14 * c: 14 + 14 * c] = 230
        splits[split] = (images, labels)
    write_store(store_path(dataset, root=root), splits, {**store_attrs(dataset), "channels": channels})


def write_vae_run(run: Path, data_root: Path, done=True, dataset="fmnist", model=None) -> Path:
    """A finished run dir as the trainer leaves it: model files, config.json naming the data, done.json."""
    torch.manual_seed(0)
    save_vae(build_vae(model or {"arch": "fc", "hidden": 32, "dataset": dataset}), run)
    (run / "config.json").write_text(json.dumps({"dataset": dataset, "subset": None, "subset_seed": 0,
                                                 "data_root": str(data_root)}))
    if done:
        (run / "done.json").write_text("{}")
    return run


@pytest.fixture
def run_dir(tmp_path):
    write_eval_store(tmp_path / "data")
    return write_vae_run(tmp_path / "runs" / "vae" / "tiny", tmp_path / "data")


def invoke(*args):
    torch.set_num_threads(1)
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_eval_writes_gaps_json_and_per_example_arrays(run_dir):
    result = invoke(run_dir, *QUICK_SMALL, "--probes")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "eval" / "gaps.json").read_text())
    for key in ("generalization", "amortization", "robustness", "log_likelihood", "psnr", "probes"):
        assert key in summary
    for gap in ("generalization", "amortization", "robustness"):
        lo, hi = summary[gap]["ci95"]
        assert lo <= summary[gap]["gap"] <= hi
    assert summary["amortization"]["gap"] > 0  # an optimized q* beats the (untrained) encoder
    assert summary["robustness"]["msssim_config"]["kernel_size"] == 7 and summary["robustness"]["protocol"] == "vaegen"
    robustness = summary["robustness"]  # G_r is the difference of its two MS-SSIM means
    assert robustness["gap"] == pytest.approx(robustness["msssim_input"]["mean"] - robustness["msssim_recon"]["mean"])
    assert summary["robustness"]["attack"]["delta"] == 0.1  # fmnist's paper setting
    assert summary["provenance"]["config"]["iwae_k"] == 20
    probes = summary["probes"]
    assert set(probes["accuracy"]) == {"logistic_regression", "linear_svm", "rbf_svm", "knn5"}
    assert probes["split"]["kind"] == "test-halves" and probes["split"]["fit"] == probes["split"]["score"] == "D_test"
    assert probes["split"]["fit_images"] == probes["split"]["score_images"] == 20 and probes["split"]["seed"] == 0
    arrays = zarr.open_group(str(run_dir / "eval" / "per_example.zarr"), mode="r")
    assert arrays["train/elbo"].shape == (80,) and arrays["test/elbo"].shape == (40,)
    assert arrays["amortization/elbo_star"].shape == (40,)
    assert arrays["robustness/msssim_input"].shape == (2, 4)
    assert np.isfinite(arrays["test/iwae"][...]).all()
    np.testing.assert_allclose(np.mean(arrays["amortization/elbo_star"][...] - arrays["amortization/elbo"][...]),
                               summary["amortization"]["gap"], rtol=1e-5)
    fit, score = arrays["probes/fit_index"][...], arrays["probes/score_index"][...]
    assert not set(fit) & set(score) and sorted({*fit, *score}) == list(range(40))  # halves of D_test
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_robustness_protocol_kuzina_is_recorded_with_both_msssim_components(run_dir):
    result = invoke(run_dir, *QUICK_SMALL, "--gaps", "robustness", "--iwae-k", "0", "--smoothness-pairs", "0",
                    "--robustness-protocol", "kuzina")
    assert result.exit_code == 0, result.output
    theirs = json.loads((run_dir / "eval" / "gaps.json").read_text())["robustness"]
    assert theirs["protocol"] == "kuzina"
    assert theirs["msssim_config"]["window_size"] == 14 and theirs["msssim_config"]["frame"] == 28
    assert theirs["kept_iterate"] == "last" and theirs["reconstruction"] == "decoder mean at one z ~ q(z|x)"
    # G_r is the difference of its two MS-SSIM means
    assert theirs["gap"] == pytest.approx(theirs["msssim_input"]["mean"] - theirs["msssim_recon"]["mean"])
    # the same attacked inputs scored with vaegen's MS-SSIM and/or reconstruction, each a G_r of its own
    assert set(theirs["variants"]) == {"attack", "attack+msssim", "attack+reconstruction"}
    for variant in theirs["variants"].values():
        assert variant["gap"] == pytest.approx(variant["msssim_input"]["mean"] - variant["msssim_recon"]["mean"])
    assert theirs["variants"]["attack+msssim"]["msssim_input"] == theirs["msssim_input"]
    arrays = zarr.open_group(str(run_dir / "eval" / "per_example.zarr"), mode="r")
    labels = np.arange(40) % 4  # write_eval_store's test labels
    assert sorted(labels[arrays["robustness/index"][...]]) == [0, 1, 2, 3]  # one image per class


def test_robustness_protocol_kuzina_refuses_signed_steps_in_one_line(run_dir):
    result = invoke(run_dir, "--quick", "--robustness-protocol", "kuzina", "--attack-update", "sign")
    assert result.exit_code == 2 and "SGD" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (run_dir / "eval").exists()


def test_iwae_comes_with_the_generalization_gap_unless_asked_for(run_dir):
    quick = [a for a in QUICK_SMALL if a not in ("--iwae-k", "20")]
    assert invoke(run_dir, *quick, "--gaps", "robustness", "--smoothness-pairs", "0").exit_code == 0
    assert "log_likelihood" not in json.loads((run_dir / "eval" / "gaps.json").read_text())
    assert invoke(run_dir, *quick, "--gaps", "robustness", "--iwae-k", "3", "--smoothness-pairs", "0").exit_code == 0
    assert json.loads((run_dir / "eval" / "gaps.json").read_text())["log_likelihood"]["k"] == 3
    assert invoke(run_dir, *quick, "--gaps", "generalization", "--smoothness-pairs", "0").exit_code == 0
    assert json.loads((run_dir / "eval" / "gaps.json").read_text())["log_likelihood"]["k"] > 0


def test_probes_on_train_to_test_are_an_explicit_option(run_dir):
    result = invoke(run_dir, *QUICK_SMALL, "--gaps", "", "--iwae-k", "0", "--probes", "--probe-split", "train-test")
    assert result.exit_code == 0, result.output
    split = json.loads((run_dir / "eval" / "gaps.json").read_text())["probes"]["split"]
    assert (split["kind"], split["fit"], split["score"], split["fit_images"], split["score_images"]) == \
        ("train-test", "D_train", "D_test", 80, 40)


@pytest.mark.parametrize("dataset,channels,model,delta", [
    ("binary-mnist", 1, {"arch": "fc", "hidden": 32, "likelihood": "bernoulli"}, 0.1),
    ("cifar10", 3, {"arch": "conv", "channels": 3, "n_c": 8, "likelihood": "dmol", "n_mix": 2}, 0.05),
])
def test_eval_handles_bernoulli_and_dmol_models_with_their_paper_attack_settings(tmp_path, dataset, channels,
                                                                                  model, delta):
    write_eval_store(tmp_path / "data", dataset, channels, n_train=24, n_test=12)
    run = write_vae_run(tmp_path / "run", tmp_path / "data", dataset=dataset, model=model)
    result = invoke(run, *QUICK_SMALL, "--qstar-max-iters", "20")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval" / "gaps.json").read_text())
    assert summary["robustness"]["attack"]["delta"] == delta
    values = [summary[g]["gap"] for g in ("generalization", "amortization", "robustness")]
    values += [summary["log_likelihood"]["test"]["mean"], summary["psnr"]["test"]["mean"]]
    assert np.isfinite(values).all(), values
    assert summary["amortization"]["gap"] > 0


def test_eval_is_reproducible_and_replaces_the_previous_eval(run_dir):
    args = (run_dir, *QUICK_SMALL, "--gaps", "amortization,robustness", "--iwae-k", "0")
    assert invoke(*args).exit_code == 0
    first = json.loads((run_dir / "eval" / "gaps.json").read_text())
    assert "generalization" not in first and "log_likelihood" not in first
    assert invoke(*args).exit_code == 0
    second = json.loads((run_dir / "eval" / "gaps.json").read_text())
    for gap in ("amortization", "robustness"):
        assert first[gap]["gap"] == second[gap]["gap"]
    assert [p.name for p in run_dir.iterdir() if "eval" in p.name] == ["eval"]


@pytest.mark.parametrize("breakage", ["no done.json", "no model", "no config"])
def test_eval_refuses_a_directory_that_is_not_a_finished_run(tmp_path, breakage):
    write_eval_store(tmp_path / "data")
    run = write_vae_run(tmp_path / "run", tmp_path / "data", done=breakage != "no done.json")
    if breakage == "no model":
        (run / "model.safetensors").unlink()
    if breakage == "no config":
        (run / "config.json").unlink()
    result = invoke(run, "--quick")
    assert result.exit_code == 2
    assert "not a finished VAE run" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (run / "eval").exists()


def test_eval_rejects_an_unknown_gap_in_one_line(run_dir):
    result = invoke(run_dir, "--gaps", "generalization,robustnes")
    assert result.exit_code == 2
    assert "robustnes" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (run_dir / "eval").exists()


def test_eval_refuses_a_run_whose_data_store_is_missing(tmp_path):
    run = write_vae_run(tmp_path / "run", tmp_path / "nowhere")
    result = invoke(run, "--quick")
    assert result.exit_code == 2 and "no dataset store" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_runs_on_a_vae_trained_by_vaegen_train(tmp_path):
    write_eval_store(tmp_path / "data")
    run = tmp_path / "runs" / "vae" / "trained"
    trained = CliRunner().invoke(main, ["train", "--dataset", "fmnist", "--source", "real", "--out", str(run),
                                        "--data-root", str(tmp_path / "data"), "--epochs", "2", "--eval-every", "1",
                                        "--batch-size", "40"])
    assert trained.exit_code == 0, trained.output
    result = invoke(run, *QUICK_SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval" / "gaps.json").read_text())
    assert summary["model"]["arch"] == "fc" and summary["n_train"] == 80


def test_probes_fit_on_one_thread_so_their_accuracy_does_not_depend_on_the_thread_count(monkeypatch):
    import threadpoolctl

    import evaluator.probes as probes

    seen = []

    class Recorder:
        def fit(self, x, y):
            seen.append({lib["internal_api"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()})
            return self

        def predict(self, x):
            return np.zeros(len(x), dtype=int)

    monkeypatch.setattr(probes, "make_probes", lambda seed: {"a": Recorder(), "b": Recorder()})
    x, y = np.zeros((6, 2)), np.zeros(6, dtype=int)
    with threadpoolctl.threadpool_limits(limits=2):
        assert probes.probe_accuracies(x, y, x, y) == {"a": 1.0, "b": 1.0}
    assert len(seen) == 2 and seen[0] and all(n == 1 for fit in seen for n in fit.values()), seen
