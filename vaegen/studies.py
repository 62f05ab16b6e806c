"""The paper's comparisons and ablations, and the studies it leaves open, as resumable one-command experiments.

A study only chains the stage commands (`vaegen data`, `dm train`, `dm score`, `generate`, `train`, `eval`,
`report`) as subprocesses: stages talk through files, exactly as when a user types the commands. Every run
directory records its own completion (dm.json, shard markers, done.json, eval/gaps.json), so rerunning a study
skips what is finished and resumes what was interrupted. Layout of a study directory:

    <study_dir>/study.json          the preset, the planned runs, where a budget stopped the study
    <study_dir>/runs/<run>/         VAE runs (trainer output + eval/)
    <study_dir>/report.md, *.csv, *.png   written by `vaegen report`
The diffusion models and shards are shared between studies: runs/dm/<...>/ and shards/<...>/.

Jobs. The prerequisites of a study (stores, DMs, their scores, shards) run one after another, each using the
whole machine; the VAE runs (train, then eval) are independent and run `--jobs` at a time, each with its share of
the CPU threads, or its own GPU (CUDA_VISIBLE_DEVICES) where there are GPUs. Their output lines are prefixed
with the run's name. A failed run stops new starts (the running ones finish) and the study exits naming the
command that failed. Ctrl-C / SIGTERM are passed on to every running command, which stops cleanly; the study
then exits 130 / 143 and the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from vaegen.errors import VaegenError
from vaegen.interrupts import Interrupted, Terminated
from vaegen.options import CONTEXT
from vaegen.presets import FREE_FIELDS, StudyPreset, get_preset
from vaegen.provenance import read_json, run_record, write_json_atomic
from vaegen.runlock import run_lock
from vaegen.vaerun import DONE_NAME, EVAL_DIR, GAPS_NAME


@dataclass(frozen=True)
class VaeRun:
    """One VAE training run of a study; `name` is its directory under <study_dir>/runs/."""

    name: str
    source: str                   # "shards" | "real"
    seed: int
    scale: int | None = None      # DMaaPx pool size in multiples of |D_train|
    augment: str | None = None    # "naive" | "tuned"
    mix_real: float | None = None
    dm: str | None = None         # the DM whose shards feed this run
    mz: int | None = None
    nc: int | None = None
    subset: int | None = None     # D_train of this run when it is not the preset's (real-vs-synthetic: k*N)
    extra: tuple[str, ...] = ()   # further `vaegen train` options (--rha, --mollify, --weight-decay, ...)
    eval_extra: tuple[str, ...] = ()


# --- running stage commands, in parallel where they are independent ---------------------------------------

def default_jobs(threads_per_job: int = 1) -> int:
    """One job per GPU where there are GPUs, else one per `threads_per_job` CPU cores."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, (os.cpu_count() or 1) // threads_per_job)


class JobRunner:
    """Runs lists of stage commands (one list = one job, its commands in order), `jobs` lists at a time."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.gpus = self._gpus()
        self.running: dict[str, subprocess.Popen] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(jobs)
        self.free_gpus = list(range(len(self.gpus)))
        self.threads: list[threading.Thread] = []

    @staticmethod
    def _gpus() -> list[int]:
        try:
            import torch

            return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        except ImportError:
            return []

    def env(self, gpu: int | None, parallel: bool) -> dict:
        """A job's environment: its share of the CPU threads and its own GPU; prerequisites get the machine."""
        env = dict(os.environ)
        if parallel and self.jobs > 1:
            threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TQDM_MININTERVAL="30")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[gpu])
        return env

    def run(self, label: str, commands: list[list[str]]) -> None:
        """Run `commands` in the foreground (prerequisites): the whole machine, no prefix."""
        for args in commands:
            self._execute(label, args, None, prefix=False)

    def submit(self, label: str, commands: list[list[str]]) -> bool:
        """Start a job when a slot is free; False (nothing started) once a job has failed."""
        self.slots.acquire()
        if self.failed is not None:
            self.slots.release()
            return False
        with self.lock:
            gpu = self.free_gpus.pop(0) if self.free_gpus else None
        thread = threading.Thread(target=self._job, args=(label, commands, gpu), daemon=True)
        self.threads.append(thread)
        thread.start()
        return True

    def _job(self, label, commands, gpu):
        try:
            for args in commands:
                if self.failed is not None or not self._execute(label, args, gpu, prefix=self.jobs > 1):
                    break
        finally:
            with self.lock:
                if gpu is not None:
                    self.free_gpus.append(gpu)
            self.slots.release()

    def _execute(self, label: str, args: list[str], gpu: int | None, prefix: bool) -> bool:
        shown = shlex.join(["vaegen", *args])
        click.echo(f"{f'[{label}] ' if prefix else ''}$ {shown}", err=True)
        if self.failed is not None:
            return False
        # The stage's own output goes to stderr: a study's stdout is only the report's path.
        proc = subprocess.Popen([sys.executable, "-m", "vaegen", *args], env=self.env(gpu, parallel=prefix),
                                stdout=subprocess.PIPE if prefix else sys.stderr,
                                stderr=subprocess.STDOUT if prefix else None)
        with self.lock:
            self.running[f"{label}:{id(proc)}"] = proc
        try:
            if prefix:
                _relay(proc.stdout, f"[{label}] ")
            code = proc.wait()
        finally:
            with self.lock:
                self.running.pop(f"{label}:{id(proc)}", None)
        if code in (-signal.SIGINT, 130, -signal.SIGTERM, 143):
            self.failed = self.failed or "interrupted"
            return False
        if code != 0:
            self.failed = self.failed or shown
            return False
        return True

    def wait(self) -> None:
        """Wait for every job; then raise if one failed."""
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.2)  # short joins keep the main thread responsive to signals
        self.threads = []
        if self.failed == "interrupted":
            raise Terminated()
        if self.failed is not None:
            raise VaegenError(f"study stopped: `{self.failed}` failed; fix the cause and rerun the same study "
                              "command to resume")

    def forward(self, signum: int) -> None:
        """Pass a signal on to every running command and let them stop cleanly."""
        self.failed = self.failed or "interrupted"
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
        for proc in procs:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()


def _relay(stream, prefix: str) -> None:
    """Copy a child's output to stderr, each line (and each progress-bar redraw) prefixed."""
    buffer = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        buffer += chunk
        while True:
            cut = min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, end, buffer = buffer[:cut], buffer[cut:cut + 1], buffer[cut + 1:]
            if line.strip():
                sys.stderr.write(prefix + line.decode(errors="replace") + ("\n" if end == b"\n" else "\r"))
                sys.stderr.flush()
    if buffer.strip():
        sys.stderr.write(prefix + buffer.decode(errors="replace") + "\n")


# --- a study -----------------------------------------------------------------------------------------------

class Study:
    """Runs the stage commands of one study, skipping finished work; stops starting runs past the budget."""

    def __init__(self, kind: str, dataset: str, preset: StudyPreset, study_dir: Path, data_root: str = "data",
                 jobs: int = 1):
        self.kind, self.dataset, self.preset, self.dir = kind, dataset, preset, Path(study_dir)
        self.data_root = data_root
        self.started = time.monotonic()
        self.stopped_at: str | None = None
        self.runner = JobRunner(jobs)
        self.vae_seconds = 0.0  # wall time of this invocation's VAE phases (train + eval), prerequisites excluded

    # --- names ------------------------------------------------------------------------------------------
    def subset_tag(self, subset: int | None = None) -> str:
        subset = self.preset.subset if subset is None else subset
        return f"{self.dataset}-n{subset}-s0" if subset else self.dataset

    def dm_dir(self, subset: int | None = None, max_steps: int | None = None) -> Path:
        steps = f"-steps{max_steps}" if max_steps else ""
        return Path("runs/dm") / f"{self.subset_tag(subset)}-{self.preset.dm_preset}{steps}"

    def shard_dir(self, dm: Path) -> Path:
        return Path("shards") / self.subset_tag() / f"{dm.name}-{self.preset.sampler}{self.preset.sampler_steps}"

    def run_dir(self, run: VaeRun) -> Path:
        return self.dir / "runs" / run.name

    # --- prerequisites (in order, the whole machine each) -----------------------------------------------
    def vaegen(self, *args) -> None:
        self.runner.run(self.kind, [[str(a) for a in args]])

    def over_budget(self, next_run: str) -> bool:
        budget = self.preset.budget_minutes
        if budget is not None and (time.monotonic() - self.started) / 60 > budget:
            self.stopped_at = self.stopped_at or next_run
            click.echo(f"budget of {budget} min spent: not starting {next_run}", err=True)
            return True
        return False

    def subset_args(self, subset: int | None = None) -> list:
        subset = self.preset.subset if subset is None else subset
        return ["--subset", subset, "--subset-seed", 0] if subset else []

    def ensure_data(self, subset: int | None = None) -> None:
        self.vaegen("data", self.dataset, "--data-root", self.data_root, *self.subset_args(subset))

    def ensure_dm(self, subset: int | None = None, max_steps: int | None = None) -> Path:
        dm = self.dm_dir(subset, max_steps)
        steps = max_steps or self.preset.dm_max_steps
        if not (dm / "dm.json").exists():
            self.vaegen("dm", "train", "--dataset", self.dataset, *self.subset_args(subset),
                        "--preset", self.preset.dm_preset, "--data-root", self.data_root,
                        *(["--max-steps", steps] if steps else []),
                        "--out", dm, *(["--resume"] if (dm / "checkpoints").is_dir() else []))
        return dm

    def ensure_dm_score(self, dm: Path) -> None:
        """`dm score` once per DM; its feature classifier trains on the full training split, so that store too."""
        if not (dm / "score.json").exists():
            self.vaegen("data", self.dataset, "--data-root", self.data_root)  # the full store
            self.vaegen("dm", "score", "--dm", dm, "--sampler", self.preset.sampler,
                        "--steps", self.preset.sampler_steps, "--data-root", self.data_root)

    def ensure_shards(self, dm: Path, scale: int) -> Path:
        """Shards of `dm` up to SCALE. Growing a shard run rewrites its last, short shard, so no VAE job may be
        reading it meanwhile: running jobs are waited for first."""
        shards = self.shard_dir(dm)
        generation = shards / "generation.json"
        if generation.exists() and read_json(generation).get("complete") and read_json(generation)["scale"] >= scale:
            return shards
        self.runner.wait()
        self.vaegen("generate", "--dm", dm, "--scale", scale, "--out", shards, "--sampler", self.preset.sampler,
                    "--steps", self.preset.sampler_steps, "--data-root", self.data_root)
        return shards

    # --- the VAE runs (parallel jobs) ---------------------------------------------------------------------
    def vae_commands(self, run: VaeRun, shards: Path | None, epochs: int | None = None,
                     eval_args: tuple[str, ...] | None = None) -> list[list[str]]:
        """`vaegen train` (unless finished) and `vaegen eval` (unless done) of one run."""
        out, commands = self.run_dir(run), []
        if not (out / DONE_NAME).exists():
            args = ["train", "--dataset", self.dataset, *self.subset_args(run.subset), "--data-root", self.data_root,
                    "--epochs", epochs or self.preset.epochs, "--eval-every", self.preset.eval_every,
                    "--seed", run.seed, "--batch-size", self.preset.batch_size, "--out", out]
            if run.source == "shards":
                args += ["--shards", shards, "--scale", run.scale]
            else:
                args += ["--source", "real"]
            if run.augment:
                args += ["--augment", run.augment]
            if run.mix_real is not None:
                args += ["--mix-real", run.mix_real]
            if run.mz is not None:
                args += ["--arch", "conv", "--mz", run.mz, "--nc", run.nc]
            args += [*run.extra, *(["--resume"] if out.exists() else [])]
            commands.append(args)
        if not (out / EVAL_DIR / GAPS_NAME).exists():
            eval_args = self.preset.eval_args if eval_args is None else eval_args
            commands.append(["eval", out, *eval_args, *run.eval_extra])
        return [[str(a) for a in c] for c in commands]

    def ensure_vaes(self, runs: list[VaeRun], shards: Path | dict | None, **kwargs) -> None:
        """Train and evaluate `runs`, `jobs` at a time, until the budget stops the study (then wait for them).
        `shards` is one shard run for all, or {run name: shard run}."""
        started = time.monotonic()
        for run in runs:
            commands = self.vae_commands(run, shards.get(run.name) if isinstance(shards, dict) else shards,
                                         **kwargs)
            if not commands:
                continue
            if (commands[0][0] == "train" and self.over_budget(run.name)) or not self.runner.submit(run.name, commands):
                break
        self.runner.wait()
        self.vae_seconds += time.monotonic() - started

    def tracking_args(self) -> tuple[str, ...]:
        p = self.preset
        return ("--track-gaps", "--track-amortization-every", str(p.track_amortization_every),
                "--track-robustness-every", str(p.track_robustness_every),
                "--track-amortization-images", str(p.track_amortization_images),
                "--track-robustness-images", str(p.track_robustness_images),
                "--track-robustness-seeds", str(p.track_robustness_seeds))

    # --- study.json ---------------------------------------------------------------------------------------
    def save(self, runs: list[VaeRun], **extra) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / "study.json", run_record(
            study=self.kind, dataset=self.dataset, preset=dataclasses.asdict(self.preset),
            jobs=self.runner.jobs, runs=[dataclasses.asdict(r) for r in runs], stopped_at=self.stopped_at,
            minutes=round((time.monotonic() - self.started) / 60, 2), vae_minutes=round(self.vae_seconds / 60, 2),
            **extra))

    def check_resumable(self) -> None:
        """A study directory belongs to one study kind, dataset and preset (seeds, grids and the budget may
        change on a rerun); refuse to mix others into it, since finished runs would be silently reused."""
        path = self.dir / "study.json"
        if not path.exists():
            return
        old = read_json(path)
        mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self.preset))).items()
                if k not in FREE_FIELDS}
        theirs = {k: v for k, v in old.get("preset", {}).items() if k not in FREE_FIELDS}
        if (old.get("study"), old.get("dataset"), theirs) != (self.kind, self.dataset, mine):
            changed = sorted(k for k in mine if mine[k] != theirs.get(k)) or ["study or dataset"]
            raise VaegenError(f"{self.dir} holds the {old.get('study')} study of {old.get('dataset')} with other "
                              f"settings ({', '.join(changed)}); choose another --out")


# --- the studies --------------------------------------------------------------------------------------------

def compare_runs(p: StudyPreset) -> list[VaeRun]:
    runs = []
    for seed in p.seeds:
        runs += [VaeRun(f"normal-seed{seed}", "real", seed),
                 VaeRun(f"dmaapx-k{p.compare_scale}-seed{seed}", "shards", seed, scale=p.compare_scale),
                 VaeRun(f"aug-naive-seed{seed}", "real", seed, augment="naive"),
                 VaeRun(f"aug-tuned-seed{seed}", "real", seed, augment="tuned")]
    return runs


def run_compare(study: Study) -> None:
    """Normal vs DMaaPx vs Aug.Naive vs Aug.Tuned, one run per seed, with the paper's downstream probes
    (paper table 7)."""
    p = study.preset
    runs = [dataclasses.replace(r, eval_extra=("--probes",)) for r in compare_runs(p)]
    study.save(runs)
    study.ensure_data()
    dm = study.ensure_dm()
    shards = study.ensure_shards(dm, p.compare_scale)
    study.ensure_vaes(runs, shards)
    study.save(runs, dm=str(dm), shards=str(shards))


def run_demo(study: Study) -> None:
    """The whole pipeline at tiny scale: the four methods of `compare` plus DMaaPx at every SCALE of the
    preset, in one study directory, so the demo report shows both the comparison and the SCALE curve."""
    p = study.preset
    runs = [VaeRun(f"normal-seed{s}", "real", s) for s in p.seeds]
    runs += [VaeRun(f"aug-{aug}-seed{s}", "real", s, augment=aug) for aug in ("naive", "tuned") for s in p.seeds]
    runs += [VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k) for k in sorted(p.scales) for s in p.seeds]
    study.save(runs)
    study.ensure_data()
    dm = study.ensure_dm()
    shards = study.ensure_shards(dm, max(p.scales))
    study.ensure_vaes(runs, shards)
    study.save(runs, dm=str(dm), shards=str(shards))


def run_ablation(study: Study) -> None:
    """Sample-size ablation: DMaaPx at each SCALE (plus Normal as k=0 reference). Shards grow with SCALE, so
    smaller scales use a prefix of the largest; a budget stops the sweep at the first scale it cannot start."""
    p = study.preset
    normal = [VaeRun(f"normal-seed{s}", "real", s) for s in p.seeds]
    by_scale = {k: [VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k) for s in p.seeds] for k in sorted(p.scales)}
    study.save([*normal, *(r for runs in by_scale.values() for r in runs)])
    study.ensure_data()
    dm = study.ensure_dm()
    study.ensure_vaes(normal, None)
    shards = None
    for k, runs in by_scale.items():
        if any(not (study.run_dir(r) / DONE_NAME).exists() for r in runs) and study.over_budget(runs[0].name):
            break
        shards = study.ensure_shards(dm, k)
        study.ensure_vaes(runs, shards)
        if study.stopped_at:
            break
    study.save([*normal, *(r for runs in by_scale.values() for r in runs)], dm=str(dm),
               shards=str(shards) if shards else None)


def overparam_sizes(p: StudyPreset) -> list[tuple[int, int]]:
    """(m_z, n_c) of the sweeps: m_z over its grid at n_c = mz_sweep_nc, n_c over its grid at each m_z of
    nc_sweep_mz (which together hold the paper's double-descent trajectory), each once."""
    sizes = [(mz, p.mz_sweep_nc) for mz in p.mz_grid]
    sizes += [(mz, nc) for mz in p.nc_sweep_mz for nc in p.nc_grid]
    return list(dict.fromkeys(sizes))


def run_overparam(study: Study) -> None:
    """Model size (paper figures 6-8): the conv VAE over the m_z grid at fixed n_c and over the n_c grid at each
    of several m_z, with Normal training and DMaaPx; |Theta|, |Theta_z| and |Theta_not_z| are recorded."""
    p = study.preset
    runs = []
    for mz, nc in overparam_sizes(p):
        for s in p.seeds:
            runs += [VaeRun(f"normal-mz{mz}-nc{nc}-seed{s}", "real", s, mz=mz, nc=nc),
                     VaeRun(f"dmaapx-k{p.compare_scale}-mz{mz}-nc{nc}-seed{s}", "shards", s,
                            scale=p.compare_scale, mz=mz, nc=nc)]
    study.save(runs)
    study.ensure_data()
    shards = study.ensure_shards(study.ensure_dm(), p.compare_scale)
    study.ensure_vaes(runs, shards, epochs=p.overparam_vae_epochs, eval_args=p.overparam_eval_args or None)
    study.save(runs, shards=str(shards))


def run_mix(study: Study) -> None:
    """Real/synthetic mixtures (appendix B.7): a fraction of every epoch real, the rest DM samples; each fraction
    without and with Aug.Tuned on the real part. 0% real is DMaaPx, 100% real is Normal (and Aug.Tuned)."""
    p = study.preset
    runs = []
    for f in p.mix_fractions:
        pct = int(round(f * 100))
        for s in p.seeds:
            if f >= 1:
                runs += [VaeRun(f"mix{pct:03d}-seed{s}", "real", s),
                         VaeRun(f"mix{pct:03d}-tuned-seed{s}", "real", s, augment="tuned")]
            elif f <= 0:
                runs += [VaeRun(f"mix{pct:03d}-seed{s}", "shards", s, scale=p.compare_scale)]
            else:
                runs += [VaeRun(f"mix{pct:03d}-seed{s}", "shards", s, scale=p.compare_scale, mix_real=f),
                         VaeRun(f"mix{pct:03d}-tuned-seed{s}", "shards", s, scale=p.compare_scale, mix_real=f,
                                augment="tuned")]
    study.save(runs)
    study.ensure_data()
    dm = study.ensure_dm()
    study.ensure_dm_score(dm)
    shards = study.ensure_shards(dm, p.compare_scale)
    study.ensure_vaes(runs, shards)
    study.save(runs, dm=str(dm), shards=str(shards))


def run_dm_subsets(study: Study) -> None:
    """DMs trained on subsets of D_train, each feeding a DMaaPx VAE trained on the full D_train (appendix
    B.8). Each DM is scored with `dm score`, so the report can put DM quality next to the VAE's gaps."""
    p = study.preset
    n_train = p.subset
    if n_train is None:
        from vaegen.data import open_dataset

        n_train = len(open_dataset(study.dataset, "train", root=study.data_root).labels)
    study.ensure_data()
    runs, shard_dirs = [], {}
    for fraction in p.dm_subset_fractions:
        dm_subset = max(10, int(round(fraction * n_train)))
        dm_subset = None if dm_subset >= n_train and p.subset is None else dm_subset
        study.ensure_data(dm_subset)
        dm = study.ensure_dm(dm_subset)
        study.ensure_dm_score(dm)
        # The DM's own N is smaller than |D_train|: generate enough for compare_scale x |D_train|.
        dm_n = dm_subset or n_train
        shards = study.ensure_shards(dm, -(-p.compare_scale * n_train // dm_n))
        for s in p.seeds:
            run = VaeRun(f"dm{int(round(fraction * 100)):03d}pct-seed{s}", "shards", s, scale=p.compare_scale,
                         dm=str(dm))
            runs.append(run)
            shard_dirs[run.name] = shards
    study.save(runs)
    study.ensure_vaes(runs, shard_dirs)
    study.save(runs, shards={k: str(v) for k, v in shard_dirs.items()})


def run_regularizers(study: Study) -> None:
    """DMaaPx against the paper's other remedies (§5.2, appendix B.6), with gap curves during training: Normal,
    Normal+RHA, Aug.Mollify, DMaaPx, DMaaPx+RHA, DMaaPx+Mollify."""
    p = study.preset
    k, track = p.compare_scale, study.tracking_args()
    runs = []
    for s in p.seeds:
        runs += [VaeRun(f"normal-seed{s}", "real", s, extra=track),
                 VaeRun(f"normal-rha-seed{s}", "real", s, extra=(*track, "--rha")),
                 VaeRun(f"mollify-seed{s}", "real", s, extra=(*track, "--mollify")),
                 VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k, extra=track),
                 VaeRun(f"dmaapx-k{k}-rha-seed{s}", "shards", s, scale=k, extra=(*track, "--rha")),
                 VaeRun(f"dmaapx-k{k}-mollify-seed{s}", "shards", s, scale=k, extra=(*track, "--mollify"))]
    study.save(runs)
    study.ensure_data()
    dm = study.ensure_dm()
    shards = study.ensure_shards(dm, k)
    study.ensure_vaes(runs, shards)
    study.save(runs, dm=str(dm), shards=str(shards))


def run_dm_quality(study: Study) -> None:
    """How much the DM's quality matters: DMs of graded quality (training budgets from a few hundred steps up to
    the full preset) on the same D_train, each scored, each feeding DMaaPx VAEs at the compare scale."""
    p = study.preset
    steps = p.dm_quality_steps or ((p.dm_max_steps,) if p.dm_max_steps else ())
    if not steps:
        raise VaegenError(f"the {p.name} preset lists no DM training budgets (dm_quality_steps)")
    study.ensure_data()
    runs, shard_dirs, dms = [], {}, {}
    from generator.presets import get_preset as dm_preset  # which budget is the preset's own (shared DM dir)

    full = p.dm_max_steps or dm_preset(p.dm_preset).max_steps
    for budget in steps:
        dm = study.ensure_dm(max_steps=None if budget == full else budget)
        study.ensure_dm_score(dm)
        shard_dirs[budget] = study.ensure_shards(dm, p.compare_scale)
        dms[budget] = str(dm)
        for s in p.seeds:
            runs.append(VaeRun(f"dm-steps{budget}-seed{s}", "shards", s, scale=p.compare_scale, dm=str(dm)))
    study.save(runs, dms=dms)
    study.ensure_vaes(runs, {r.name: shard_dirs[int(r.name.split("steps")[1].split("-")[0])] for r in runs})
    study.save(runs, dms=dms, shards={str(k): str(v) for k, v in shard_dirs.items()})


def run_real_vs_synthetic(study: Study) -> None:
    """The control the paper lacks: Normal training on k*N real images against DMaaPx on k*N DM samples of the
    DM trained on the N images, at the same compute (N images per effective epoch, the same epochs)."""
    p = study.preset
    n = p.subset
    if n is None:
        raise VaegenError("real-vs-synthetic needs a preset with a D_train subset (N), to draw k*N real images")
    from vaegen.data import open_dataset

    study.ensure_data()
    study.vaegen("data", study.dataset, "--data-root", study.data_root)  # the full training split: k*N <= it
    full = len(open_dataset(study.dataset, "train", root=study.data_root).labels)
    ks = [k for k in p.real_scales if k * n <= full]
    runs, shards = [], None
    for k in ks:
        real_n = k * n
        subset = None if real_n >= full else real_n
        if subset is not None:
            study.ensure_data(subset)
        for s in p.seeds:
            runs += [VaeRun(f"real-k{k}-seed{s}", "real", s, subset=subset if subset is not None else 0,
                            extra=("--epoch-size", str(n))),
                     VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k)]
    study.save(runs)
    dm = study.ensure_dm()
    shards = study.ensure_shards(dm, max(ks))
    study.ensure_vaes(runs, shards)
    study.save(runs, dm=str(dm), shards=str(shards), real_scales=ks)


def run_controls(study: Study) -> None:
    """Is DMaaPx just a regularizer? Normal training with early stopping (on a validation split of D_train) and
    with weight decay, beside Normal and DMaaPx."""
    p = study.preset
    k = p.compare_scale
    runs = []
    for s in p.seeds:
        runs += [VaeRun(f"normal-seed{s}", "real", s), VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k),
                 VaeRun(f"early-stopping-seed{s}", "real", s,
                        extra=("--early-stopping-split", str(p.early_stopping_split),
                               "--early-stopping-patience", str(p.early_stopping_patience)))]
        runs += [VaeRun(f"weight-decay{wd:g}-seed{s}", "real", s, extra=("--weight-decay", f"{wd:g}"))
                 for wd in p.weight_decays]
    study.save(runs)
    study.ensure_data()
    shards = study.ensure_shards(study.ensure_dm(), k)
    study.ensure_vaes(runs, shards)
    study.save(runs, shards=str(shards))


STUDIES = {"demo": run_demo, "compare": run_compare, "ablation": run_ablation, "overparam": run_overparam,
           "mix": run_mix, "dm-subsets": run_dm_subsets, "regularizers": run_regularizers,
           "dm-quality": run_dm_quality, "real-vs-synthetic": run_real_vs_synthetic, "controls": run_controls}


def run_study(kind: str, dataset: str, preset: StudyPreset, out: str | None, data_root: str = "data",
              jobs: int = 1) -> Path:
    study_dir = Path(out) if out else Path("runs/studies") / f"{kind}-{dataset}-{preset.name}"
    study = Study(kind, dataset, preset, study_dir, data_root, jobs)
    with run_lock(study_dir):
        study.check_resumable()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def pass_on(signum, frame):  # stop the stage commands cleanly, then stop the study
            study.runner.forward(signum)
            raise Interrupted(signum, "the running stage commands stopped cleanly; rerun the same study command "
                                      "to resume")

        for s in previous:
            signal.signal(s, pass_on)
        try:
            STUDIES[kind](study)
            study.runner.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        study.vaegen("report", study_dir)
    return study_dir


def _study_command(kind: str):
    @click.command(kind, context_settings=CONTEXT, help=STUDIES[kind].__doc__)
    @click.option("--dataset", default="fmnist", type=click.Choice(["fmnist", "mnist", "binary-mnist", "cifar10"]))
    @click.option("--preset", default="cpu", type=click.Choice(["demo", "cpu", "paper"]))
    @click.option("--scales", default=None, help="Space-separated SCALEs for the ablation (default: the preset's).")
    @click.option("--seeds", default=None, help="Space-separated VAE seeds (default: the preset's).")
    @click.option("--subset", default=None, type=click.IntRange(min=1), help="|D_train| (default: the preset's).")
    @click.option("--epochs", default=None, type=click.IntRange(min=1), help="VAE epochs (default: the preset's).")
    @click.option("--dm-max-steps", default=None, type=click.IntRange(min=1),
                  help="DM training steps (default: the DM preset's).")
    @click.option("--budget-minutes", default=None, type=click.FloatRange(min=0),
                  help="Start no new run after this many minutes of this invocation (default: the preset's).")
    @click.option("--jobs", default=None, type=click.IntRange(min=1),
                  help="VAE runs at a time [default: the number of GPUs, else CPU cores / 1 thread per run].")
    @click.option("--out", default=None, type=click.Path(file_okay=False),
                  help="Study directory [default: runs/studies/<study>-<dataset>-<preset>].")
    @click.option("--data-root", default="data", type=click.Path(file_okay=False))
    def command(dataset, preset, scales, seeds, subset, epochs, dm_max_steps, budget_minutes, jobs, out, data_root):
        overrides = {"subset": subset, "epochs": epochs, "dm_max_steps": dm_max_steps,
                     "budget_minutes": budget_minutes}
        try:
            if scales:
                overrides["scales"] = tuple(int(k) for k in scales.split())
            if seeds:
                overrides["seeds"] = tuple(int(s) for s in seeds.split())
        except ValueError:
            raise VaegenError("--scales and --seeds take space-separated integers, e.g. --scales '1 2 5'") from None
        if any(k < 1 for k in overrides.get("scales", ())):
            raise VaegenError("every SCALE must be >= 1")
        chosen = get_preset(preset, **overrides)
        jobs = jobs or default_jobs()
        click.echo(f"{kind} study of {dataset}, {jobs} job(s), preset {chosen}", err=True)
        study_dir = run_study(kind, dataset, chosen, out, data_root, jobs)
        click.echo(str(study_dir / "report.md"))

    return command


@click.group(context_settings=CONTEXT)
def study():
    """The paper's comparisons and ablations, and the studies it leaves open; rerunning a study skips its
    finished runs."""


for _kind in STUDIES:
    study.add_command(_study_command(_kind))
