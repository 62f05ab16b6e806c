"""Studies: short declarations on one skeleton that builds each run's inputs, skips finished work, reuses runs
finished elsewhere, and ends in a report."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from studies.catalog import STUDIES, overparam_sizes
from studies.cli import main
from studies.jobs import LocalExecutor, RunJob
from studies.presets import PAPER_MZ, PAPER_NC, get_study_preset
from studies.runs import RunFactory
from studies.study import Study
from vaegen.data import DEBIAN_FMNIST_DIR
from vaegen.errors import VaegenError

REPO = Path(__file__).resolve().parent.parent
needs_fmnist = pytest.mark.skipif(not Path(DEBIAN_FMNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")


class RecordingExecutor:
    """An executor that runs nothing: it records the prerequisites and jobs a study would start."""

    jobs = 1

    def __init__(self):
        self.commands, self.jobs_submitted, self.events = [], [], []

    def run(self, label, args):
        self.commands.append(args)
        self.events.append(("input", args[0]))

    def submit(self, job):
        self.jobs_submitted.append(job)
        self.events.append(("run", job.label))
        return True

    def wait(self):
        pass

    def forward(self, signum):
        pass


def declared(kind: str, **overrides):
    """{run name: its `vaegen train` arguments} of a study on the smoke preset."""
    runs = STUDIES[kind].declare(RunFactory("fmnist", get_study_preset("smoke", **overrides)))
    return {r.name: r.train_args("data", Path("out")) for r in runs}, {r.name: r for r in runs}


def test_bad_scales_are_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "smoke", "--scales", "1 two",
                                       "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--scales" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "smoke", "--scales", "0 1",
                                       "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and ">= 1" in result.output


def test_a_study_directory_refuses_another_study_or_other_settings(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"study": "compare", "dataset": "fmnist",
                                                     "preset": {"name": "cpu"}}))
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "holds the compare study" in result.output

    executor = RecordingExecutor()
    Study(STUDIES["compare"], "fmnist", get_study_preset("cpu", epochs=300), tmp_path, executor).save()
    more_seeds = Study(STUDIES["compare"], "fmnist", get_study_preset("cpu", epochs=300, seeds=(0, 1)), tmp_path,
                       executor)
    assert more_seeds.check_resumable() is None
    with pytest.raises(VaegenError, match="epochs: 300 -> 500"):
        Study(STUDIES["compare"], "fmnist", get_study_preset("cpu"), tmp_path, executor).check_resumable()
    with pytest.raises(VaegenError, match="sigma"):
        Study(STUDIES["compare"], "fmnist", get_study_preset("cpu", epochs=300, sigma=0.2), tmp_path,
              executor).check_resumable()


def test_an_old_study_record_without_newer_settings_resumes(tmp_path):
    """A study.json written before a preset field existed (here: sigma) resumes under the preset's default."""
    (tmp_path / "study.json").write_text(json.dumps({"study": "compare", "dataset": "fmnist", "preset": {
        "name": "cpu", "epochs": 500, "eval_args": ["--amortization-images", "200"]}}))
    Study(STUDIES["compare"], "fmnist", get_study_preset("cpu"), tmp_path, RecordingExecutor()).check_resumable()


def test_budget_stops_starting_runs_and_records_where(tmp_path):
    study = Study(STUDIES["ablation"], "fmnist", get_study_preset("cpu", budget_minutes=0), tmp_path,
                  RecordingExecutor())
    study.started -= 1  # a second has passed: the zero budget is spent
    assert study.over_budget("dmaapx-k50-seed0")
    study.save()
    assert json.loads((tmp_path / "study.json").read_text())["stopped_at"] == "dmaapx-k50-seed0"
    assert not Study(STUDIES["ablation"], "fmnist", get_study_preset("cpu"), tmp_path,
                     RecordingExecutor()).over_budget("x")


def test_a_spent_budget_builds_no_inputs_for_the_runs_it_will_not_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    executor = RecordingExecutor()
    study = Study(STUDIES["compare"], "fmnist", get_study_preset("smoke", budget_minutes=0), tmp_path / "s", executor)
    study.started -= 1
    study.execute()
    assert not executor.commands and not executor.jobs_submitted
    assert study.stopped_at == study.runs[0].name


def test_budget_minutes_and_sigma_override_the_preset(tmp_path, monkeypatch):
    import studies.study

    chosen = {}

    def record(kind, dataset, preset, out, executor, data_root, reuse, report_to):  # the CLI's job ends here
        chosen.update(preset=preset, executor=executor, reuse=reuse, report_to=report_to)
        return tmp_path

    monkeypatch.setattr(studies.study, "run_study", record)
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--budget-minutes", "45",
                                       "--sigma", "0.05", "--jobs", "3", "--no-reuse"])
    assert result.exit_code == 0, result.output
    assert (chosen["preset"].budget_minutes, chosen["preset"].sigma) == (45, 0.05)
    assert chosen["executor"].jobs == 3 and chosen["reuse"] is False
    if __import__("shutil").which("sbatch") is None:  # without Slurm, --executor slurm is one line, exit 2
        result = CliRunner().invoke(main, ["study", "ablation", "--executor", "slurm", "--out", str(tmp_path / "s")])
        assert result.exit_code == 2 and "sbatch" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["study", "ablation", "--preset", "cpu", "--budget-minutes", "-1"])
    assert result.exit_code == 2


def test_every_study_is_a_declaration_of_typed_runs_with_unique_names():
    for kind in STUDIES.values():
        runs = kind.declare(RunFactory("fmnist", get_study_preset("smoke")))
        assert runs and len({r.name for r in runs}) == len(runs), kind.name
        assert kind.help, kind.name


def test_mixtures_run_each_fraction_without_and_with_aug_tuned_on_the_real_part():
    runs, _ = declared("mix")
    assert set(runs) == {"mix000-seed0", "mix050-seed0", "mix050-tuned-seed0", "mix100-seed0", "mix100-tuned-seed0"}
    assert runs["mix050-tuned-seed0"][runs["mix050-tuned-seed0"].index("--augment") + 1] == "tuned"
    assert "--mix-real" in runs["mix050-tuned-seed0"] and "--source" in runs["mix100-tuned-seed0"]


def test_regularizers_track_gaps_for_every_arm_including_both_augmentations():
    runs, _ = declared("regularizers")
    assert set(runs) == {"normal-seed0", "normal-rha-seed0", "mollify-seed0", "dmaapx-k5-seed0",
                         "dmaapx-k5-rha-seed0", "dmaapx-k5-mollify-seed0", "aug-naive-seed0", "aug-tuned-seed0"}
    assert all("--track-gaps" in c for c in runs.values())
    assert "--rha" in runs["dmaapx-k5-rha-seed0"] and "--mollify" in runs["mollify-seed0"]


def test_controls_and_dm_quality_plan_their_runs():
    runs, _ = declared("controls")
    assert "--early-stopping-split" in runs["early-stopping-seed0"]
    assert runs["weight-decay0.01-seed0"][runs["weight-decay0.01-seed0"].index("--weight-decay") + 1] == "0.01"
    _, quality = declared("dm-quality")
    # graded DMs are snapshots of one training run; the last is the run's own model
    assert {name: str(r.pool.dm.path) for name, r in quality.items()} == {
        "dm-steps50-seed0": "runs/dm/fmnist-n200-s0-tiny/snapshots/step-00000050",
        "dm-steps150-seed0": "runs/dm/fmnist-n200-s0-tiny"}


def test_real_vs_synthetic_draws_k_times_n_real_images_at_n_images_per_epoch():
    runs, _ = declared("real-vs-synthetic", scales=(1, 2))
    assert set(runs) == {"real-k1-seed0", "real-k2-seed0", "dmaapx-k1-seed0", "dmaapx-k2-seed0"}
    real = runs["real-k2-seed0"]
    assert real[real.index("--subset") + 1] == "400" and real[real.index("--epoch-size") + 1] == "200"
    assert runs["real-k1-seed0"] == declared("compare")[0]["normal-seed0"]  # reused from Normal, never retrained


def test_the_study_plans_hold_the_papers_protocols():
    paper = get_study_preset("paper")
    assert len(PAPER_MZ) == 25 and PAPER_MZ[:4] == (1, 2, 4, 6) and PAPER_MZ[-2:] == (60, 64)
    assert len(PAPER_NC) == 16 and PAPER_NC[0] == 1 and PAPER_NC[-1] == 512
    assert paper.scales == (1, 2, 5, 10, 20, 50, 100, 250, 500, 750, 1000)
    assert paper.compare_scale == paper.epochs  # Table 7: T x N unique samples (Alg. 2)
    assert paper.dm_subset_fractions == (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert paper.mix_fractions == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    sizes = set(overparam_sizes(paper))
    assert {(mz, 256) for mz in PAPER_MZ} <= sizes
    assert {(mz, nc) for mz in (1, 2, 8, 64) for nc in PAPER_NC} <= sizes
    trajectory = [(1, nc) for nc in PAPER_NC if nc <= 256] + [(mz, 256) for mz in PAPER_MZ] + \
        [(64, nc) for nc in PAPER_NC if nc >= 256]
    assert set(trajectory) <= sizes  # the double-descent path of figure 8


def test_a_study_uses_the_committed_reference_dm_and_trains_none(tmp_path, monkeypatch, support):
    import vaegen.dmrun as dmrun

    monkeypatch.chdir(tmp_path)
    reference = tmp_path / "models" / "fmnist-n200-s0-tiny"
    support.dm(reference)
    (reference / "dm.json").write_text(json.dumps({"dataset": "fmnist", "subset": 200, "subset_seed": 0,
                                                   "finished": True, "weights_sha256": "ab" * 32}))
    monkeypatch.setattr(dmrun, "REFERENCE_ROOT", tmp_path / "models")
    executor = RecordingExecutor()
    study = Study(STUDIES["compare"], "fmnist", get_study_preset("smoke"), tmp_path / "study", executor)
    study.execute()
    assert not any(c[:2] == ["dm", "train"] for c in executor.commands)
    generate = next(c for c in executor.commands if c[0] == "generate")
    assert generate[generate.index("--dm") + 1] == "models/fmnist-n200-s0-tiny"
    assert json.loads((tmp_path / "study" / "study.json").read_text())["dms"] == {
        "models/fmnist-n200-s0-tiny": "ab" * 32}
    assert len(executor.jobs_submitted) == 4


class DMTrainingExecutor(RecordingExecutor):
    """Runs nothing but `dm train`, which it answers with the records a real run leaves: dm.json (with
    `weights_sha256`) and one snapshot directory per --snapshot-steps."""

    def __init__(self, sha="ab" * 32):
        super().__init__()
        self.sha = sha

    def run(self, label, args):
        super().run(label, args)
        if args[:2] == ["dm", "train"]:
            out = Path(args[args.index("--out") + 1])
            steps = args[args.index("--snapshot-steps") + 1].split(",") if "--snapshot-steps" in args else []
            for step in steps:
                snap = out / "snapshots" / f"step-{int(step):08d}"
                snap.mkdir(parents=True)
                (snap / "dm.json").write_text(json.dumps({"finished": False, "snapshot_of": str(out)}))
            (out / "dm.json").write_text(json.dumps({"finished": True, "weights_sha256": self.sha}))


def test_graded_dms_train_one_run_once_and_are_found_on_the_rerun(tmp_path, monkeypatch):
    """A snapshot's dm.json says `finished: false` (its run went on); it is still a model ready to sample."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        executor = DMTrainingExecutor()
        Study(STUDIES["dm-quality"], "fmnist", get_study_preset("smoke"), tmp_path / "study", executor).execute()
        assert len(executor.jobs_submitted) == 2
    trainings = [c for c in executor.commands if c[:2] == ["dm", "train"]]
    assert trainings == []  # the rerun found every graded DM


@pytest.mark.parametrize("retrained_sha", ["ab" * 32, "cd" * 32])
def test_a_committed_reference_dm_is_retrained_beside_it_for_its_snapshots_and_checked(tmp_path, monkeypatch,
                                                                                     support, retrained_sha):
    import vaegen.dmrun as dmrun

    monkeypatch.chdir(tmp_path)
    reference = tmp_path / "models" / "fmnist-n200-s0-tiny"
    support.dm(reference)
    (reference / "dm.json").write_text(json.dumps({
        "dataset": "fmnist", "subset": 200, "subset_seed": 0, "finished": True, "weights_sha256": "ab" * 32,
        "command": "vaegen dm train --dataset fmnist --preset tiny --threads 1"}))
    monkeypatch.setattr(dmrun, "REFERENCE_ROOT", tmp_path / "models")
    executor = DMTrainingExecutor(retrained_sha)
    study = Study(STUDIES["dm-quality"], "fmnist", get_study_preset("smoke"), tmp_path / "study", executor)
    if retrained_sha != "ab" * 32:
        with pytest.raises(VaegenError, match="does not hold its snapshots"):
            study.execute()
        assert executor.jobs_submitted == []
        return
    study.execute()
    [train] = [c for c in executor.commands if c[:2] == ["dm", "train"]]
    assert train[train.index("--out") + 1] == "runs/dm/fmnist-n200-s0-tiny-retrained"
    assert train[train.index("--threads") + 1] == "1" and train[train.index("--snapshot-steps") + 1] == "50"
    dms = {c[c.index("--dm") + 1] for c in executor.commands if c[0] == "generate"}
    assert dms == {"models/fmnist-n200-s0-tiny", "runs/dm/fmnist-n200-s0-tiny-retrained/snapshots/step-00000050"}
    assert not Path("runs/dm/fmnist-n200-s0-tiny").exists()  # every other study still finds the committed DM


def test_a_study_builds_every_input_before_its_first_run_starts(tmp_path, monkeypatch):
    """Otherwise a run whose shards are not made yet waits for the running ones, and a core idles meanwhile."""
    monkeypatch.chdir(tmp_path)
    executor = RecordingExecutor()
    Study(STUDIES["robustness"], "fmnist", get_study_preset("smoke"), tmp_path / "study", executor).execute()
    kinds = [kind for kind, _ in executor.events]
    assert kinds.count("run") == len(executor.jobs_submitted) > 0
    assert "generate" in [name for kind, name in executor.events if kind == "input"]
    assert "input" not in kinds[kinds.index("run"):]


def test_a_run_finished_in_another_study_is_copied_not_retrained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    executor = RecordingExecutor()
    first = Study(STUDIES["compare"], "fmnist", get_study_preset("smoke"), Path("runs/studies/a"), executor)
    first.save()
    normal = next(r for r in first.runs if r.name == "normal-seed0")
    done = first.run_dir(normal)
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"weights")
    (done / "done.json").write_text("{}")
    second = Study(STUDIES["controls"], "fmnist", get_study_preset("smoke"), Path("runs/studies/b"), executor)
    second.execute()
    copied = Path("runs/studies/b/runs/normal-seed0")
    assert (copied / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((copied / "reused.json").read_text())["reused_from"] == str(done)
    trained = [job.label for job in executor.jobs_submitted]
    assert trained.count("normal-seed0") == 1  # only its evaluation (compare evaluates with --probes)
    job = next(j for j in executor.jobs_submitted if j.label == "normal-seed0")
    assert [c[0] for c in job.commands()] == ["eval"]


def test_jobs_run_side_by_side_prefix_their_lines_and_a_failure_stops_new_starts_naming_its_command(tmp_path, capfd):
    runner = LocalExecutor(jobs=2)
    assert runner.submit(RunJob("good", str(tmp_path / "good"), ("--version",), (("eval", ("--version",)),)))
    assert runner.submit(RunJob("bad", str(tmp_path / "bad"), ("data", "svhn"), (("eval", ("--version",)),)))
    with pytest.raises(VaegenError, match="`vaegen data svhn` failed"):
        runner.wait()
    assert not runner.submit(RunJob("late", str(tmp_path / "late"), ("--version",), ()))
    err = capfd.readouterr().err
    assert "[good] vaegen, version" in err and "[bad] Error: unknown dataset 'svhn'" in err
    assert err.count("[bad] $ vaegen") == 1  # the eval after the failed train never ran


def test_runs_spread_over_gpus_before_they_share_one(monkeypatch):
    import studies.jobs as jobs

    monkeypatch.setattr(jobs, "visible_gpus", lambda: [0, 1])
    executor = LocalExecutor(jobs=4, runs_per_gpu=2)
    assert executor.free_gpus == [0, 1, 0, 1]
    assert executor.env(0, parallel=True)["CUDA_VISIBLE_DEVICES"] == "0"
    assert jobs.default_jobs(runs_per_gpu=3) == 6


def test_a_job_resumes_a_started_run_and_skips_a_finished_one(tmp_path):
    job = RunJob("r", str(tmp_path / "r"), ("train", "--out", str(tmp_path / "r")),
                 (("eval", ("eval", str(tmp_path / "r"))), ("eval-kuzina", ("eval", str(tmp_path / "r"), "--eval-dir",
                                                                           "eval-kuzina"))))
    assert [c[-1] for c in job.commands()] == [str(tmp_path / "r"), str(tmp_path / "r"), "eval-kuzina"]
    (tmp_path / "r").mkdir()
    assert job.commands()[0][-1] == "--resume"
    (tmp_path / "r" / "done.json").write_text("{}")
    (tmp_path / "r" / "eval").mkdir()
    (tmp_path / "r" / "eval" / "gaps.json").write_text("{}")
    assert [c[-1] for c in job.commands()] == ["eval-kuzina"]
    (tmp_path / "r" / "eval-kuzina").mkdir()
    (tmp_path / "r" / "eval-kuzina" / "gaps.json").write_text("{}")
    assert job.commands() == []


@pytest.mark.slow
@needs_fmnist
def test_demo_runs_the_whole_pipeline_and_resumes_without_redoing_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vaegen", "study", "demo", "--preset", "smoke", "--subset", "50",
               "--epochs", "2", "--dm-max-steps", "5", "--scales", "1 2"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    study_dir = tmp_path / "runs/studies/demo-fmnist-smoke"
    assert first.stdout.strip() == str(Path("runs/studies/demo-fmnist-smoke/report.md"))
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


@pytest.mark.slow
@needs_fmnist
def test_dm_subsets_scores_each_dm_once_and_reports_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "vaegen", "study", "dm-subsets", "--preset", "smoke", "--subset", "50",
               "--epochs", "2", "--dm-max-steps", "5"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (tmp_path / "runs/studies/dm-subsets-fmnist-smoke/report.md").read_text()
    assert "| DMaaPx k=5, DM on 25 images |" in report and "| DMaaPx k=5 |" in report
    assert "| `runs/dm/fmnist-n25-s0-tiny-steps5` |" in report and "| `runs/dm/fmnist-n50-s0-tiny-steps5` |" in report
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "$ vaegen dm score" not in second.stderr and "$ vaegen train" not in second.stderr


@pytest.mark.slow
@needs_fmnist
def test_sigterm_during_an_input_stops_the_study_as_soon_as_the_input_has_saved_its_checkpoint(tmp_path):
    """The study passes the signal on and returns once the command stops: before, its handler waited on the very
    command its main thread was waiting on, and hung for ten minutes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    study = subprocess.Popen([sys.executable, "-m", "vaegen", "study", "dm-subsets", "--preset", "smoke", "--subset",
                              "50", "--dm-max-steps", "100000"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    log = tmp_path / "runs/dm/fmnist-n25-s0-tiny-steps100000/train_log.jsonl"
    deadline = time.monotonic() + 300
    while not log.is_file() and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.is_file(), "the DM training never started"
    study.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        _, err = study.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(study.pid, signal.SIGKILL)
        pytest.fail("the study did not stop within 90 s of SIGTERM")
    assert time.monotonic() - started < 60 and study.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM: checkpoint saved at step" in err  # the DM training stopped cleanly
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM: the running stage commands stopped cleanly")


@pytest.mark.slow
@needs_fmnist
def test_a_committed_reference_dms_snapshots_come_from_a_retraining_that_ends_in_its_weights(tmp_path, monkeypatch):
    """The real retraining: `dm train` again at the reference's recorded thread count, byte for byte the same."""
    import vaegen.dmrun as dmrun

    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path / "models" / "fmnist-n50-s0-tiny-steps6"
    subprocess.run([sys.executable, "-m", "vaegen", "data", "fmnist", "--subset", "50", "--subset-seed", "0"], env=env,
                   check=True, capture_output=True)
    trained = subprocess.run([sys.executable, "-m", "vaegen", "dm", "train", "--dataset", "fmnist", "--subset", "50",
                              "--subset-seed", "0", "--preset", "tiny", "--max-steps", "6", "--threads", "1",
                              "--out", str(reference)], env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    monkeypatch.setattr(dmrun, "REFERENCE_ROOT", tmp_path / "models")
    preset = get_study_preset("smoke", subset=50, epochs=2, dm_max_steps=6, dm_quality_steps=(3,))
    study = Study(STUDIES["dm-quality"], "fmnist", preset, tmp_path / "study", LocalExecutor(jobs=1))
    graded = next(r.pool.dm for r in study.runs if r.pool.dm.snapshot == 3)
    study.ensure_dm(graded)  # the study's own step: train, then check
    retrained = tmp_path / "runs/dm/fmnist-n50-s0-tiny-steps6-retrained"
    weights = "diffusion_pytorch_model.safetensors"
    assert (retrained / weights).read_bytes() == (reference / weights).read_bytes()
    assert graded.path == Path("runs/dm/fmnist-n50-s0-tiny-steps6-retrained/snapshots/step-00000003")
    assert (graded.path / weights).is_file()
    assert not (tmp_path / "runs/dm/fmnist-n50-s0-tiny-steps6").exists()  # others still find the committed DM


@pytest.mark.slow
@needs_fmnist
def test_two_jobs_give_bit_identical_runs_to_one_and_a_reused_run_is_the_retrained_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "vaegen", "study", "compare", "--preset", "smoke", "--subset", "50",
            "--epochs", "3", "--dm-max-steps", "5"]
    for jobs in (1, 2):
        done = subprocess.run([*base, "--jobs", str(jobs), "--no-reuse", "--out", f"runs/studies/jobs{jobs}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "[normal-seed0] $ vaegen train" in done.stderr  # the 2-job run prefixed its lines
    for run in ("normal-seed0", "dmaapx-k5-seed0", "aug-naive-seed0", "aug-tuned-seed0"):
        one, two = (tmp_path / f"runs/studies/jobs{j}/runs/{run}" for j in (1, 2))
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes(), run
        gaps = [json.loads((d / "eval/gaps.json").read_text()) for d in (one, two)]
        assert gaps[0]["generalization"]["gap"] == gaps[1]["generalization"]["gap"]
    # controls holds compare's Normal and DMaaPx runs: copied from jobs1, and equal to jobs2's own training
    controls = subprocess.run([sys.executable, "-m", "vaegen", "study", "controls", "--preset", "smoke", "--subset",
                               "50", "--epochs", "3", "--dm-max-steps", "5"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
    assert controls.returncode == 0, controls.stderr[-3000:]
    for run in ("normal-seed0", "dmaapx-k5-seed0"):
        reused = tmp_path / "runs/studies/controls-fmnist-smoke/runs" / run
        assert json.loads((reused / "reused.json").read_text())["reused_from"].endswith(f"jobs1/runs/{run}")
        assert (reused / "model.safetensors").read_bytes() == \
            (tmp_path / f"runs/studies/jobs2/runs/{run}/model.safetensors").read_bytes()
        assert f"--out runs/studies/controls-fmnist-smoke/runs/{run} " not in controls.stderr.replace("\n", " ")


def test_the_demo_uses_the_committed_reference_dm_whose_weights_match_their_sha256(monkeypatch):
    from vaegen import dmrun
    from vaegen.provenance import sha256_file

    monkeypatch.chdir(REPO)
    preset = get_study_preset("demo")
    dm = RunFactory("fmnist", preset).dm()
    assert dm.path == Path("models/fmnist-n1000-s0-small") and dmrun.is_trained(dm.path)
    record = dmrun.read_record(dm.path)
    assert sha256_file(dm.path / dmrun.WEIGHTS_NAME) == record["weights_sha256"]
    assert record["steps"] == 2800 and record["subset"] == preset.subset == 1000
    assert dmrun.read_score(dm.path)["samples"]["fd"] < 10  # scored, and a usable DM
    executor = RecordingExecutor()
    Study(STUDIES["demo"], "fmnist", preset, Path("/nonexistent/demo"), executor).prepare(
        STUDIES["demo"].declare(RunFactory("fmnist", preset))[-1], train=True)
    assert not any(c[:2] == ["dm", "train"] for c in executor.commands)


def test_the_robustness_study_measures_g_r_by_both_protocols_and_shares_its_default_sigma_runs_with_compare():
    from studies.study import train_key

    preset = get_study_preset("cpu")
    runs = {r.name: r for r in STUDIES["robustness"].declare(RunFactory("fmnist", preset))}
    compare = {r.name: r for r in STUDIES["compare"].declare(RunFactory("fmnist", preset))}
    out = Path("o")
    for name in ("normal-seed1", "dmaapx-k10-seed2", "aug-tuned-seed0"):  # the same training: reused, not rerun
        assert train_key(runs[f"sigma0.1-{name}"].train_args("data", out)) == \
            train_key(compare[name].train_args("data", out))
    assert runs["sigma0.05-normal-seed0"].train_args("data", out)[-2:] == ["--sigma", "0.05"]
    assert "sigma0.2-aug-naive-seed1" not in runs  # the other sigmas at one seed
    assert "--augment-output" in runs["sigma0.1-aug-naive-float-seed2"].train_args("data", out)
    assert "dpm-solver++7" in str(runs["sigma0.1-dmaapx-k10-dpmsolver7-seed0"].pool.shards)
    assert runs["calibrated-normal-seed0"].train_args("data", out)[-2:] == ["--likelihood", "gaussian-calibrated"]
    for run in runs.values():
        (_, main), (kuzina_dir, kuzina) = run.evaluations(out)
        assert kuzina_dir == "eval-kuzina" and kuzina[kuzina.index("--robustness-protocol") + 1] == "kuzina"
        assert kuzina[kuzina.index("--gaps") + 1] == "robustness" and kuzina[kuzina.index("--iwae-k") + 1] == "0"


def finish(study: Study, name: str, snapshots: bool = False) -> Path:
    """A finished run of `study` as the trainer and evaluator leave it (weights, done.json, eval/), + study.json."""
    run = study.run_dir(next(r for r in study.runs if r.name == name))
    (run / "eval").mkdir(parents=True)
    (run / "eval/gaps.json").write_text("{}")
    (run / "model.safetensors").write_bytes(name.encode())
    (run / "done.json").write_text("{}")
    if snapshots:
        (run / "snapshots").mkdir()
        (run / "snapshots/epoch-000050.safetensors").write_bytes(b"snapshot")
    study.save()
    return run


def test_a_tracked_run_serves_an_untracked_request_but_not_the_other_way_round(tmp_path):
    def study(kind, name):
        return Study(STUDIES[kind], "fmnist", get_study_preset("smoke"), tmp_path / name, RecordingExecutor())

    def reuse(s, name):
        run = next(r for r in s.runs if r.name == name)
        return s.reuse_finished(run, s.job(run)), s.run_dir(run)

    finish(study("compare", "compare-a"), "normal-seed0")
    regularizers = study("regularizers", "regularizers-b")
    assert reuse(regularizers, "normal-seed0") == (False, regularizers.run_dir(regularizers.runs[0]))  # no curves
    tracked = finish(regularizers, "normal-seed0", snapshots=True)
    shutil.rmtree(tmp_path / "compare-a")
    reused, out = reuse(study("compare", "compare-c"), "normal-seed0")
    assert reused and (out / "model.safetensors").read_bytes() == b"normal-seed0"
    assert json.loads((out / "reused.json").read_text())["reused_from"] == str(tracked)
    assert not (out / "snapshots").exists()  # the curves' snapshots stay
    reused, out = reuse(study("regularizers", "regularizers-d"), "normal-seed0")
    assert reused and (out / "snapshots/epoch-000050.safetensors").is_file()  # a tracked copy keeps them


def test_a_studys_runs_report_to_one_tracker_run_each_grouped_by_the_study_and_still_match_for_reuse(tmp_path):
    from studies.study import train_key

    watched = Study(STUDIES["compare"], "fmnist", get_study_preset("smoke"), tmp_path / "compare-x",
                    RecordingExecutor(), report_to="tensorboard")
    plain = Study(STUDIES["compare"], "fmnist", get_study_preset("smoke"), tmp_path / "other", RecordingExecutor())
    job = watched.job(watched.runs[0])
    assert job.train[-4:] == ("--report-to", "tensorboard", "--tracker-group", "compare-x")
    assert train_key(list(job.train)) == train_key(list(plain.job(plain.runs[0]).train))
