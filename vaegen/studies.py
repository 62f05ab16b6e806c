"""The paper's comparisons and ablations as resumable one-command experiments.

A study only chains the stage commands (`vaegen data`, `dm train`, `generate`, `train`, `eval`, `report`) as
subprocesses: stages talk through files, exactly as when a user types the commands. Every run directory records
its own completion (dm.json, shard markers, done.json, eval/gaps.json), so rerunning a study skips what is
finished and resumes what was interrupted. Layout of a study directory:

    <study_dir>/study.json          the preset, the planned runs, where a budget stopped the study
    <study_dir>/runs/<run>/         VAE runs (trainer output + eval/)
    <study_dir>/report.md, *.csv, *.png   written by `vaegen report`
The diffusion models and shards are shared between studies: runs/dm/<...>/ and shards/<...>/.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from vaegen.errors import VaegenError
from vaegen.presets import StudyPreset, get_preset
from vaegen.provenance import read_json, run_record, write_json_atomic
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


class Study:
    """Runs the stage commands of one study, skipping finished work; stops starting runs past the budget."""

    def __init__(self, kind: str, dataset: str, preset: StudyPreset, study_dir: Path, data_root: str = "data"):
        self.kind, self.dataset, self.preset, self.dir = kind, dataset, preset, Path(study_dir)
        self.data_root = data_root
        self.started = time.monotonic()
        self.stopped_at: str | None = None

    # --- names ------------------------------------------------------------------------------------------
    def subset_tag(self, subset: int | None = None) -> str:
        subset = self.preset.subset if subset is None else subset
        return f"{self.dataset}-n{subset}-s0" if subset else self.dataset

    def dm_dir(self, subset: int | None = None) -> Path:
        return Path("runs/dm") / f"{self.subset_tag(subset)}-{self.preset.dm_preset}"

    def shard_dir(self, dm: Path) -> Path:
        return Path("shards") / self.subset_tag() / f"{dm.name}-{self.preset.sampler}{self.preset.sampler_steps}"

    # --- running stage commands -------------------------------------------------------------------------
    def vaegen(self, *args) -> None:
        command = [sys.executable, "-m", "vaegen", *map(str, args)]
        click.echo(f"$ {shlex.join(['vaegen', *map(str, args)])}", err=True)
        # The stage's own output goes to stderr: a study's stdout is only the report's path.
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise VaegenError(f"study stopped: `{shlex.join(['vaegen', *map(str, args)])}` failed; "
                              "fix the cause and rerun the same study command to resume")

    def over_budget(self, next_run: str) -> bool:
        budget = self.preset.budget_minutes
        if budget is not None and (time.monotonic() - self.started) / 60 > budget:
            self.stopped_at = next_run
            click.echo(f"budget of {budget} min spent: not starting {next_run}", err=True)
            return True
        return False

    def subset_args(self, subset: int | None = None) -> list:
        subset = self.preset.subset if subset is None else subset
        return ["--subset", subset, "--subset-seed", 0] if subset else []

    def ensure_data(self, subset: int | None = None) -> None:
        subset = self.preset.subset if subset is None else subset
        self.vaegen("data", self.dataset, "--data-root", self.data_root, *(["--subset", subset] if subset else []))

    def ensure_dm(self, subset: int | None = None) -> Path:
        dm = self.dm_dir(subset)
        if not (dm / "dm.json").exists():
            steps = [] if self.preset.dm_max_steps is None else ["--max-steps", self.preset.dm_max_steps]
            self.vaegen("dm", "train", "--dataset", self.dataset, *self.subset_args(subset),
                        "--preset", self.preset.dm_preset, "--data-root", self.data_root, *steps,
                        "--out", dm, *(["--resume"] if (dm / "checkpoints").is_dir() else []))
        return dm

    def ensure_dm_score(self, dm: Path) -> None:
        """`dm score` once per DM; its feature classifier trains on the full training split, so that store too."""
        if not (dm / "score.json").exists():
            self.vaegen("data", self.dataset, "--data-root", self.data_root)  # the full store
            self.vaegen("dm", "score", "--dm", dm, "--sampler", self.preset.sampler,
                        "--steps", self.preset.sampler_steps, "--data-root", self.data_root)

    def ensure_shards(self, dm: Path, scale: int) -> Path:
        shards = self.shard_dir(dm)
        self.vaegen("generate", "--dm", dm, "--scale", scale, "--out", shards, "--sampler", self.preset.sampler,
                    "--steps", self.preset.sampler_steps, "--data-root", self.data_root)
        return shards

    def ensure_vae(self, run: VaeRun, shards: Path | None = None) -> bool:
        """Train and evaluate one VAE run; False when the budget stopped the study before it."""
        out = self.dir / "runs" / run.name
        if not (out / DONE_NAME).exists():
            if self.over_budget(run.name):
                return False
            args = ["train", "--dataset", self.dataset, *self.subset_args(), "--data-root", self.data_root,
                    "--epochs", self.preset.epochs, "--eval-every", self.preset.eval_every, "--seed", run.seed,
                    "--batch-size", self.preset.batch_size,
                    "--out", out]
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
            self.vaegen(*args, *(["--resume"] if out.exists() else []))
        if not (out / EVAL_DIR / GAPS_NAME).exists():
            self.vaegen("eval", out, *self.preset.eval_args)
        return True

    def ensure_vaes(self, runs: list[VaeRun], shards: Path | None) -> None:
        """Train and evaluate `runs` in order, until the budget stops the study."""
        for run in runs:
            if not self.ensure_vae(run, shards):
                return

    def save(self, runs: list[VaeRun], **extra) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / "study.json", run_record(
            study=self.kind, dataset=self.dataset, preset=dataclasses.asdict(self.preset),
            runs=[dataclasses.asdict(r) for r in runs], stopped_at=self.stopped_at,
            minutes=round((time.monotonic() - self.started) / 60, 2), **extra))

    def check_resumable(self) -> None:
        """A study directory belongs to one study kind, dataset and preset (seeds, scales and the budget may
        grow on a rerun); refuse to mix others into it, since finished runs would be silently reused."""
        path = self.dir / "study.json"
        if not path.exists():
            return
        old = read_json(path)
        free = ("seeds", "scales", "budget_minutes")
        mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self.preset))).items() if k not in free}
        theirs = {k: v for k, v in old.get("preset", {}).items() if k not in free}
        if (old.get("study"), old.get("dataset"), theirs) != (self.kind, self.dataset, mine):
            changed = sorted(k for k in mine if mine[k] != theirs.get(k)) or ["study or dataset"]
            raise VaegenError(f"{self.dir} holds the {old.get('study')} study of {old.get('dataset')} with other "
                              f"settings ({', '.join(changed)}); choose another --out")


# --- the studies --------------------------------------------------------------------------------------------

def run_compare(study: Study) -> None:
    """Normal vs DMaaPx vs Aug.Naive vs Aug.Tuned, one run per seed (paper table 7)."""
    p = study.preset
    runs = []
    for seed in p.seeds:
        runs += [VaeRun(f"normal-seed{seed}", "real", seed),
                 VaeRun(f"dmaapx-k{p.compare_scale}-seed{seed}", "shards", seed, scale=p.compare_scale),
                 VaeRun(f"aug-naive-seed{seed}", "real", seed, augment="naive"),
                 VaeRun(f"aug-tuned-seed{seed}", "real", seed, augment="tuned")]
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
    runs = [VaeRun(f"normal-seed{s}", "real", s) for s in p.seeds]
    runs += [VaeRun(f"dmaapx-k{k}-seed{s}", "shards", s, scale=k) for k in sorted(p.scales) for s in p.seeds]
    study.save(runs)
    study.ensure_data()
    dm = study.ensure_dm()
    shards = None
    for run in runs:
        if run.source == "shards":
            if study.over_budget(run.name):
                break
            shards = study.ensure_shards(dm, run.scale)
        if not study.ensure_vae(run, shards):
            break
    study.save(runs, dm=str(dm), shards=str(shards) if shards else None)


def run_overparam(study: Study) -> None:
    """Model-size ablation of the conv VAE: m_z sweep at the default n_c, n_c sweep at m_z=1 (figures 6-8),
    for Normal and DMaaPx."""
    p = study.preset
    # The paper sweeps m_z at n_c=256; a preset whose n_c list stops short of 256 (demo) sweeps at its largest.
    mz_nc = 256 if 256 in p.nc else max(p.nc)
    sizes = [(mz, mz_nc) for mz in p.mz] + [(1, nc) for nc in p.nc if nc != mz_nc]
    runs = []
    for mz, nc in sizes:
        for s in p.seeds:
            runs += [VaeRun(f"normal-mz{mz}-nc{nc}-seed{s}", "real", s, mz=mz, nc=nc),
                     VaeRun(f"dmaapx-k{p.compare_scale}-mz{mz}-nc{nc}-seed{s}", "shards", s,
                            scale=p.compare_scale, mz=mz, nc=nc)]
    study.save(runs)
    study.ensure_data()
    shards = study.ensure_shards(study.ensure_dm(), p.compare_scale)
    study.ensure_vaes(runs, shards)
    study.save(runs, shards=str(shards))


def run_mix(study: Study) -> None:
    """Real/synthetic mixtures: a fraction of every batch is real, the rest DM samples (appendix B.7)."""
    p = study.preset
    runs = [VaeRun(f"normal-seed{s}", "real", s) for s in p.seeds]  # 100% real
    runs += [VaeRun(f"mix{int(round(f * 100)):03d}-seed{s}", "shards", s, scale=p.compare_scale, mix_real=f)
             for f in p.mix_fractions for s in p.seeds]
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
        shard_dirs[fraction] = study.ensure_shards(dm, -(-p.compare_scale * n_train // dm_n))
        runs += [VaeRun(f"dm{int(round(fraction * 100)):03d}pct-seed{s}", "shards", s, scale=p.compare_scale,
                        dm=str(dm)) for s in p.seeds]
    study.save(runs)
    for run, fraction in zip(runs, [f for f in p.dm_subset_fractions for _ in p.seeds]):
        if not study.ensure_vae(run, shard_dirs[fraction]):
            break
    study.save(runs, shards={str(k): str(v) for k, v in shard_dirs.items()})


STUDIES = {"demo": run_demo, "compare": run_compare, "ablation": run_ablation, "overparam": run_overparam, "mix": run_mix,
           "dm-subsets": run_dm_subsets}


def run_study(kind: str, dataset: str, preset: StudyPreset, out: str | None, data_root: str = "data") -> Path:
    study_dir = Path(out) if out else Path("runs/studies") / f"{kind}-{dataset}-{preset.name}"
    study = Study(kind, dataset, preset, study_dir, data_root)
    study.check_resumable()
    STUDIES[kind](study)
    study.vaegen("report", study_dir)
    return study_dir


def _study_command(kind: str):
    @click.command(kind, context_settings={"show_default": True}, help=STUDIES[kind].__doc__)
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
    @click.option("--out", default=None, type=click.Path(file_okay=False),
                  help="Study directory [default: runs/studies/<study>-<dataset>-<preset>].")
    @click.option("--data-root", default="data", type=click.Path(file_okay=False))
    def command(dataset, preset, scales, seeds, subset, epochs, dm_max_steps, budget_minutes, out, data_root):
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
        click.echo(f"{kind} study of {dataset}, preset {chosen}", err=True)
        study_dir = run_study(kind, dataset, chosen, out, data_root)
        click.echo(str(study_dir / "report.md"))

    return command


@click.group(context_settings={"show_default": True})
def study():
    """The paper's comparisons and ablations; rerunning a study skips its finished runs."""


for _kind in STUDIES:
    study.add_command(_study_command(_kind))
