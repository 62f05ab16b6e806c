"""`vaegen report` builds its tables and plots from run directories alone."""

import csv
import json

import pytest
from click.testing import CliRunner

from studies.cli import main
from studies.report import build_report
from studies.results import run_of


def write_result_run(root, name, seed, test_elbo, gap, source="real", augment=None, scale=None, finished=True,
              config=None, gaps=None, curves=None, parameters=None):
    run = root / "runs" / name
    run.mkdir(parents=True)
    config = {"dataset": "fmnist", "source": source, "augment": augment, "scale": scale, "seed": seed,
              "mix_real": 0.0, "model": {"arch": "fc"}, **(config or {})}
    (run / "config.json").write_text(json.dumps(config))
    if parameters:
        (run / "model.json").write_text(json.dumps({"arch": "conv", "parameters": parameters}))
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in (5, 10, 15):
            f.write(json.dumps({"epoch": epoch, "train_elbo": test_elbo + gap * epoch / 15, "test_elbo": test_elbo,
                                "generalization_gap": gap * epoch / 15, "batch_elbo": 1000.0 + epoch}) + "\n")
    if finished:
        (run / "eval").mkdir()
        summary = {"generalization": {"gap": gap, "elbo_train": {"mean": test_elbo + gap},
                                      "elbo_test": {"mean": test_elbo}},
                   "amortization": {"gap": gap / 10}, "robustness": {"gap": 0.01 * seed},
                   "psnr": {"test": {"mean": 20.0}}, **(gaps or {})}
        (run / "eval" / "gaps.json").write_text(json.dumps(summary))
        if curves:
            (run / "eval" / "gap_curves.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curves))


@pytest.fixture
def study(tmp_path):
    for seed in (0, 1):
        write_result_run(tmp_path, f"normal-seed{seed}", seed, 500.0 + seed, 100.0 + seed)
        write_result_run(tmp_path, f"aug-naive-seed{seed}", seed, 520.0, 50.0, augment="naive")
        for k in (1, 10):
            write_result_run(tmp_path, f"dmaapx-k{k}-seed{seed}", seed, 540.0 + k, 20.0 / k, source="shards", scale=k)
    write_result_run(tmp_path, "aug-tuned-seed0", 0, 0, 0, augment="tuned", finished=False)
    (tmp_path / "study.json").write_text(json.dumps({"study": "ablation", "dataset": "fmnist", "minutes": 3,
                                                     "stopped_at": "dmaapx-k100-seed0",
                                                     "preset": {"name": "smoke", "subset": 200, "epochs": 15}}))
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
    assert run_of({"source": "real", "augment": None}).method == "Normal"
    assert run_of({"source": "real", "augment": "tuned"}).method == "Aug.Tuned"
    assert run_of({"source": "shards", "mix_real": 0.0}).method == "DMaaPx"
    assert run_of({"source": "shards", "mix_real": 0.25}).method == "Mix 25% real"
    assert run_of({"source": "shards", "mix_real": 0.2, "augment": "tuned"}).method == \
        "Mix 20% real + Aug.Tuned (real part)"
    assert run_of({"source": "real", "mollify": True}).method == "Aug.Mollify"
    assert run_of({"source": "shards", "mollify": True}).method == "DMaaPx + Mollify"
    assert run_of({"source": "shards", "rha": True}).method == "DMaaPx + RHA"
    assert run_of({"source": "real", "early_stopping_split": 0.1}).method == "Normal + early stopping"
    assert run_of({"source": "real", "weight_decay": 0.001}).method == "Normal + weight decay 0.001"


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
            write_result_run(tmp_path, name, seed, 700.0 + dm_n / 10, 1.0, source="shards", scale=10)
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
    assert "| `runs/dm/fmnist-n250-s0-small` | ? | 40 (0.4) | 0.8 (0.9) | 0.179 (0.9) | 0.8 (0.5) |" in text


def test_probes_smoothness_and_gap_curves_get_their_sections(tmp_path):
    for seed in (0, 1):
        for name, rha in (("normal", False), ("normal-rha", True)):
            curves = [{"epoch": e, "gap": g, "mean": 10.0 + e + seed, "se": 1.0, "ci95": [0, 1], "n_images": 5}
                      for e in (5, 10, 15) for g in ("amortization", "robustness")]
            smooth = {"mean_log_q": {"mean": 3.0 + rha}, "deepest_dip": {"mean": -1.0}, "roughness": {"mean": 0.5},
                      "alphas": [0, 0.5, 1], "mean_curve": [3.0, 2.0 + rha, 3.0]}
            probes = {"accuracy": {k: 0.8 + 0.01 * seed for k in ("logistic_regression", "linear_svm", "rbf_svm",
                                                                    "knn5")},
                      "split": {"kind": "test-halves", "fit_images": 50, "score_images": 50}}
            write_result_run(tmp_path, f"{name}-seed{seed}", seed, 500.0, 10.0, config={"rha": rha}, curves=curves,
                      gaps={"smoothness": smooth, "probes": probes})
    text = build_report(tmp_path).read_text()
    assert "## Downstream probes" in text and "| Normal + RHA | 0.805 ± 0.007 |" in text
    assert "fit on a seeded half of D_test (50 images)" in text
    assert "## Latent smoothness" in text and "| Normal + RHA | 4.0 | -1.0 | 0.50 |" in text
    for png in ("gap_curves.png", "smoothness.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in text


def test_model_size_sweeps_plot_against_m_z_n_c_and_the_parameter_count(tmp_path, monkeypatch):
    import studies.sections

    plotted, plot_vs = {}, studies.sections.plot_vs
    monkeypatch.setattr(studies.sections, "plot_vs", lambda runs, x, label, path, **kw: (
        plotted.__setitem__(path.name, sorted(r.name for r in runs)), plot_vs(runs, x, label, path, **kw)))
    for mz, nc in ((1, 8), (2, 8), (4, 8), (1, 4), (1, 16), (4, 4), (4, 16)):
        params = {"total": 88 * nc * nc + 43 * nc + mz * (3 * nc + 2), "z": mz * (3 * nc + 2), "not_z": 88 * nc * nc}
        write_result_run(tmp_path, f"normal-mz{mz}-nc{nc}-seed0", 0, 400.0 + mz + nc, 50.0,
                  config={"model": {"arch": "conv", "m_z": mz, "n_c": nc}, "epochs": 200}, parameters=params)
    (tmp_path / "study.json").write_text(json.dumps({"study": "overparam", "dataset": "fmnist", "minutes": 3,
                                                     "preset": {"name": "cpu", "epochs": 500, "seeds": [0, 1, 2]}}))
    text = build_report(tmp_path).read_text()
    assert "200 effective epochs, seeds [0]," in text  # as its runs were set, not the preset's other studies
    for png in ("mz.png", "nc.png", "trajectory.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in text
    assert "| 2 | 8 | 6,028 | 52 | 5,632 |" in text
    assert plotted["nc.png"] == sorted(f"normal-mz{mz}-nc{nc}-seed0" for mz in (1, 4) for nc in (4, 8, 16))
    with open(tmp_path / "runs.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["normal-mz2-nc8-seed0"]["parameters_z"] == "52"


def test_dm_quality_correlates_each_score_with_each_outcome(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # three snapshots of one DM training run and a DM's final export, listed out of order
    dms = {1000: "runs/dm/fmnist-retrained/snapshots/step-00001000", 2800: "runs/dm/fmnist",
           100: "runs/dm/fmnist-retrained/snapshots/step-00000100",
           300: "runs/dm/fmnist-retrained/snapshots/step-00000300"}
    for steps, dm in dms.items():
        i = sorted(dms).index(steps)
        (tmp_path / dm).mkdir(parents=True)
        (tmp_path / dm / "score.json").write_text(json.dumps({
            "samples": {"fd": 10.0 - 3 * i, "precision": 0.7 + 0.05 * i, "recall": 0.3 + 0.2 * i,
                        "c2st_accuracy": 0.9 - 0.1 * i, "nn_distance_ratio_to_test": 1.5 - 0.2 * i},
            "floor_real_test_vs_train": {"fd": 0.4, "precision": 0.9, "recall": 0.9, "c2st_accuracy": 0.5}}))
        for seed in (0, 1):
            write_result_run(tmp_path, f"dm-steps{steps}-seed{seed}", seed, 600.0 + 50 * i + seed, 1.0, source="shards",
                      scale=10, config={"data": {"pool_size": 10000, "scale": 10,
                                                 "generation": {"n_train": 1000, "dm": {"path": dm}}}})
    text = build_report(tmp_path).read_text()
    assert "## How much the DM's quality matters" in text and "(n = 4)" in text
    # monotone in both; the exact permutation p-value of a perfect rank correlation of 4 points is 2/4! = 0.083
    assert "| fd | -1.00 (p=0.083) |" in text and "| recall | +1.00 (p=0.083) |" in text
    assert (tmp_path / "dm_quality.png").stat().st_size > 10_000
    assert "| `runs/dm/fmnist-retrained/snapshots/step-00000100` | 10 | 0.3 | 600.5 ± 0.7 | +50.0 | 0.7 |" in text
    # one row per DM in the results table, snapshots by step and the final DM last
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| DMaaPx k=10")]
    assert rows == ["| DMaaPx k=10, DM at step 100", "| DMaaPx k=10, DM at step 300", "| DMaaPx k=10, DM at step 1000",
                    "| DMaaPx k=10, DM fmnist"]


def test_real_vs_synthetic_reports_the_real_data_equivalent_of_a_synthetic_pool(tmp_path):
    for seed in (0, 1):
        for k, elbo in ((1, 400.0), (2, 500.0), (5, 600.0), (10, 700.0)):
            config = {"n_train": 1000 * k, "data": {"epoch_size": 1000}} if k > 1 else {}
            write_result_run(tmp_path, f"real-k{k}-seed{seed}", seed, elbo + seed, 50.0, config=config)
        for k, elbo in ((1, 300.0), (5, 550.0), (10, 800.0)):
            write_result_run(tmp_path, f"dmaapx-k{k}-seed{seed}", seed, elbo + seed, 1.0, source="shards", scale=k)
    text = build_report(tmp_path).read_text()
    assert "## A synthetic sample's worth in real images" in text
    row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    # 550 lies halfway between the real curve's 500 (k=2) and 600 (k=5) in ELBO: k = exp of the log midpoint
    assert row.startswith("| 5 | 600.5 ± 0.7 | 550.5 ± 0.7 | 3.2 [")
    assert next(line for line in text.splitlines() if line.startswith("| 10 |")).endswith("> 10 [> 10, > 10] |")
    assert (tmp_path / "real_vs_synthetic.png").stat().st_size > 10_000


def test_the_demo_report_says_in_one_line_what_it_shows_and_names_its_dm(tmp_path):
    write_result_run(tmp_path, "normal-seed0", 0, 590.0, 540.0)
    write_result_run(tmp_path, "dmaapx-k5-seed0", 0, 718.0, 51.0, source="shards", scale=5)
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "demo", "dataset": "fmnist", "dms": {"models/fmnist-n1000-s0-small": "cd" * 32},
        "preset": {"name": "demo", "subset": 1000, "epochs": 200, "sampler": "dpm-solver++", "sampler_steps": 7}}))
    lines = build_report(tmp_path).read_text().splitlines()
    assert lines[2].startswith("**What this shows:** on 1000 fmnist training images (200 epochs, 1 seed)")
    assert "generalization gap of 51 nats against 540" in lines[2] and "test ELBO of 718 against 590" in lines[2]
    assert any("`models/fmnist-n1000-s0-small` (weights sha256 `" + "cd" * 32 in line for line in lines)


def test_the_robustness_section_and_runs_csv_show_g_r_and_its_two_terms_for_each_protocol(tmp_path):
    for seed in (0, 1):
        robust = {"gap": 0.1 + seed / 100, "ci95": [0.05, 0.15], "msssim_input": {"mean": 0.9},
                  "msssim_recon": {"mean": 0.8 - seed / 100}, "protocol": "vaegen"}
        write_result_run(tmp_path, f"normal-seed{seed}", seed, 500.0, 100.0, gaps={"robustness": robust})
        kuzina = tmp_path / "runs" / f"normal-seed{seed}" / "eval-kuzina"
        kuzina.mkdir()
        (kuzina / "gaps.json").write_text(json.dumps({"robustness": {
            "gap": 0.3, "ci95": [0.2, 0.4], "msssim_input": {"mean": 0.95}, "msssim_recon": {"mean": 0.65},
            "protocol": "kuzina"}}))
    (tmp_path / "study.json").write_text(json.dumps({"study": "robustness", "dataset": "fmnist",
                                                     "preset": {"name": "cpu"}}))
    text = build_report(tmp_path).read_text()
    assert "| Normal | vaegen | 2 | 0.105 ± 0.007 | [0.050, 0.150] | 0.900 | 0.795 ± 0.007 |" in text
    assert "| Normal | kuzina | 2 | 0.300 | [0.200, 0.400] | 0.950 | 0.650 |" in text
    with open(tmp_path / "runs.csv") as f:
        row = next(csv.DictReader(f))
    assert (row["G_r"], row["msssim_clean"], row["msssim_attacked"]) == ("0.1", "0.9", "0.8")
    assert (row["G_r[eval-kuzina]"], row["msssim_clean[eval-kuzina]"], row["msssim_attacked[eval-kuzina]"]) == \
        ("0.3", "0.95", "0.65")


def test_the_robustness_report_orders_the_four_methods_by_g_r_under_each_factor_against_table_7(tmp_path):
    """Each factor changes one choice; methods it leaves alone keep their baseline G_r; the DPM-Solver++ DMaaPx
    runs are a group of their own, not pooled with the Heun ones."""
    heun = {"data": {"generation": {"sampler": {"name": "edm-heun", "steps": 12}}}}
    dpm = {"data": {"generation": {"sampler": {"name": "dpm-solver++", "steps": 7}}}}
    baseline = {"normal": 0.30, "aug-naive": 0.28, "aug-tuned": 0.16, "dmaapx": 0.15}

    def run(name, seed, g_r, sigma=0.1, **kw):
        config = {"sigma": sigma, "likelihood": "gaussian", **kw.pop("config", {})}
        if "augment" in kw:
            config["augment_output"] = kw.pop("augment_output", "uint8")
        robust = {"gap": g_r, "msssim_input": {"mean": 0.9}, "msssim_recon": {"mean": 0.9 - g_r}}
        write_result_run(tmp_path, f"{name}-seed{seed}", seed, 500.0, 100.0, config=config,
                         gaps={"robustness": robust}, **kw)

    for seed in (0, 1):
        run("sigma0.1-normal", seed, baseline["normal"] + seed / 100)
        run("sigma0.1-aug-naive", seed, baseline["aug-naive"], augment="naive")
        run("sigma0.1-aug-tuned", seed, baseline["aug-tuned"], augment="tuned")
        run("sigma0.1-dmaapx", seed, baseline["dmaapx"], source="shards", scale=10, config=heun)
        for method, g_r in baseline.items():  # Kuzina et al.'s protocol, and one of its steps toward vaegen's
            theirs = tmp_path / "runs" / f"sigma0.1-{method}-seed{seed}" / "eval-kuzina"
            theirs.mkdir()
            step = {"gap": 1 - g_r, "msssim_input": {"mean": 1.0}, "msssim_recon": {"mean": g_r}}
            (theirs / "gaps.json").write_text(json.dumps({"robustness": {
                "gap": g_r / 2, "msssim_input": {"mean": 0.9}, "msssim_recon": {"mean": 0.9 - g_r / 2},
                "protocol": "kuzina", "variants": {"attack": step}}}))
    run("sigma0.1-aug-naive-float", 0, 0.10, augment="naive", augment_output="float")
    run("sigma0.1-dmaapx-dpm", 0, 0.24, source="shards", scale=10, config=dpm)
    for method, g_r in (("normal", 0.39), ("aug-naive", 0.11), ("aug-tuned", 0.21)):
        run(f"sigma0.2-{method}", 0, g_r, sigma=0.2, **({"augment": method[4:]} if method != "normal" else {}))
    run("sigma0.2-dmaapx", 0, 0.31, sigma=0.2, source="shards", scale=10, config=heun)
    (tmp_path / "study.json").write_text(json.dumps({"study": "robustness", "dataset": "fmnist",
                                                     "preset": {"name": "cpu"}}))
    text = build_report(tmp_path).read_text()
    assert "| DMaaPx k=10, dpm-solver++ 7, sigma=0.1 | vaegen | 1 | 0.240 |" in text
    assert "| DMaaPx k=10, edm-heun 12, sigma=0.1 | vaegen | 2 | 0.150 |" in text
    with open(tmp_path / "runs.csv") as f:
        assert {row["run"]: row["sampler"] for row in csv.DictReader(f)}["sigma0.1-dmaapx-dpm-seed0"] == "dpm-solver++ 7"
    assert ("| baseline | vaegen | DMaaPx 0.150 < Aug.Tuned 0.160 < Aug.Naive 0.280 < Normal 0.305 | 3/6 |"
            in text)
    assert "| sigma=0.2 | vaegen | Aug.Naive 0.110 < Aug.Tuned 0.210 < DMaaPx 0.310 < Normal 0.390 | 6/6 |" in text
    assert "| baseline | kuzina | DMaaPx 0.075 < Aug.Tuned 0.080 < Aug.Naive 0.140 < Normal 0.150 | 3/6 |" in text
    assert ("| baseline | kuzina: attack | Normal 0.700 < Aug.Naive 0.720 < Aug.Tuned 0.840 < DMaaPx 0.850 | 3/6 |"
            in text)
    assert text.count("kuzina: attack |") == 1  # the protocol's steps: in the baseline's order only
    assert ("| Aug.* output float | vaegen | Aug.Naive 0.100 < DMaaPx 0.150* < Aug.Tuned 0.160* < Normal 0.305* | 5/6 |"
            in text)
    assert ("| DMaaPx shards by dpm-solver++ 7 | vaegen | Aug.Tuned 0.160* < DMaaPx 0.240 < Aug.Naive 0.280* < "
            "Normal 0.305* | 4/6 |" in text)
