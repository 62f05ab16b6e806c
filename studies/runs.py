"""A study's runs as typed settings: which store, which DM, which shards, which VAE, how evaluated.

Every setting is a field, never parsed back out of a run's name; `train_args` and `eval_args` turn them into the
stage commands a user would type. The inputs a run needs (a store, a DM, a shard set long enough) are derived
from the same fields, so the study skeleton (studies/study.py) can build them before the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from studies.presets import EvalSettings, StudyPreset
from vaegen.data import get_spec, store_name
from vaegen.dmrun import dm_name, find_dm, is_reference, retraining_dir, snapshot_dir
from vaegen.vaerun import EVAL_DIR

SUBSET_SEED = 0  # every study draws its D_train subsets with seed 0: a smaller subset is inside every larger one


@dataclass(frozen=True)
class Store:
    """A dataset store: the full training split (subset None) or a seeded, class-balanced subset."""

    dataset: str
    subset: int | None

    @property
    def train_size(self) -> int:
        return self.subset or get_spec(self.dataset).train_size

    @property
    def tag(self) -> str:
        return store_name(self.dataset, self.subset, SUBSET_SEED).removesuffix(".zarr")

    def args(self) -> list[str]:
        return [] if self.subset is None else ["--subset", str(self.subset), "--subset-seed", str(SUBSET_SEED)]


@dataclass(frozen=True)
class DMSpec:
    """A diffusion model trained on `store` with a generator preset for `steps` (None: the preset's own),
    or the EMA snapshot at step `snapshot` of that run (graded DMs from one training run)."""

    store: Store
    preset: str
    steps: int | None = None
    snapshot: int | None = None

    @property
    def run_dir(self) -> Path:
        """The training run's directory (runs/dm/<name>, or the committed reference models/<name>)."""
        return find_dm(dm_name(self.store.dataset, self.store.subset, SUBSET_SEED, self.preset, self.steps))

    @property
    def training_dir(self) -> Path:
        """Where the run trains: runs/dm/<name>; for a committed reference DM, its retraining (for snapshots)."""
        return retraining_dir(self.run_dir) if is_reference(self.run_dir) else self.run_dir

    @property
    def path(self) -> Path:
        """The DM itself: the run's exported model, or one of its snapshots."""
        return self.run_dir if self.snapshot is None else snapshot_dir(self.training_dir, self.snapshot)

    @property
    def label(self) -> str:
        name = self.run_dir.name
        return name if self.snapshot is None else f"{name}-at{self.snapshot}"

    def train_args(self, data_root: str, snapshots: list[int] = ()) -> list[str]:
        """`dm train` of the run, keeping the EMA model at each step of `snapshots`."""
        return ["dm", "train", "--dataset", self.store.dataset, *self.store.args(), "--preset", self.preset,
                "--data-root", data_root, *(["--max-steps", str(self.steps)] if self.steps else []),
                *(["--snapshot-steps", ",".join(map(str, snapshots))] if snapshots else []),
                "--out", str(self.training_dir)]


@dataclass(frozen=True)
class Pool:
    """DM samples a run trains on: the first `scale` x |D_train| of the shard set of `dm` (prefix-stable)."""

    dm: DMSpec
    scale: int
    sampler: str
    sampler_steps: int
    vae_store: Store  # whose |D_train| the scale multiplies (the DM may have been trained on fewer images)

    @property
    def shards(self) -> Path:
        return Path("shards") / self.vae_store.tag / f"{self.dm.label}-{self.sampler}{self.sampler_steps}"


@dataclass(frozen=True)
class Tracking:
    """--track-gaps: G_a and G_r during training (the paper's Fig. 11)."""

    FLAG: ClassVar[str] = "--track-gaps"
    OPTIONS: ClassVar[tuple[str, ...]] = ("--track-amortization-every", "--track-robustness-every",
                                          "--track-amortization-images", "--track-robustness-images",
                                          "--track-robustness-seeds")

    amortization_every: int
    robustness_every: int
    amortization_images: int
    robustness_images: int
    robustness_seeds: int

    def args(self) -> list[str]:
        values = (self.amortization_every, self.robustness_every, self.amortization_images, self.robustness_images,
                  self.robustness_seeds)
        return [self.FLAG, *(a for option, value in zip(self.OPTIONS, values) for a in (option, str(value)))]


@dataclass(frozen=True)
class VaeRun:
    """One VAE run of a study: `name` is its directory under <study>/runs/."""

    name: str
    seed: int
    store: Store                      # D_train (and D_test)
    epochs: int
    eval_every: int
    batch_size: int
    evaluation: EvalSettings
    pool: Pool | None = None          # None: trains on the real D_train
    augment: str | None = None        # "naive" | "tuned"
    augment_output: str | None = None  # the augmentation's output range (None: the trainer's default)
    mix_real: float | None = None
    epoch_size: int | None = None     # real images per effective epoch, when D_train is larger (real-vs-synthetic)
    mz: int | None = None             # the conv VAE's latent channels and width (None: the FC VAE)
    nc: int | None = None
    rha: bool = False
    mollify: bool = False
    weight_decay: float | None = None
    early_stopping: tuple[float, int] | None = None  # (validation split, patience)
    tracking: Tracking | None = None
    sigma: float | None = None        # the Gaussian likelihood's sigma (None: the trainer's default)
    likelihood: str | None = None     # None: the dataset's
    probes: bool = False
    extra_evaluations: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (eval dir, more `vaegen eval` options)

    def train_args(self, data_root: str, out: Path) -> list[str]:
        """`vaegen train ...` of this run (without --resume: the job adds it when the directory exists)."""
        args = ["train", "--dataset", self.store.dataset, *self.store.args(), "--data-root", data_root,
                "--epochs", str(self.epochs), "--eval-every", str(self.eval_every), "--seed", str(self.seed),
                "--batch-size", str(self.batch_size), "--out", str(out)]
        if self.pool is not None:
            args += ["--shards", str(self.pool.shards), "--scale", str(self.pool.scale)]
        else:
            args += ["--source", "real"]
        if self.augment:
            args += ["--augment", self.augment]
        if self.augment_output:
            args += ["--augment-output", self.augment_output]
        if self.mix_real is not None:
            args += ["--mix-real", f"{self.mix_real:g}"]
        if self.epoch_size:
            args += ["--epoch-size", str(self.epoch_size)]
        if self.mz is not None:
            args += ["--arch", "conv", "--mz", str(self.mz), "--nc", str(self.nc)]
        if self.likelihood:
            args += ["--likelihood", self.likelihood]
        if self.sigma is not None:
            args += ["--sigma", f"{self.sigma:g}"]
        if self.rha:
            args += ["--rha"]
        if self.mollify:
            args += ["--mollify"]
        if self.weight_decay is not None:
            args += ["--weight-decay", f"{self.weight_decay:g}"]
        if self.early_stopping:
            split, patience = self.early_stopping
            args += ["--early-stopping-split", f"{split:g}", "--early-stopping-patience", str(patience)]
        if self.tracking:
            args += self.tracking.args()
        return args

    def evaluations(self, out: Path) -> list[tuple[str, list[str]]]:
        """(eval directory, `vaegen eval ...`) of every evaluation: eval/ with the preset's settings, then any
        extra ones (e.g. another robustness protocol into eval-kuzina/)."""
        main = ["eval", str(out), *self.evaluation.args(), *(["--probes"] if self.probes else [])]
        return [(EVAL_DIR, main), *((name, ["eval", str(out), "--eval-dir", name, *args])
                                    for name, args in self.extra_evaluations)]


class RunFactory:
    """The runs of a study, with the preset's defaults filled in: `runs.normal(seed)`, `runs.dmaapx(seed, k)`."""

    def __init__(self, dataset: str, preset: StudyPreset):
        self.dataset, self.preset = dataset, preset
        self.store = Store(dataset, preset.subset)

    def dm(self, store: Store | None = None, snapshot: int | None = None) -> DMSpec:
        return DMSpec(store or self.store, self.preset.dm_preset, self.preset.dm_max_steps, snapshot)

    def pool(self, scale: int, dm: DMSpec | None = None) -> Pool:
        p = self.preset
        return Pool(dm or self.dm(), scale, p.sampler, p.sampler_steps, self.store)

    def run(self, name: str, seed: int, **settings) -> VaeRun:
        p = self.preset
        settings = {"store": self.store, "epochs": p.epochs, "evaluation": p.eval, "sigma": p.sigma, **settings}
        return VaeRun(name, seed, eval_every=p.eval_every, batch_size=p.batch_size, **settings)

    def normal(self, seed: int, name: str = "normal", **settings) -> VaeRun:
        return self.run(f"{name}-seed{seed}", seed, **settings)

    def augmented(self, seed: int, augment: str, **settings) -> VaeRun:
        return self.run(f"aug-{augment}-seed{seed}", seed, augment=augment, **settings)

    def dmaapx(self, seed: int, scale: int, name: str | None = None, dm: DMSpec | None = None,
               **settings) -> VaeRun:
        return self.run(name or f"dmaapx-k{scale}-seed{seed}", seed, pool=self.pool(scale, dm), **settings)

    def tracking(self) -> Tracking:
        p = self.preset
        return Tracking(p.track_amortization_every, p.track_robustness_every, p.track_amortization_images,
                        p.track_robustness_images, p.track_robustness_seeds)
