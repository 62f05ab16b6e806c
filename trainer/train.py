"""Stage 2: train a VAE on shards of diffusion-model samples (DMaaPx), on real data, or on augmented data.

The loop is `_train` below; the regimes beyond plain ELBO training (RHA, Aug.Mollify, early stopping, gap
tracking) are hooks it calls at named points (trainer/regimes.py). Progress is counted in effective epochs of
N = |D_train| images. Every `eval_every` epochs the mean ELBO on the *real* training set and on the test set goes
to metrics.jsonl; every `checkpoint_every` epochs (and at the end) an Accelerate checkpoint (model, optimizer,
RNG states) plus the epoch number is saved. The data of an epoch, the binarization noise and the
reparameterization noise of every step are functions of (seed, epoch, batch, process) (`vaegen.seeding`), so
resuming from a checkpoint at an epoch boundary continues exactly as if the run had never stopped. On SIGINT or
SIGTERM the epoch in flight finishes and is checkpointed before the process exits (130 / 143); a second signal
abandons it at once.

Output directory (runs/vae/NAME):
    config.json          the resolved TrainConfig, the model config, N, the shard pool, provenance
    metrics.jsonl        one line per evaluation: epoch, images, train_elbo, test_elbo, generalization_gap, ...
    checkpoint/          the latest Accelerate checkpoint + trainer_state.json (the epoch to resume at)
    model.json, model.safetensors   the final model (trainer.models.save_vae), written at the end
    done.json            completion marker, written last; studies skip runs that have it

Hyperparameters the paper leaves unstated (see README, "Trainer"): Adam with betas (0.9, 0.999), no weight
decay, constant learning rate 1e-3 for the FC VAE and 2e-4 for the conv VAE, batch 128 per process, no gradient
clipping, no learning-rate schedule, no early stopping, one reparameterization sample per image.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from trainer.augment import OUTPUTS as AUGMENT_OUTPUTS
from trainer.augment import Augmenter, augmentation_ops
from trainer.data import (
    BatchSource,
    MixedSource,
    RealSource,
    ResidentPool,
    ShardSource,
    keep_pool_on_device,
    open_shard_pool,
)
from trainer.likelihoods import DEFAULT_N_MIX, DEFAULT_SIGMA, LIKELIHOOD_CLASSES
from trainer.models import VAE, build_vae, save_vae
from trainer.regimes import (
    EarlyStopping,
    GapTracking,
    Mollification,
    Regime,
    Regimes,
    ReverseHalfAsleep,
    TrackerLogging,
)
from trainer.regularizers import MollifySchedule, validation_split
from vaegen.checkpoints import load_checkpoint, resume_point, save_checkpoint
from vaegen.data import get_spec, open_dataset
from vaegen.errors import VaegenError
from vaegen.interrupts import StopRequests, set_resume_hint
from vaegen.launch import launch_state
from vaegen.provenance import (
    append_jsonl,
    read_json,
    read_jsonl,
    refuse_changed_settings,
    run_record,
    write_json_atomic,
    write_text_atomic,
)
from vaegen.runlock import run_lock
from vaegen.seeding import SPLIT, derive, numpy_rng, torch_generator
from vaegen.tracking import accelerator_kwargs
from vaegen.vaerun import CONFIG_NAME, DONE_NAME, METRICS_NAME

DEFAULT_LR = {"fc": 1e-3, "conv": 2e-4}
CHECKPOINT, STATE_NAME = "checkpoint", "trainer_state.json"  # vaegen/checkpoints.py: replaced at every save


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    out: str
    source: str = "shards"  # shards | real
    shards: str | None = None  # a shard run directory or a brace pattern of shard paths
    subset: int | None = None  # D_train is the store data/<dataset>-n<subset>-s<subset_seed>.zarr
    subset_seed: int = 0
    data_root: str = "data"
    scale: int | None = None  # pool = first scale*N shard samples (default: all whole epochs in the run)
    augment: str | None = None  # naive | tuned: the real data (with --mix-real: the real part) is augmented
    augment_p: float = 0.1  # the paper's b (0.1 or 0.12)
    augment_sigma_reading: str = "std"  # "2^sigma, sigma in [0, s]": log2 factor ~ N(0, s^2) | per-image U(0, s)
    augment_flip_reading: str = "ada"  # an applied flip mirrors with probability 1/2 (ADA) | always
    augment_output: str = "uint8"  # rounded and clamped like a stored image | float: unclamped (StyleGAN2-ADA)
    mix_real: float = 0.0  # fraction of every epoch drawn from D_train when training on shards
    epochs: int = 1000
    seed: int = 0
    arch: str | None = None  # default: fc for 1-channel datasets, conv for cifar10
    likelihood: str | None = None  # default: the dataset's (store attrs)
    sigma: float = DEFAULT_SIGMA
    n_mix: int = DEFAULT_N_MIX
    mz: int = 1
    nc: int = 256
    batch_size: int = 128  # per process
    lr: float | None = None  # default: DEFAULT_LR[arch]
    eval_every: int = 10
    eval_images: int | None = None  # cap on real train/test images per evaluation (default: all)
    eval_batch_size: int = 500
    checkpoint_every: int = 10
    bf16: bool = False
    pool_on_device: str = "auto"  # keep the decoded shard pool on the device: auto | on | off (same batches)
    report_to: str = "none"  # experiment tracker (vaegen/tracking.py): none | tensorboard | wandb | mlflow
    tracker_group: str | None = None  # the tracker's project / experiment grouping runs (a study); default vaegen
    resume: bool = False
    # --- beyond plain ELBO training on the chosen data (trainer/regularizers.py) ---
    epoch_size: int | None = None  # images per effective epoch (default |D_train|): k*N real images at N's compute
    weight_decay: float = 0.0  # > 0: AdamW's decoupled weight decay (Adam when 0)
    mollify: bool = False  # Aug.Mollify: annealed Gaussian input noise over the first `mollify_epochs`
    mollify_epochs: int | None = None  # default: half of --epochs (the paper)
    rha: bool = False  # Reverse Half Asleep: from `rha_start_epoch`, encoder-only training on model samples
    rha_start_epoch: int | None = None  # default: half of --epochs (the paper)
    early_stopping_split: float = 0.0  # > 0: hold out this fraction of D_train and stop on its ELBO
    early_stopping_patience: int = 10  # evaluations (every --eval-every epochs) without a better validation ELBO
    # --- gap curves: model snapshots the evaluator measures (vaegen-eval -> eval/gap_curves.jsonl) ---
    track_gaps: bool = False
    track_amortization_every: int = 100  # the paper's interval for G_a
    track_robustness_every: int = 10  # the paper's interval for G_r
    track_amortization_images: int = 100
    track_robustness_images: int = 50
    track_robustness_seeds: int = 10


# Keys of config.json that may differ between a run and its resumption: the flag itself, where the pool is kept
# (the batches are the same), where progress is shown, and the description of the data source (the generator may add shards and
# rewrite generation.json; only the pool size matters).
RUN_CONTROL_KEYS = ("resume", "pool_on_device", "report_to", "tracker_group", "data")
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def resolve_train_config(cfg: TrainConfig, store_attrs: dict) -> TrainConfig:
    """Fill in the per-dataset defaults and refuse contradictory options."""
    if cfg.source not in ("shards", "real"):
        raise VaegenError(f"--source must be shards or real, got {cfg.source!r}")
    if cfg.source == "shards" and not cfg.shards:
        raise VaegenError("training on shards needs --shards RUN_DIR or a shard pattern (or use --source real)")
    if cfg.source == "real" and (cfg.shards or cfg.mix_real or cfg.scale):
        raise VaegenError("--source real trains on D_train only; --shards/--mix-real/--scale need --source shards")
    if cfg.augment and cfg.source != "real" and not cfg.mix_real:
        raise VaegenError("--augment augments real data; use it with --source real or with --mix-real")
    if cfg.early_stopping_split and cfg.source != "real":
        raise VaegenError("--early-stopping-split holds out real training images; use it with --source real "
                          "(a DM trained on D_train has seen them)")
    if cfg.epoch_size and cfg.source != "real":
        raise VaegenError("--epoch-size applies to --source real (a shard pool's epoch is always N images)")
    if not 0 <= cfg.early_stopping_split < 1:
        raise VaegenError(f"--early-stopping-split must be in [0, 1), got {cfg.early_stopping_split}")
    half = max(1, cfg.epochs // 2)
    rha_start = cfg.rha_start_epoch if cfg.rha_start_epoch is not None else half
    mollify_epochs = cfg.mollify_epochs if cfg.mollify_epochs is not None else half
    if cfg.rha and not 0 <= rha_start < cfg.epochs:
        raise VaegenError(f"--rha-start-epoch must be in 0..{cfg.epochs - 1}, got {rha_start}")
    if cfg.mollify and not 0 < mollify_epochs <= cfg.epochs:
        raise VaegenError(f"--mollify-epochs must be in 1..{cfg.epochs}, got {mollify_epochs}")
    arch = cfg.arch or ("conv" if store_attrs.get("channels", 1) == 3 else "fc")
    likelihood = cfg.likelihood or store_attrs.get("likelihood") or get_spec(cfg.dataset).likelihood
    if cfg.augment_output not in AUGMENT_OUTPUTS:
        raise VaegenError(f"--augment-output must be one of {', '.join(AUGMENT_OUTPUTS)}, got {cfg.augment_output!r}")
    if cfg.augment_output == "float" and not (cfg.augment and LIKELIHOOD_CLASSES[likelihood].continuous):
        raise VaegenError(f"--augment-output float feeds unclamped, unrounded pixels to the VAE: it needs --augment and "
                          f"a Gaussian likelihood (the {likelihood} likelihood scores only levels in [0, 1])")
    return dataclasses.replace(
        cfg, arch=arch, likelihood=likelihood,
        lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[arch],
        rha_start_epoch=rha_start if cfg.rha else None, mollify_epochs=mollify_epochs if cfg.mollify else None)


def model_config(cfg: TrainConfig, channels: int) -> dict:
    config = {"arch": cfg.arch, "channels": channels, "image_size": 32, "likelihood": cfg.likelihood,
              "dataset": cfg.dataset}
    if cfg.likelihood == "gaussian":
        config["sigma"] = cfg.sigma
    if cfg.likelihood == "dmol":
        config["n_mix"] = cfg.n_mix
    if cfg.arch == "conv":
        config.update(m_z=cfg.mz, n_c=cfg.nc)
    return config


def build_source(cfg: TrainConfig, train_images: np.ndarray, rank: int, world_size: int, device) -> tuple[BatchSource, dict]:
    """The batch source for this process and a description of it for config.json."""
    image_shape = tuple(train_images.shape[1:])
    n = len(train_images)
    augmenter = None
    if cfg.augment:
        augmenter = Augmenter(augmentation_ops(cfg.augment, cfg.dataset, image_shape[0]), cfg.augment_p,
                              image_shape[1], cfg.augment_sigma_reading, cfg.augment_flip_reading, cfg.augment_output)
    if cfg.source == "real":
        source = RealSource(train_images, cfg.batch_size, cfg.seed, rank, world_size, cfg.epoch_size, augmenter,
                            device)
        if augmenter is None:
            return source, {"kind": "real", "epoch_size": source.epoch_size}
        return source, {"kind": "real+augment", "augment": cfg.augment, "epoch_size": source.epoch_size,
                        "augmentation": augmenter.describe()}
    pool = open_shard_pool(cfg.shards, cfg.dataset, image_shape, n, cfg.scale)
    on_device = keep_pool_on_device(cfg.pool_on_device, pool, image_shape, device,
                                    images_streamed=cfg.epochs * (n - round(cfg.mix_real * n)))
    resident = ResidentPool(pool, image_shape, device) if on_device else None
    described = {"kind": "shards", "run_dir": str(pool.run_dir), "pool_size": pool.size, "scale": pool.size // n,
                 "shards_used": len(pool.shards), "generation": pool.generation, "pool_on_device": on_device}
    if pool.generation.get("n_train") not in (None, n) and rank == 0:
        click.echo(f"note: the shards' DM was trained on N={pool.generation.get('n_train')} images, "
                   f"this VAE's D_train has N={n}", err=True)
    if cfg.mix_real:
        described.update(kind="mixed", real_fraction=cfg.mix_real)
        if augmenter is not None:
            described.update(augment=cfg.augment, augmentation=augmenter.describe(), augmented="the real part")
        return MixedSource(train_images, pool, cfg.mix_real, cfg.batch_size, cfg.seed, rank, world_size,
                           image_shape, augmenter, device, resident), described
    return ShardSource(pool, n, cfg.batch_size, cfg.seed, rank, world_size, image_shape, resident=resident), described


@torch.no_grad()
def mean_elbo(vae: VAE, images: np.ndarray, split: str, accelerator: Accelerator, batch_size: int,
              seed: int) -> float:
    """Mean ELBO (nats per image) over `images`, split across processes; the same noise at every evaluation,
    so successive points of a run differ only by the model."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = images[rank::world]
    for i in range(0, len(mine), batch_size):
        batch = torch.from_numpy(mine[i:i + batch_size]).to(device)
        x = vae.preprocess(batch, torch_generator(seed, "vae-log-binarize", SPLIT[split], rank, i, device=device))
        elbo = vae.elbo(x, 1, torch_generator(seed, "vae-log-reparam", SPLIT[split], rank, i, device=device))
        total += torch.stack([elbo.double().sum(), torch.tensor(float(len(elbo)), device=total.device)])
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


def eval_subset(images: np.ndarray, split: str, cap: int | None, seed: int) -> np.ndarray:
    """The real images evaluated every time: all of them, or a fixed seeded sample of `cap`."""
    if cap is None or cap >= len(images):
        return images
    keep = np.sort(numpy_rng(seed, "vae-log-subsample", SPLIT[split]).permutation(len(images))[:cap])
    return images[keep]


def prepare_out_dir(cfg: TrainConfig, saved: dict) -> int:
    """Check --out against --resume; returns the epoch to start from (from the checkpoint, if any)."""
    out = Path(cfg.out)
    if (out / DONE_NAME).exists() and not cfg.resume:
        raise VaegenError(f"{out} holds a finished run (done.json); choose another --out")
    if (out / CONFIG_NAME).exists():
        if not cfg.resume:
            raise VaegenError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --out")
        previous = read_json(out / CONFIG_NAME)
        # A setting newer than the run is absent from its config.json; its default is what the run did.
        settings = {k: v for k, v in saved.items() if k != "data"}
        settings["shard pool size"] = saved["data"].get("pool_size")
        refuse_changed_settings({**previous, "shard pool size": previous.get("data", {}).get("pool_size")}, settings,
                                RUN_CONTROL_KEYS, TRAIN_DEFAULTS, where=str(out),
                                hint="resume with the same options or choose another --out")
        checkpoint = resume_point(out / CHECKPOINT)
        return read_json(checkpoint / STATE_NAME)["epoch"] if checkpoint else 0
    if out.exists() and any(out.iterdir()):
        raise VaegenError(f"{out} exists and is not a training run directory; choose another --out")
    return 0


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in read_jsonl(path) if m["epoch"] <= epoch))


def train(cfg: TrainConfig) -> Path:
    """Train one VAE; returns the run directory. All input checks happen before the first step."""
    set_resume_hint("rerun the same command with --resume to continue from the last checkpoint")
    with run_lock(cfg.out, main_process=launch_state().is_main_process):
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    # --- inputs: D_train, D_test, the data source, the model; nothing is written before they all check out --
    train_real = open_dataset(cfg.dataset, "train", cfg.subset, cfg.subset_seed, cfg.data_root)
    test_real = open_dataset(cfg.dataset, "test", cfg.subset, cfg.subset_seed, cfg.data_root)
    cfg = resolve_train_config(cfg, train_real.attrs)
    out = Path(cfg.out)
    if cfg.resume and (out / DONE_NAME).exists():
        click.echo(f"{out} already finished (done.json); nothing to resume", err=True)
        return out
    train_images, validation = split_validation(cfg, train_real.images)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", **accelerator_kwargs(cfg.report_to, out))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    source, source_info = build_source(cfg, train_images, rank, world, device)
    vae_config = model_config(cfg, train_images.shape[1])
    torch.manual_seed(derive(cfg.seed, "vae-init"))
    vae = build_vae(vae_config)

    def evaluate(images: np.ndarray, split: str) -> float:  # the mean ELBO the metrics and regimes log
        return mean_elbo(vae, images, split, accelerator, cfg.eval_batch_size, cfg.seed)

    regimes = build_regimes(cfg, vae, source, validation, evaluate, accelerator)
    saved = {**dataclasses.asdict(cfg), "model": vae_config, "n_train": len(train_images),
             "n_test": len(test_real.images), "num_processes": world, "data": source_info,
             "optimizer": "AdamW" if cfg.weight_decay else "Adam", **regimes.describe()}
    start_epoch = prepare_out_dir(cfg, saved)
    accelerator.wait_for_everyone()

    # --- optimizer, resume --------------------------------------------------------------------------------
    optimizer = (torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay
                 else torch.optim.Adam(vae.parameters(), lr=cfg.lr))
    model, optimizer = accelerator.prepare(vae, optimizer)
    step = resume_state(accelerator, out, regimes) if start_epoch > 0 else 0
    if accelerator.is_main_process:
        start_run_dir(out, start_epoch, saved)
    regimes.on_start(saved)
    train_eval = eval_subset(train_images, "train", cfg.eval_images, cfg.seed)
    test_eval = eval_subset(test_real.images, "test", cfg.eval_images, cfg.seed)
    images_per_epoch = [source.share_size(e) * world for e in range(cfg.epochs)]
    bar = tqdm(total=sum(images_per_epoch), initial=sum(images_per_epoch[:start_epoch]), unit="img", unit_scale=True,
               dynamic_ncols=True, disable=not accelerator.is_local_main_process, desc=f"train {out.name}")
    started, metrics, done = time.monotonic(), {}, start_epoch

    # --- the loop; a signal ends the run after the current epoch, with a checkpoint -------------------------
    with StopRequests("this epoch") as stops, closing(source), closing(bar):
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            inputs = regimes.epoch_inputs(epoch) or data_inputs(vae, source, regimes, cfg.seed, epoch, rank,
                                                                device, first_step=step)
            elbo_sum = torch.zeros((), dtype=torch.float64, device=device)
            for b, x in enumerate(inputs):
                elbo = model(x, 1, torch_generator(cfg.seed, "vae-reparam", epoch, rank, b, device=device))
                loss = -elbo.float().mean()
                accelerator.backward(loss)
                regimes.after_backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elbo_sum += elbo.detach().double().sum()
                bar.update(len(x) * world)
                if b % 50 == 0:
                    bar.set_postfix(epoch=epoch + 1, elbo=f"{-loss.item():.1f}",
                                    test=f"{metrics.get('test_elbo', float('nan')):.1f}", refresh=False)
            batch_elbo = accelerator.reduce(elbo_sum, reduction="sum").item() / images_per_epoch[epoch]
            if not math.isfinite(batch_elbo):
                raise VaegenError(f"the training loss became {batch_elbo} in epoch {epoch + 1}; stopped, the last "
                                  f"good checkpoint in {out / CHECKPOINT} is kept (try a lower --lr)")

            done = epoch + 1
            if done % cfg.eval_every == 0 or done == cfg.epochs:
                model.eval()
                metrics = {"epoch": done, "step": step, "images": sum(images_per_epoch[:done]),
                           **real_elbos(evaluate, train_eval, test_eval), "batch_elbo": batch_elbo,
                           "seconds": round(time.monotonic() - started, 2)}
                regimes.on_evaluation(metrics)
                if accelerator.is_main_process:
                    append_jsonl(out / METRICS_NAME, metrics)
                bar.set_postfix(epoch=done, elbo=f"{batch_elbo:.1f}", test=f"{metrics['test_elbo']:.1f}")
            stop_early = regimes.should_stop()
            regimes.on_epoch_end(done, last=done == cfg.epochs or stop_early)
            interrupted = stops.agreed(accelerator) and done < cfg.epochs and not stop_early
            if done % cfg.checkpoint_every == 0 or done == cfg.epochs or interrupted or stop_early:
                save_checkpoint(accelerator, out / CHECKPOINT, {"epoch": done, "step": step, **regimes.state_dict()},
                                STATE_NAME)
            if interrupted:
                raise stops.interrupted(f"checkpoint saved after epoch {done} of {cfg.epochs}; rerun the same "
                                        "command with --resume to continue")
            if stop_early:
                break

    if accelerator.is_main_process:
        finish_run(vae, out, regimes, {"epochs": done, "steps": step, "final": metrics})
    accelerator.wait_for_everyone()
    return out


def real_elbos(evaluate, train_images: np.ndarray, test_images: np.ndarray) -> dict:
    train_elbo, test_elbo = evaluate(train_images, "train"), evaluate(test_images, "test")
    return {"train_elbo": train_elbo, "test_elbo": test_elbo, "generalization_gap": train_elbo - test_elbo}


def data_inputs(vae: VAE, source: BatchSource, regimes: Regime, seed: int, epoch: int, rank: int, device,
                first_step: int):
    """The epoch's data batches as model inputs: on the device, binarized (Bernoulli models), then through
    the regimes' `on_data_input` (optimizer step `first_step + b` for batch b)."""
    for b, images in enumerate(source.batches(epoch)):
        images = images.to(device, non_blocking=True)
        if images.is_floating_point():  # --augment-output float: already model inputs, unrounded
            x = images
        else:
            x = vae.preprocess(images, torch_generator(seed, "vae-binarize", epoch, rank, b, device=device))
        yield regimes.on_data_input(x, epoch, b, first_step + b)


def build_regimes(cfg: TrainConfig, vae: VAE, source: BatchSource, validation: dict | None, evaluate,
                  accelerator: Accelerator) -> Regimes:
    """The regimes the config asks for, in the order the loop calls them."""
    device, rank, is_main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    regimes: list[Regime] = []
    if cfg.rha:
        regimes.append(ReverseHalfAsleep(vae, cfg.rha_start_epoch, cfg.batch_size, source.share_size, cfg.seed,
                                         rank, device))
    if cfg.mollify:
        schedule = MollifySchedule(cfg.mollify_epochs * source.batches_in_epoch(0))
        regimes.append(Mollification(schedule, cfg.seed, rank, device, clamp=not vae.likelihood.continuous))
    if validation is not None:
        regimes.append(EarlyStopping(vae, validation["images"], validation["describe"], cfg.early_stopping_patience,
                                     evaluate, Path(cfg.out), is_main))
    if cfg.track_gaps:
        regimes.append(GapTracking(vae, Path(cfg.out), cfg.track_amortization_every, cfg.track_robustness_every,
                                   is_main))
    if cfg.report_to != "none":
        regimes.append(TrackerLogging(accelerator, cfg.report_to, Path(cfg.out), cfg.tracker_group))
    return Regimes(regimes)


def split_validation(cfg: TrainConfig, images: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """D_train without early stopping's held-out rows, and those rows (images + their config.json entry)."""
    if not cfg.early_stopping_split:
        return images, None
    kept, held_out = validation_split(len(images), cfg.early_stopping_split, cfg.seed)
    describe = {"fraction": cfg.early_stopping_split, "n": len(held_out), "indices": held_out.tolist()}
    return images[kept], {"images": images[held_out], "describe": describe}


def resume_state(accelerator: Accelerator, out: Path, regimes: Regime) -> int:
    """Load the latest checkpoint into the prepared model/optimizer and the regimes; returns the step count."""
    state = load_checkpoint(accelerator, resume_point(out / CHECKPOINT), STATE_NAME)
    regimes.load_state_dict(state)
    return state["step"]


def finish_run(vae: VAE, out: Path, regimes: Regime, record: dict) -> None:
    """The final model, then done.json; the regimes may change both (early stopping keeps the best model)."""
    regimes.on_finish(record)
    save_vae(vae, out)
    write_json_atomic(out / DONE_NAME, run_record(**record))


def start_run_dir(out: Path, start_epoch: int, saved: dict) -> None:
    """config.json (with provenance), and metrics.jsonl without the lines after the epoch we resume from."""
    out.mkdir(parents=True, exist_ok=True)
    truncate_metrics(out / METRICS_NAME, start_epoch)
    write_json_atomic(out / CONFIG_NAME, {**saved, "run_record": run_record()})
