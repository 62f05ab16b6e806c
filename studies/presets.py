"""Where a study runs: `smoke` (every study's pipeline in minutes, tiny DM: a check, not a result), `demo` (the
method at work in minutes, on the committed reference DM), `cpu` (a few hours per study on 2 cores) and `paper`
(the paper's protocol, for GPUs). Each is plain data; `vaegen study ... --preset NAME` prints and saves it.

Every setting the paper prints is the `paper` preset's; the `cpu` preset shrinks sizes (|D_train|, epochs,
grids, evaluation subsamples), never the protocol. Where a `cpu` choice rests on a measurement, the comment names
the report in docs/results/ that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from vaegen.errors import VaegenError

# The paper's grids (§5.4-5.7). m_z: 1, 2, 4, 6, ..., 32, 36, 40, ..., 64 (25 values). n_c: 16 values in 1..512
# (the paper does not list them; ours include every n_c of its Fig. 8 parameter counts: 64, 128, 192, 256, 384,
# 448, 512).
PAPER_MZ = (1, 2, *range(4, 33, 2), *range(36, 65, 4))
PAPER_NC = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
PAPER_SCALES = (1, 2, 5, 10, 20, 50, 100, 250, 500, 750, 1000)


@dataclass(frozen=True)
class EvalSettings:
    """What `vaegen eval` measures for every run of a study (None: the evaluator's default, the paper's)."""

    quick: bool = False
    amortization_images: int | None = None
    qstar_max_iters: int | None = None
    iwae_k: int | None = None
    iwae_images: int | None = None

    def args(self) -> list[str]:
        args = ["--quick"] if self.quick else []
        for name in ("amortization_images", "qstar_max_iters", "iwae_k", "iwae_images"):
            if getattr(self, name) is not None:
                args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        return args


@dataclass(frozen=True)
class StudyPreset:
    name: str
    subset: int | None            # |D_train|; None = the full training split
    dm_preset: str                # generator preset (tiny | small | paper)
    dm_max_steps: int | None      # DM training steps (None: the generator preset's own, sized for its hardware)
    sampler: str
    sampler_steps: int
    epochs: int                   # effective epochs of N images per VAE
    eval_every: int               # epochs between real train/test ELBO points in metrics.jsonl
    seeds: tuple[int, ...]
    compare_scale: int            # SCALE of the DMaaPx pool in `compare` (the paper's headline uses 10x+)
    scales: tuple[int, ...]       # sample-size ablation, and the synthetic arm of real-vs-synthetic
    budget_minutes: float | None  # a study stops starting new runs past this (None: no limit)
    batch_size: int               # VAE batch size
    eval: EvalSettings = field(default_factory=EvalSettings)
    sigma: float | None = None    # the Gaussian likelihood's sigma on [0, 1] pixels (None: the trainer's default)
    # appendix B.7-B.8
    mix_fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # share of real data; 1.0 is Normal
    dm_subset_fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    # overparameterization (§5.5-5.7): the conv VAE
    mz_grid: tuple[int, ...] = PAPER_MZ       # swept at n_c = mz_sweep_nc
    nc_grid: tuple[int, ...] = PAPER_NC       # swept at each m_z of nc_sweep_mz
    mz_sweep_nc: int = 256
    nc_sweep_mz: tuple[int, ...] = (1, 2, 8, 64)
    overparam_epochs: int | None = None       # None: `epochs`
    overparam_seeds: tuple[int, ...] | None = None  # None: `seeds`
    overparam_eval: EvalSettings | None = None      # None: `eval`
    # gap curves during training (§5.2): the paper's intervals
    track_amortization_every: int = 100
    track_robustness_every: int = 10
    track_amortization_images: int = 100
    track_robustness_images: int = 50
    track_robustness_seeds: int = 10
    # beyond the paper
    dm_quality_steps: tuple[int, ...] = ()    # snapshot steps of one DM run, graded quality; () = the final DM only
    real_scales: tuple[int, ...] = (1, 2, 5, 10, 20, 60)  # k*N real images (FashionMNIST has 60k)
    weight_decays: tuple[float, ...] = (0.01, 0.1, 1.0)  # AdamW: per-step shrink lr * wd
    early_stopping_split: float = 0.1
    early_stopping_patience: int = 10
    robustness_sigmas: tuple[float, ...] = (0.05, 0.1, 0.2)  # the robustness study's likelihood sigmas
    cuts: str = ""                        # how the preset departs from the paper's sizes (every report says it)
    score_images: int = 1000              # `vaegen dm score --n`
    score_classifier_steps: int = 800     # `vaegen dm score --classifier-steps` (part of the classifier's cache key)

    @property
    def overparam_vae_epochs(self) -> int:
        return self.overparam_epochs or self.epochs


# Settings whose change only adds or removes runs (each run's own settings are in its config), so a study
# directory may be resumed with other values of these.
FREE_FIELDS = ("seeds", "scales", "budget_minutes", "mix_fractions", "dm_subset_fractions", "mz_grid", "nc_grid",
               "nc_sweep_mz", "dm_quality_steps", "real_scales", "weight_decays", "overparam_seeds",
               "robustness_sigmas", "cuts")

PRESETS = {
    # Every study's whole pipeline in minutes on 2 CPU cores: a 200-image subset, the tiny DM sampled with few steps,
    # batch 32 so that 100 epochs of 200 images are still 700 steps. A pipeline check (the tests run it), not a result.
    "smoke": StudyPreset(
        name="smoke", subset=200, dm_preset="tiny", dm_max_steps=None, sampler="edm-heun", sampler_steps=6,
        epochs=100, eval_every=5, seeds=(0,), compare_scale=5, scales=(1, 2, 5), budget_minutes=None,
        batch_size=32, eval=EvalSettings(quick=True, qstar_max_iters=100), mix_fractions=(0.0, 0.5, 1.0),
        dm_subset_fractions=(0.5, 1.0), mz_grid=(1, 2), nc_grid=(8, 16), mz_sweep_nc=16, nc_sweep_mz=(1, 2),
        overparam_eval=EvalSettings(quick=True, qstar_max_iters=50, iwae_k=20),
        track_amortization_every=50, track_robustness_every=25, track_amortization_images=20,
        track_robustness_images=5, track_robustness_seeds=2, dm_quality_steps=(50, 150), real_scales=(1, 2),
        weight_decays=(1e-2,), early_stopping_patience=4, robustness_sigmas=(0.1,), score_images=200,
        score_classifier_steps=200,
    ),
    # `make demo`: the method at work within minutes on 2 CPU cores. The cpu preset's D_train (1000 FashionMNIST
    # images) and its committed reference DM (models/fmnist-n1000-s0-small), sampled with DPM-Solver++ at 7 steps
    # (7 network evaluations, 3.3x fewer than the cpu preset's Heun-12; within Heun-18's noise on the frontier:
    # docs/results/frontier-fmnist-cpu/), 200 epochs (normal training overfits after ~130), one seed, quick eval.
    "demo": StudyPreset(
        name="demo", subset=1000, dm_preset="small", dm_max_steps=None, sampler="dpm-solver++", sampler_steps=7,
        epochs=200, eval_every=10, seeds=(0,), compare_scale=5, scales=(5,), budget_minutes=None, batch_size=128,
        eval=EvalSettings(quick=True, qstar_max_iters=100), mix_fractions=(0.0, 0.5, 1.0), mz_grid=(1, 2),
        nc_grid=(8, 16), mz_sweep_nc=16, nc_sweep_mz=(1, 2), overparam_epochs=50,
        overparam_eval=EvalSettings(quick=True, qstar_max_iters=50, iwae_k=20), track_amortization_every=50,
        track_robustness_every=25, track_amortization_images=20, track_robustness_images=5, track_robustness_seeds=2,
        dm_quality_steps=(400, 1400), real_scales=(1, 5), weight_decays=(1e-2,), robustness_sigmas=(0.1,),
        score_images=200, score_classifier_steps=800,
    ),
    # FashionMNIST subset of 1000 (the small-data regime where normal training overfits hard); the `small` DM
    # (committed: models/fmnist-n1000-s0-small/); Heun-12, checked against Heun-18 and DPM-Solver++ 7
    # (docs/results/frontier-fmnist-cpu/, docs/results/compare-fmnist-cpu-dpmsolver7/).
    # Cuts to fit a 2-core machine, each said in the report: SCALE up to 20 (one K=20 shard set serves the
    # ablation and real-vs-synthetic; the real-data arm still reaches the full 60k); overparam at one seed, the m_z
    # sweep at n_c = 16 and the n_c sweep to 32 at m_z = 1 and 64, 200 epochs (the conv VAE on one thread, batch
    # 128: 785 / 492 / 244 / 84 images/s at n_c = 8 / 16 / 32 / 64, FC: ~3000); gap curves every 25 epochs for
    # G_r on 20 x 5 images (the paper: every 10, 50 x 10).
    "cpu": StudyPreset(
        name="cpu", subset=1000, dm_preset="small", dm_max_steps=None, sampler="edm-heun", sampler_steps=12,
        epochs=500, eval_every=5, seeds=(0, 1, 2), compare_scale=10, scales=(1, 2, 5, 10, 20),
        budget_minutes=120, batch_size=128,
        # Paper settings for G_g and G_r; G_a and IWAE on subsamples (their full versions take CPU-hours).
        eval=EvalSettings(amortization_images=200, qstar_max_iters=500, iwae_k=1000, iwae_images=500),
        mz_grid=(1, 2, 4, 8, 16, 32, 64), nc_grid=(4, 8, 16, 32), mz_sweep_nc=16, nc_sweep_mz=(1, 64),
        overparam_epochs=200, overparam_seeds=(0,),
        overparam_eval=EvalSettings(amortization_images=100, qstar_max_iters=300, iwae_k=200, iwae_images=200),
        track_robustness_every=25, track_robustness_images=20, track_robustness_seeds=5,
        dm_quality_steps=(200, 400, 700, 1400, 2800),
        cuts="Cut from the paper's sizes to fit a 2-core CPU: |D_train| = 1000 (the paper: 60,000), 500 epochs (1000), "
             "k = 10 in compare (the paper trains on T x N unique samples), SCALE <= 20 in the ablation and "
             "real-vs-synthetic (the paper: up to 1000), G_a on 200 test images with <= 500 q* steps and IWAE "
             "k = 1000 on 500 images (the paper: all of D_test, k = 5000), gap curves every 25 epochs on 20 x 5 "
             "attacks (the paper: every 10, 50 x 10), overparam at one seed on a smaller grid, 200 epochs (the "
             "paper: 3 seeds, m_z to 64 at n_c = 256). The DM is the committed `small` one (the paper: EDM's DDPM++).",
    ),
    # The paper: full training split, 1000 effective epochs, 3 seeds, Heun-18 (the paper prints it), k up to 1000.
    # Table 7 trains DMaaPx on T x N unique samples (Alg. 2: a fresh sample every step, k = the number of epochs):
    # compare_scale = epochs.
    "paper": StudyPreset(
        name="paper", subset=None, dm_preset="paper", dm_max_steps=None, sampler="edm-heun", sampler_steps=18,
        epochs=1000, eval_every=10, seeds=(0, 1, 2), compare_scale=1000, scales=PAPER_SCALES, budget_minutes=None,
        batch_size=128, dm_quality_steps=(10_000, 25_000, 50_000, 100_000, 200_000, 390_625),
    ),
}


def get_study_preset(name: str, **overrides) -> StudyPreset:
    if name not in PRESETS:
        raise VaegenError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def preset_from_record(record: dict) -> StudyPreset:
    """The preset a study.json recorded (fields added since then take their defaults)."""
    base = PRESETS.get(record.get("name"), PRESETS["smoke"])
    known = {f.name: f for f in fields(StudyPreset)}
    values = {}
    for key, value in record.items():
        if key not in known or value is None and key == "eval":
            continue
        if key in ("eval", "overparam_eval") and isinstance(value, dict):
            value = EvalSettings(**value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return replace(base, **values)
