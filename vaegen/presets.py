"""Where a study runs: `demo` (minutes on a laptop), `cpu` (a few hours per study on 2 cores) and `paper` (the
paper's protocol, for GPUs). Each is plain data; `vaegen study ... --preset NAME` prints and saves it.

Every setting the paper prints is the `paper` preset's; the `cpu` preset shrinks sizes (|D_train|, epochs,
grids, evaluation subsamples), never the protocol. Where a `cpu` choice rests on a measurement, the comment says
which (docs/results/ holds the reports).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

# The paper's grids (§5.4-5.7). m_z: 1, 2, 4, 6, ..., 32, 36, 40, ..., 64 (25 values). n_c: 16 values in 1..512
# (the paper does not list them; ours include every n_c of its Fig. 8 parameter counts: 64, 128, 192, 256, 384,
# 448, 512).
PAPER_MZ = (1, 2, *range(4, 33, 2), *range(36, 65, 4))
PAPER_NC = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
PAPER_SCALES = (1, 2, 5, 10, 20, 50, 100, 250, 500, 750, 1000)


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
    scales: tuple[int, ...]       # sample-size ablation
    budget_minutes: float | None  # a study stops starting new runs past this (None: no limit)
    batch_size: int               # VAE batch size
    eval_args: tuple[str, ...]    # extra `vaegen eval` options (the evaluator's defaults are the paper's)
    # appendix B.7-B.8
    mix_fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # share of real data; 1.0 is Normal
    dm_subset_fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    # overparameterization (§5.5-5.7): the conv VAE
    mz_grid: tuple[int, ...] = PAPER_MZ       # swept at n_c = mz_sweep_nc
    nc_grid: tuple[int, ...] = PAPER_NC       # swept at each m_z of nc_sweep_mz
    mz_sweep_nc: int = 256
    nc_sweep_mz: tuple[int, ...] = (1, 2, 8, 64)
    overparam_epochs: int | None = None       # None: `epochs`
    overparam_eval_args: tuple[str, ...] = ()
    # gap curves during training (§5.2): the paper's intervals
    track_amortization_every: int = 100
    track_robustness_every: int = 10
    track_amortization_images: int = 100
    track_robustness_images: int = 50
    track_robustness_seeds: int = 10
    # beyond the paper
    dm_quality_steps: tuple[int, ...] = ()    # DM training budgets (steps) of graded quality; () = the preset's
    real_scales: tuple[int, ...] = (1, 2, 5, 10, 20, 60)  # k*N real images (FashionMNIST has 60k)
    weight_decays: tuple[float, ...] = (0.01, 0.1, 1.0)  # AdamW: per-step shrink lr * wd
    early_stopping_split: float = 0.1
    early_stopping_patience: int = 10

    @property
    def overparam_vae_epochs(self) -> int:
        return self.overparam_epochs or self.epochs


# Settings whose change only adds or removes runs (each run's own settings are in its name and config), so a
# study directory may be resumed with other values of these.
FREE_FIELDS = ("seeds", "scales", "budget_minutes", "mix_fractions", "dm_subset_fractions", "mz_grid", "nc_grid",
               "nc_sweep_mz", "dm_quality_steps", "real_scales", "weight_decays")

PRESETS = {
    # The whole pipeline in minutes on 2 CPU cores: a 200-image subset, the tiny DM sampled with few steps,
    # batch 32 so that 100 epochs of 200 images are still 700 steps. A pipeline check, not a result: its sampler
    # is not frontier-chosen (no frontier was run on the tiny DM).
    "demo": StudyPreset(
        name="demo", subset=200, dm_preset="tiny", dm_max_steps=None, sampler="edm-heun", sampler_steps=6,
        epochs=100, eval_every=5, seeds=(0,), compare_scale=5, scales=(1, 2, 5), budget_minutes=None,
        batch_size=32, eval_args=("--quick", "--qstar-max-iters", "100"), mix_fractions=(0.0, 0.5, 1.0),
        dm_subset_fractions=(0.5, 1.0), mz_grid=(1, 2), nc_grid=(8, 16), mz_sweep_nc=16, nc_sweep_mz=(1, 2),
        overparam_eval_args=("--quick", "--qstar-max-iters", "50", "--iwae-k", "20"),
        track_amortization_every=50, track_robustness_every=25, track_amortization_images=20,
        track_robustness_images=5, track_robustness_seeds=2, dm_quality_steps=(50, 150), real_scales=(1, 2),
        weight_decays=(1e-2,), early_stopping_patience=4,
    ),
    # FashionMNIST subset of 1000 (the small-data regime where normal training overfits hard); the `small` DM;
    # a two-hour budget per invocation for the ablation.
    # Sampler: EDM Heun, 12 steps (23 network evaluations per image). `vaegen dm frontier` on this preset's DM
    # (docs/results/frontier-fmnist-cpu/: 5 samplers x NFE 5-35, 512 images x 3 seeds per point) puts Heun-12
    # within Heun-18's noise on FD, precision, recall and C2ST (3.13, 0.857, 0.812, 0.683 against 2.94, 0.865,
    # 0.805, 0.673). Its cheapest in-band point, DPM-Solver++ at 7 steps, makes the K=10 shards 3.35x faster
    # (8.9 vs 30.0 min), but it is not used here: the same compare study's DMaaPx VAEs trained on it have a
    # robustness gap of 0.235 +- 0.012 against 0.15 on Heun-12 samples (docs/results/compare-fmnist-cpu/), so
    # sample scores within noise did not mean the same downstream result.
    "cpu": StudyPreset(
        name="cpu", subset=1000, dm_preset="small", dm_max_steps=None, sampler="edm-heun", sampler_steps=12,
        epochs=500, eval_every=5, seeds=(0, 1, 2), compare_scale=10, scales=(1, 2, 5, 10, 20, 50, 100),
        budget_minutes=120, batch_size=128,
        # Paper settings for G_g and G_r; G_a and IWAE on subsamples (their full versions take CPU-hours).
        eval_args=("--amortization-images", "200", "--qstar-max-iters", "500", "--iwae-k", "1000",
                   "--iwae-images", "500"),
        # The conv VAE on one thread of the 2-core machine, batch 128: 785 / 492 / 244 / 84 images/s at n_c = 8 /
        # 16 / 32 / 64 (FC: ~3000), i.e. 4 / 7 / 14 / 40 min per 200-epoch run. So the m_z sweep runs at n_c = 16,
        # the n_c sweep stops at 32 and runs at m_z = 1 and 64 (the two ends of the paper's trajectory), 200 epochs,
        # one seed: about two hours with 2 jobs.
        mz_grid=(1, 2, 4, 8, 16, 32, 64), nc_grid=(4, 8, 16, 32), mz_sweep_nc=16, nc_sweep_mz=(1, 64),
        overparam_epochs=200,
        overparam_eval_args=("--amortization-images", "100", "--qstar-max-iters", "300", "--iwae-k", "200",
                             "--iwae-images", "200"),
        # Gap curves every 25 epochs for G_r (the paper: 10) and 100 for G_a, on 20 x 5 and 100 images.
        track_robustness_every=25, track_robustness_images=20, track_robustness_seeds=5,
        dm_quality_steps=(200, 400, 700, 1400, 2800),
    ),
    # The paper: full training split, 1000 effective epochs, 3 seeds, Heun-18 (the paper prints it), k up to 1000.
    "paper": StudyPreset(
        name="paper", subset=None, dm_preset="paper", dm_max_steps=None, sampler="edm-heun", sampler_steps=18,
        epochs=1000, eval_every=10, seeds=(0, 1, 2), compare_scale=10, scales=PAPER_SCALES, budget_minutes=None,
        batch_size=128, eval_args=(),
        dm_quality_steps=(10_000, 25_000, 50_000, 100_000, 200_000, 390_625),
    ),
}


def get_preset(name: str, **overrides) -> StudyPreset:
    from vaegen.errors import VaegenError

    if name not in PRESETS:
        raise VaegenError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def preset_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(StudyPreset))
