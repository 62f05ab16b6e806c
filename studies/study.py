"""The one skeleton every study runs on: its declared runs, each with the inputs it needs built first.

A study is a list of `VaeRun`s (studies/catalog.py declares them). First, for each run in order:

    finished (done.json and eval/gaps.json)          skip it
    the same run finished in another study           copy it here (reused.json says from where)
    otherwise: its store, its DM (trained, or the committed reference, and scored when the study reports DM
    scores), its shard set grown to the samples it needs -- each built once, in the foreground.

Then each run's train + eval is submitted to the executor (local processes or Slurm), until the time budget is
spent (the report says where it stopped). Inputs come first so that no core idles while a later run's shards are
made, and no shard set grows under a job that reads it.

Stages talk through files, exactly as when a user types the commands; every output records its own completion,
so rerunning a study skips what is finished and resumes what was interrupted. Layout of a study directory:

    <study_dir>/study.json          the preset, every run's commands, where a budget stopped the study, wall times
    <study_dir>/runs/<run>/         VAE runs (trainer output + eval/)
    <study_dir>/report.md, *.csv, *.png   written by `vaegen report`
DMs and shards are shared between studies: runs/dm/<...>/ (or the committed models/<...>/) and shards/<...>/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import click

from studies.catalog import StudyKind
from studies.jobs import Executor, RunJob
from studies.presets import FREE_FIELDS, StudyPreset, preset_from_record
from studies.runs import DMSpec, Pool, RunFactory, Store, Tracking, VaeRun
from vaegen import dmrun
from vaegen import shardformat as sf
from vaegen.errors import VaegenError
from vaegen.interrupts import Interrupted, Terminated
from vaegen.provenance import read_json, refuse_changed_settings, run_record, write_json_atomic
from vaegen.runlock import run_lock
from vaegen.vaerun import DONE_NAME, EVAL_DIR, GAPS_NAME, SNAPSHOTS

STUDY_RECORD = "study.json"
REUSED_NAME = "reused.json"
STUDIES_ROOT = Path("runs/studies")


def default_study_dir(kind: str, dataset: str, preset: str) -> Path:
    return STUDIES_ROOT / f"{kind}-{dataset}-{preset}"


def read_study_record(study_dir: Path) -> dict | None:
    path = Path(study_dir) / STUDY_RECORD
    return read_json(path) if path.is_file() else None


NOT_TRAINING = ("--out", "--report-to", "--tracker-group")  # where a run goes and who watches it


def train_key(train_args: list[str], tracking: bool = True) -> str:
    """What makes two runs the same training: its command without where it goes and who watches it (inputs are
    named by path, and a path under runs/dm, models/ or shards/ holds one thing: DMs are never retrained in place,
    shards only grow). tracking=False: also without its gap tracking, which only saves the model at its tracking
    epochs on the way (trainer/regimes.py GapTracking), so that a tracked run serves an untracked request too."""
    dropped_options = NOT_TRAINING if tracking else (*NOT_TRAINING, *Tracking.OPTIONS)
    dropped_flags = () if tracking else (Tracking.FLAG,)
    args, kept = list(train_args), []
    while args:
        arg = args.pop(0)
        if arg in dropped_options:
            args.pop(0)
        elif arg not in dropped_flags:
            kept.append(arg)
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:20]


class Study:
    """Runs one study's declared runs through `executor`, building their inputs first."""

    def __init__(self, kind: StudyKind, dataset: str, preset: StudyPreset, study_dir: Path, executor: Executor,
                 data_root: str = "data", reuse: bool = True, report_to: str = "none"):
        self.kind, self.dataset, self.preset, self.dir = kind, dataset, preset, Path(study_dir)
        self.executor, self.data_root, self.reuse, self.report_to = executor, data_root, reuse, report_to
        self.runs = kind.declare(RunFactory(dataset, preset))
        self.started = time.monotonic()
        self.stopped_at: str | None = None
        self.vae_seconds = 0.0  # wall time of this invocation's VAE phase (train + eval), prerequisites excluded
        self._built: set = set()

    def run_dir(self, run: VaeRun) -> Path:
        return self.dir / "runs" / run.name

    def job(self, run: VaeRun) -> RunJob:
        out = self.run_dir(run)
        # One tracker run per VAE run, grouped by the study (its directory's name).
        watched = ["--report-to", self.report_to, "--tracker-group", self.dir.name] if self.report_to != "none" else []
        return RunJob(run.name, str(out), tuple([*run.train_args(self.data_root, out), *watched]),
                      tuple((name, tuple(args)) for name, args in run.evaluations(out)))

    # --- the skeleton -------------------------------------------------------------------------------------
    def execute(self) -> None:
        self.check_resumable()
        self.save()
        # Every input first, then the runs: a run waiting for a later run's shards would leave its core idle, and
        # a shard set must not grow under a job that reads it.
        pending = []
        for run in self.runs:
            if not self.job(run).commands():
                continue
            if not (self.run_dir(run) / DONE_NAME).exists():
                if self.reuse_finished(run, self.job(run)):
                    if not self.job(run).commands():
                        continue
                elif self.over_budget(run.name):  # no inputs for runs the budget will not start
                    break
            self.prepare(run, train=not (self.run_dir(run) / DONE_NAME).exists())
            pending.append(run)
        started = time.monotonic()
        for run in pending:
            if not (self.run_dir(run) / DONE_NAME).exists() and self.over_budget(run.name):
                break
            if not self.executor.submit(self.job(run)):
                break
        self.executor.wait()
        self.vae_seconds += time.monotonic() - started
        self.save()

    def over_budget(self, next_run: str) -> bool:
        budget = self.preset.budget_minutes
        if budget is not None and (time.monotonic() - self.started) / 60 > budget:
            if self.stopped_at is None:
                self.stopped_at = next_run
                click.echo(f"budget of {budget} min spent: not starting {next_run}", err=True)
            return True
        return False

    # --- inputs (in the foreground, the whole machine each; built once per invocation) ----------------------
    def vaegen(self, *args) -> None:
        self.executor.run(self.kind.name, [str(a) for a in args])

    def prepare(self, run: VaeRun, train: bool) -> None:
        self.ensure_store(run.store)
        if run.pool is not None and train:
            self.ensure_dm(run.pool.dm)
            if self.kind.scores_dms:
                self.ensure_score(run.pool.dm)
            self.ensure_shards(run.pool)

    def ensure_store(self, store: Store) -> None:
        if store not in self._built:
            self.vaegen("data", store.dataset, "--data-root", self.data_root, *store.args())
            self._built.add(store)

    def ensure_dm(self, dm: DMSpec) -> None:
        reference_snapshot = dm.snapshot is not None and dmrun.is_reference(dm.run_dir)
        # A reference's retraining runs to its end: its final weights are the check that the snapshots are its.
        if not dmrun.is_trained(dm.path) or reference_snapshot and not dmrun.is_trained(dm.training_dir):
            self.train_dm(dm)
        if reference_snapshot:
            self.check_retraining(dm)

    def train_dm(self, dm: DMSpec) -> None:
        self.ensure_store(dm.store)
        out = dm.training_dir
        if dm.snapshot is not None and dmrun.is_trained(out):
            raise VaegenError(f"{out} was trained without a snapshot at step {dm.snapshot}; move it away so that "
                              "it can be trained again with --snapshot-steps (the last snapshot is the same model)")
        # Every snapshot this study needs from that training run, in one run.
        steps = sorted({r.pool.dm.snapshot for r in self.runs if r.pool and r.pool.dm.snapshot is not None
                        and r.pool.dm.training_dir == out})
        args = dm.train_args(self.data_root, steps)
        if dmrun.is_reference(dm.run_dir) and (threads := dmrun.recorded_threads(dmrun.read_record(dm.run_dir))):
            args += ["--threads", threads]
        self.vaegen(*args, *(["--resume"] if dmrun.checkpoint_dir(out).is_dir() else []))

    def check_retraining(self, dm: DMSpec) -> None:
        """A committed reference DM's snapshots come from training it again; they are its snapshots only if that
        training ends in its weights, byte for byte (same code, seed and thread count)."""
        ours, theirs = (dmrun.read_record(d) or {} for d in (dm.training_dir, dm.run_dir))
        if ours.get("weights_sha256") != theirs.get("weights_sha256"):
            ended = f"weights sha256 {ours['weights_sha256'][:12]}…" if ours else "no final model"
            raise VaegenError(f"retraining {dm.run_dir} for its snapshots ended in {ended}, not its "
                              f"{theirs.get('weights_sha256', '?')[:12]}…: {dm.training_dir} does not hold its "
                              "snapshots (was it trained at another commit or thread count than its dm.json says?)")

    def ensure_score(self, dm: DMSpec) -> None:
        """`dm score` once per DM; its feature classifier trains on the full training split, so that store too."""
        if dmrun.read_score(dm.path) is None:
            self.ensure_store(Store(self.dataset, None))
            p = self.preset
            self.vaegen("dm", "score", "--dm", dm.path, "--sampler", p.sampler, "--steps", p.sampler_steps,
                        "--n", p.score_images, "--classifier-steps", p.score_classifier_steps,
                        "--data-root", self.data_root)

    def ensure_shards(self, pool: Pool) -> None:
        """The pool's shard set grown to scale x |D_train| samples. Growing rewrites the set's last, short shard,
        so no running job may be reading it: running jobs are waited for first."""
        needed = -(-pool.scale * pool.vae_store.train_size // pool.dm.store.train_size)
        record = sf.read_generation(pool.shards) if (pool.shards / sf.GENERATION_NAME).is_file() else {}
        if record.get("complete") and record["scale"] >= needed:
            return
        self.executor.wait()
        self.vaegen("generate", "--dm", pool.dm.path, "--scale", needed, "--out", pool.shards,
                    "--sampler", pool.sampler, "--steps", pool.sampler_steps, "--data-root", self.data_root)

    # --- a finished run is never trained twice ------------------------------------------------------------
    def reuse_finished(self, run: VaeRun, job: RunJob) -> bool:
        """Copy the same run, finished in another study directory, instead of training it again."""
        out = self.run_dir(run)
        if not self.reuse or out.exists():
            return False
        key = train_key(list(job.train))
        untracked = key == train_key(list(job.train), tracking=False)
        for study_dir in sorted(p for p in self.dir.parent.iterdir() if p.is_dir() and p != self.dir):
            record = read_study_record(study_dir) or {}
            for other in record.get("runs", []):
                source = study_dir / "runs" / other.get("name", "")
                same = other.get("train_key") == key or (
                    untracked and train_key(other.get("train", []), tracking=False) == key)
                if same and (source / DONE_NAME).exists():
                    self.copy_run(source, out, same_eval=other.get("eval") == list(job.evals[0][1][2:]), key=key,
                                  snapshots=not untracked)
                    click.echo(f"[{run.name}] reused {source} (the same training, finished)", err=True)
                    return True
        return False

    @staticmethod
    def copy_run(source: Path, out: Path, same_eval: bool, key: str, snapshots: bool) -> None:
        with run_lock(out):
            tmp = out.with_name(f".{out.name}.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            keep_eval = same_eval and (source / EVAL_DIR / GAPS_NAME).exists()
            # A tracked run's snapshots (tens of MB) serve only gap curves, which an untracked request has none of.
            skip = (*(() if keep_eval else (EVAL_DIR,)), *(() if snapshots else (SNAPSHOTS,)))
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*skip))
            write_json_atomic(tmp / REUSED_NAME, run_record(reused_from=str(source), train_key=key,
                                                            evaluation_reused=keep_eval))
            tmp.rename(out)

    # --- study.json -----------------------------------------------------------------------------------------
    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        runs = []
        for run in self.runs:
            job = self.job(run)
            runs.append({"name": run.name, "train_key": train_key(list(job.train)), "train": list(job.train),
                         "eval": list(job.evals[0][1][2:]), "more_evals": [list(a) for _, a in job.evals[1:]]})
        dms = {}
        for run in self.runs:
            if run.pool and (record := dmrun.read_record(run.pool.dm.path)):
                dms[str(run.pool.dm.path)] = record.get("weights_sha256")
        write_json_atomic(self.dir / STUDY_RECORD, run_record(
            study=self.kind.name, dataset=self.dataset, preset=dataclasses.asdict(self.preset),
            executor=describe(self.executor), runs=runs, dms=dms, stopped_at=self.stopped_at,
            minutes=round((time.monotonic() - self.started) / 60, 2), vae_minutes=round(self.vae_seconds / 60, 2)))

    def check_resumable(self) -> None:
        """A study directory belongs to one study, dataset and preset (seeds, grids and the budget may change on
        a rerun): finished runs would otherwise be silently reused under other settings."""
        old = read_study_record(self.dir)
        if old is None:
            return
        if (old.get("study"), old.get("dataset")) != (self.kind.name, self.dataset):
            raise VaegenError(f"{self.dir} holds the {old.get('study')} study of {old.get('dataset')}; choose "
                              "another --out")
        refuse_changed_settings(dataclasses.asdict(preset_from_record(old.get("preset", {}))),
                                dataclasses.asdict(self.preset), FREE_FIELDS, where=f"the study in {self.dir}",
                                hint="choose another --out")


def describe(executor: Executor) -> dict:
    return {"kind": type(executor).__name__, "jobs": getattr(executor, "jobs", None)}


def run_study(kind: StudyKind, dataset: str, preset: StudyPreset, out: str | None, executor: Executor,
              data_root: str = "data", reuse: bool = True, report_to: str = "none") -> Path:
    """Run (or resume) a study, then write its report; returns the study directory."""
    study_dir = Path(out) if out else default_study_dir(kind.name, dataset, preset.name)
    study = Study(kind, dataset, preset, study_dir, executor, data_root, reuse, report_to)
    with run_lock(study_dir):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        received = []

        def pass_on(signum, frame):
            # Only pass the signal on: the executor sees its commands stop and ends the study (Terminated). The
            # handler must not wait for them itself: it may have interrupted the very wait() on a command in
            # the foreground, whose lock it would then wait on until a timeout.
            received.append(signum)
            executor.forward(signum)

        for s in previous:
            signal.signal(s, pass_on)
        try:
            study.execute()
        except Terminated:
            if not received:
                raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if received:
            raise Interrupted(received[0], "the running stage commands stopped cleanly; rerun the same study "
                                           "command to resume")
        study.vaegen("report", study_dir)
    return study_dir
