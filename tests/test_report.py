"""`vaegen report` builds its tables and plots from run directories alone."""

import csv
import json

import pytest
from click.testing import CliRunner

from evaluator.report import build_report, method_of
from vaegen.cli import main


def write_run(root, name, seed, test_elbo, gap, source="real", augment=None, scale=None, finished=True):
    run = root / "runs" / name
    run.mkdir(parents=True)
    config = {"dataset": "fmnist", "source": source, "augment": augment, "scale": scale, "seed": seed,
              "mix_real": 0.0, "model": {"arch": "fc"}}
    (run / "config.json").write_text(json.dumps(config))
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in (5, 10, 15):
            f.write(json.dumps({"epoch": epoch, "train_elbo": test_elbo + gap * epoch / 15,
                                "test_elbo": test_elbo, "batch_elbo": 1000.0 + epoch}) + "\n")
    if finished:
        (run / "eval").mkdir()
        gaps = {"generalization": {"gap": gap, "elbo_train": {"mean": test_elbo + gap},
                                   "elbo_test": {"mean": test_elbo}},
                "amortization": {"gap": gap / 10}, "robustness": {"gap": 0.01 * seed},
                "psnr": {"test": {"mean": 20.0}}}
        (run / "eval" / "gaps.json").write_text(json.dumps(gaps))


@pytest.fixture
def study(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"normal-seed{seed}", seed, 500.0 + seed, 100.0 + seed)
        write_run(tmp_path, f"aug-naive-seed{seed}", seed, 520.0, 50.0, augment="naive")
        for k in (1, 10):
            write_run(tmp_path, f"dmaapx-k{k}-seed{seed}", seed, 540.0 + k, 20.0 / k, source="shards", scale=k)
    write_run(tmp_path, "aug-tuned-seed0", 0, 0, 0, augment="tuned", finished=False)
    (tmp_path / "study.json").write_text(json.dumps({"study": "ablation", "dataset": "fmnist", "minutes": 3,
                                                     "stopped_at": "dmaapx-k100-seed0",
                                                     "preset": {"name": "demo", "subset": 200, "epochs": 15}}))
    return tmp_path


def test_report_writes_tables_plots_and_reading(study):
    report = build_report(study)
    text = report.read_text()
    for png in ("elbo_curves.png", "gaps.png", "scale.png"):
        assert (study / png).stat().st_size > 10_000, png  # a real figure, not an empty canvas
        assert f"({png})" in text
    assert "dmaapx-k100-seed0" in text and "budget" in text  # where the budget stopped the study
    assert "Unfinished (no eval/ yet): aug-tuned-seed0" in text
    with open(study / "summary.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"Normal", "Aug.Naive", "DMaaPx k=1", "DMaaPx k=10"}
    assert float(rows["Normal"]["G_g_mean"]) == pytest.approx(100.5)
    assert float(rows["DMaaPx k=10"]["G_g_mean"]) == pytest.approx(2.0)
    assert float(rows["DMaaPx k=10"]["pool_elbo_mean"]) == pytest.approx(1015.0)  # the last epoch's batches
    assert rows["Normal"]["n_seeds"] == "2"
    assert "- DMaaPx k=10 vs Normal: G_g 2 vs 100" in text


def test_method_labels_follow_the_training_config():
    assert method_of({"source": "real", "augment": None}) == "Normal"
    assert method_of({"source": "real", "augment": "tuned"}) == "Aug.Tuned"
    assert method_of({"source": "shards", "mix_real": 0.0}) == "DMaaPx"
    assert method_of({"source": "shards", "mix_real": 0.25}) == "Mix 25% real"


def test_report_on_a_directory_without_runs_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a study directory" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dm_subset_runs_get_their_own_groups_and_the_dm_scores_are_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run configs name their DM relative to where the study ran
    for dm_n in (250, 1000):
        dm = tmp_path / f"runs/dm/fmnist-n{dm_n}-s0-small"
        dm.mkdir(parents=True)
        (dm / "score.json").write_text(json.dumps({
            "samples": {"fd": 10.0 * 1000 / dm_n, "precision": 0.8, "recall": dm_n / 1400, "c2st_accuracy": 0.8},
            "floor_real_test_vs_train": {"fd": 0.4, "precision": 0.9, "recall": 0.9, "c2st_accuracy": 0.5}}))
        for seed in (0, 1):
            name = f"dm{dm_n // 10:03d}pct-seed{seed}"
            write_run(tmp_path, name, seed, 700.0 + dm_n / 10, 1.0, source="shards", scale=10)
            config_path = tmp_path / "runs" / name / "config.json"
            config = json.loads(config_path.read_text())
            config["data"] = {"pool_size": 10000, "scale": 10, "generation": {
                "n_train": dm_n, "dm": {"path": f"runs/dm/fmnist-n{dm_n}-s0-small"}}}
            config_path.write_text(json.dumps(config))
    text = build_report(tmp_path).read_text()
    with open(tmp_path / "summary.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"DMaaPx k=10, DM on 250 images", "DMaaPx k=10"}  # the full-D_train DM needs no suffix
    assert float(rows["DMaaPx k=10, DM on 250 images"]["test_elbo_mean"]) == pytest.approx(725.0)
    assert "| `runs/dm/fmnist-n250-s0-small` | 40 (0.4) | 0.8 (0.9) | 0.179 (0.9) | 0.8 (0.5) |" in text
