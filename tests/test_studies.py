"""Studies chain the stage commands through files, resume by skipping finished runs, and end in a report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vaegen.cli import main
from vaegen.data import DEBIAN_FMNIST_DIR
from vaegen.errors import VaegenError
from vaegen.presets import get_preset
from vaegen.studies import Study

REPO = Path(__file__).resolve().parent.parent


def test_bad_scales_are_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "demo", "--scales", "1 two",
                                       "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--scales" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "demo", "--scales", "0 1",
                                       "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and ">= 1" in result.output


def test_a_study_directory_refuses_another_study_or_other_settings(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"study": "compare", "dataset": "fmnist",
                                                     "preset": {"name": "cpu"}}))
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "holds the compare study" in result.output

    study = Study("compare", "fmnist", get_preset("cpu", epochs=300), tmp_path)
    study.save([])
    assert Study("compare", "fmnist", get_preset("cpu", epochs=300, seeds=(0, 1)), tmp_path).check_resumable() is None
    with pytest.raises(VaegenError, match="epochs"):
        Study("compare", "fmnist", get_preset("cpu"), tmp_path).check_resumable()


def test_budget_stops_starting_runs_and_records_where(tmp_path):
    study = Study("ablation", "fmnist", get_preset("cpu", budget_minutes=0), tmp_path)
    study.started -= 1  # a second has passed: the zero budget is spent
    assert study.over_budget("dmaapx-k50-seed0")
    study.save([])
    assert json.loads((tmp_path / "study.json").read_text())["stopped_at"] == "dmaapx-k50-seed0"
    assert not Study("ablation", "fmnist", get_preset("cpu"), tmp_path).over_budget("x")


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_demo_runs_the_whole_pipeline_and_resumes_without_redoing_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vaegen", "study", "demo", "--preset", "demo", "--subset", "50",
               "--epochs", "2", "--dm-max-steps", "5", "--scales", "1 2"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    study_dir = tmp_path / "runs/studies/demo-fmnist-demo"
    assert first.stdout.strip() == str(Path("runs/studies/demo-fmnist-demo/report.md"))
    report = (study_dir / "report.md").read_text()
    for group in ("Normal", "Aug.Naive", "Aug.Tuned", "DMaaPx k=1", "DMaaPx k=2"):
        assert f"| {group} |" in report
    for png in ("elbo_curves.png", "gaps.png", "scale.png"):
        assert (study_dir / png).stat().st_size > 10_000
    for run in ("normal-seed0", "dmaapx-k2-seed0"):
        gaps = json.loads((study_dir / "runs" / run / "eval/gaps.json").read_text())
        assert {"generalization", "amortization", "robustness"} <= set(gaps)

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "$ vaegen train" not in second.stderr and "$ vaegen eval" not in second.stderr
    assert "$ vaegen dm train" not in second.stderr


def test_budget_minutes_overrides_the_preset(tmp_path, monkeypatch):
    import vaegen.studies as studies

    chosen = {}

    def record_preset(kind, dataset, preset, out, data_root, jobs):  # the CLI's job ends at choosing the preset
        chosen["preset"] = preset
        return tmp_path

    monkeypatch.setattr(studies, "run_study", record_preset)
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--budget-minutes", "45"])
    assert result.exit_code == 0, result.output
    assert chosen["preset"].budget_minutes == 45
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--budget-minutes", "-1"])
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_dm_subsets_scores_each_dm_once_and_reports_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vaegen", "study", "dm-subsets", "--preset", "demo", "--subset", "50",
               "--epochs", "2", "--dm-max-steps", "5"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (tmp_path / "runs/studies/dm-subsets-fmnist-demo/report.md").read_text()
    assert "| DMaaPx k=5, DM on 25 images |" in report and "| DMaaPx k=5 |" in report
    assert "| `runs/dm/fmnist-n25-s0-tiny` |" in report and "| `runs/dm/fmnist-n50-s0-tiny` |" in report
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "$ vaegen dm score" not in second.stderr and "$ vaegen train" not in second.stderr


def test_jobs_run_side_by_side_prefix_their_lines_and_a_failure_stops_new_starts_naming_its_command(capfd):
    from vaegen.studies import JobRunner

    runner = JobRunner(jobs=2)
    assert runner.submit("good", [["--version"]])
    assert runner.submit("bad", [["data", "svhn"], ["--version"]])  # the second command never runs
    with pytest.raises(VaegenError, match="`vaegen data svhn` failed"):
        runner.wait()
    assert not runner.submit("late", [["--version"]])  # no new starts after a failure
    err = capfd.readouterr().err
    assert "[good] vaegen, version" in err and "[bad] Error: unknown dataset 'svhn'" in err
    assert err.count("[bad] $ vaegen") == 1


def test_the_study_plans_hold_the_papers_protocols():
    from vaegen.presets import PAPER_MZ, PAPER_NC
    from vaegen.studies import overparam_sizes

    paper = get_preset("paper")
    assert len(PAPER_MZ) == 25 and PAPER_MZ[:4] == (1, 2, 4, 6) and PAPER_MZ[-2:] == (60, 64)
    assert len(PAPER_NC) == 16 and PAPER_NC[0] == 1 and PAPER_NC[-1] == 512
    assert paper.scales == (1, 2, 5, 10, 20, 50, 100, 250, 500, 750, 1000)
    assert paper.dm_subset_fractions == (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert paper.mix_fractions == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    sizes = set(overparam_sizes(paper))
    assert {(mz, 256) for mz in PAPER_MZ} <= sizes
    assert {(mz, nc) for mz in (1, 2, 8, 64) for nc in PAPER_NC} <= sizes
    trajectory = [(1, nc) for nc in PAPER_NC if nc <= 256] + [(mz, 256) for mz in PAPER_MZ] + \
        [(64, nc) for nc in PAPER_NC if nc >= 256]
    assert set(trajectory) <= sizes  # the double-descent path of figure 8


def plan(kind, tmp_path, monkeypatch, **overrides):
    """The VAE runs a study would start (nothing is run)."""
    import vaegen.studies as studies

    study = Study(kind, "fmnist", get_preset("demo", **overrides), tmp_path)
    started = []
    monkeypatch.setattr(Study, "vaegen", lambda self, *args: None)
    monkeypatch.setattr(Study, "ensure_dm", lambda self, subset=None, max_steps=None: self.dm_dir(subset, max_steps))
    monkeypatch.setattr(Study, "ensure_shards", lambda self, dm, scale: Path("shards") / dm.name)
    monkeypatch.setattr(Study, "ensure_vaes", lambda self, runs, shards, **kw: started.extend(
        (r, self.vae_commands(r, shards.get(r.name) if isinstance(shards, dict) else shards, **kw)) for r in runs))
    studies.STUDIES[kind](study)
    return started


def test_mixtures_run_each_fraction_without_and_with_aug_tuned_on_the_real_part(tmp_path, monkeypatch):
    runs = {r.name: c[0] for r, c in plan("mix", tmp_path, monkeypatch)}
    assert set(runs) == {"mix000-seed0", "mix050-seed0", "mix050-tuned-seed0", "mix100-seed0", "mix100-tuned-seed0"}
    assert runs["mix050-tuned-seed0"][runs["mix050-tuned-seed0"].index("--augment") + 1] == "tuned"
    assert "--mix-real" in runs["mix050-tuned-seed0"] and "--source" in runs["mix100-tuned-seed0"]


def test_regularizers_track_gaps_for_the_six_methods(tmp_path, monkeypatch):
    runs = {r.name: c[0] for r, c in plan("regularizers", tmp_path, monkeypatch)}
    assert set(runs) == {"normal-seed0", "normal-rha-seed0", "mollify-seed0", "dmaapx-k5-seed0",
                         "dmaapx-k5-rha-seed0", "dmaapx-k5-mollify-seed0"}
    assert all("--track-gaps" in c for c in runs.values())
    assert "--rha" in runs["dmaapx-k5-rha-seed0"] and "--mollify" in runs["mollify-seed0"]


def test_controls_and_dm_quality_plan_their_runs(tmp_path, monkeypatch):
    runs = {r.name: c[0] for r, c in plan("controls", tmp_path, monkeypatch)}
    assert "--early-stopping-split" in runs["early-stopping-seed0"]
    assert runs["weight-decay0.01-seed0"][runs["weight-decay0.01-seed0"].index("--weight-decay") + 1] == "0.01"
    quality = {r.name: r.dm for r, _ in plan("dm-quality", tmp_path / "q", monkeypatch)}
    assert quality == {"dm-steps50-seed0": "runs/dm/fmnist-n200-s0-tiny-steps50",
                       "dm-steps150-seed0": "runs/dm/fmnist-n200-s0-tiny"}  # 150 steps is the tiny preset's own


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_two_jobs_give_bit_identical_runs_to_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "vaegen", "study", "compare", "--preset", "demo", "--subset", "50",
            "--epochs", "3", "--dm-max-steps", "5"]
    for jobs in (1, 2):
        done = subprocess.run([*base, "--jobs", str(jobs), "--out", f"runs/studies/jobs{jobs}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "[normal-seed0] $ vaegen train" in done.stderr  # the 2-job run prefixed its lines
    for run in ("normal-seed0", "dmaapx-k5-seed0", "aug-naive-seed0", "aug-tuned-seed0"):
        one, two = (tmp_path / f"runs/studies/jobs{j}/runs/{run}" for j in (1, 2))
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes(), run
        gaps = [json.loads((d / "eval/gaps.json").read_text()) for d in (one, two)]
        assert [g["generalization"]["gap"] for g in gaps][0] == [g["generalization"]["gap"] for g in gaps][1]
