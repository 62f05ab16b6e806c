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

    def record_preset(kind, dataset, preset, out, data_root):  # the CLI's job ends at choosing the preset
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
