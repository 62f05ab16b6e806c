"""Train p_DM: an EDM-preconditioned diffusers UNet2DModel on D_train. The whole loop is in this file.

    vaegen dm train --dataset fmnist --preset small --out runs/dm/fmnist-small
    accelerate launch -m generator dm train ...            (multi-GPU; the global batch is split over ranks)

Output directory (runs/dm/NAME):
    config.json, diffusion_pytorch_model.safetensors   the EMA UNet (`UNet2DModel.from_pretrained(NAME)`)
    scheduler_config.json                              EDMEulerScheduler: says "EDM preconditioning"
    dm.json                                            dataset, preset, steps, images seen, weights sha256, ...
    samples.png                                        grid of Heun-18 samples of the EMA model
    train_log.jsonl                                    loss, lr, images/s every `log_every` steps
    train_run.json                                     resolved config; command line of every (re)start
    checkpoints/step-NNNNNNN/                          Accelerate state: weights, EMA, optimizer, lr, RNG
    snapshots/step-NNNNNNNN/                           with --snapshot-steps: the EMA model at that step, a DM
                                                       directory of its own (graded DMs from one run)

Resuming is exact: everything random is either a pure function of (seed, step, rank) -- the data order and
the training noise (`vaegen.seeding`) -- or in the checkpoint (dropout RNG, via Accelerate), so killing a run and
resuming it with `--resume` ends with the same weights as an uninterrupted run (bit for bit on CPU). On SIGINT or
SIGTERM the step in flight finishes and a checkpoint is saved before the process exits (130 / 143).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from generator.edm import EDMLoss, edm_scheduler
from generator.presets import DMPreset, get_preset
from vaegen import dmrun
from vaegen.checkpoints import checkpoints, load_checkpoint, save_checkpoint
from vaegen.data import open_dataset
from vaegen.errors import VaegenError
from vaegen.interrupts import StopRequests
from vaegen.launch import launch_state
from vaegen.provenance import (
    append_jsonl,
    fsync_dir,
    read_json,
    read_jsonl,
    refuse_changed_settings,
    run_record,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from vaegen.runlock import run_lock
from vaegen.seeding import derive, numpy_rng, torch_generator
from vaegen.tracking import accelerator_kwargs, check_report_to, finish_trackers, log_values, start_trackers


@dataclass(frozen=True)
class DMTrainConfig:
    dataset: str = "fmnist"
    out: str = "runs/dm/fmnist-tiny"
    preset: str = "tiny"
    subset: int | None = None
    subset_seed: int = 0
    data_root: str = "data"
    max_steps: int | None = None        # None: the preset's; also where the cosine lr schedule ends
    max_minutes: float | None = None    # wall-clock budget of this invocation; stops with a checkpoint
    batch_size: int | None = None       # global batch; None: the preset's
    lr: float | None = None             # None: the preset's
    seed: int = 0
    checkpoint_every: int | None = None  # None: the preset's
    resume: bool = False
    mixed_precision: str = "auto"       # auto = bf16 on GPUs that have it, else full precision
    grid_samples: int = 64              # images in samples.png (Heun-18, seed 0)
    snapshot_steps: tuple[int, ...] = ()  # also export the EMA model at these steps, to snapshots/step-NNNNNNNN/
    report_to: str = "none"             # a tracker (vaegen.tracking.REPORT_TO) that gets the loss log too
    tracker_group: str | None = None    # the tracker's project / experiment (e.g. a study's name)

    def resolved(self) -> DMTrainConfig:
        """The config with every preset-dependent None filled in (what gets recorded)."""
        preset = get_preset(self.preset)
        return replace(self, max_steps=self.max_steps or preset.max_steps,
                       batch_size=self.batch_size or preset.batch_size, lr=self.lr or preset.lr,
                       checkpoint_every=self.checkpoint_every or preset.checkpoint_every)


# Settings that may change between a run and its resumption without changing what the run computes
# (max_steps may grow: the cosine schedule is then re-stretched, which the log records).
# Snapshots only add files (the loop never reads them), so their steps may change too.
RESUMABLE_CHANGES = {"max_minutes", "max_steps", "resume", "checkpoint_every", "grid_samples", "snapshot_steps",
                     "report_to", "tracker_group"}


@dataclass
class TrainState:
    """The loop's own counters, saved in every checkpoint next to Accelerate's state. The loss summed since the
    last log line is among them, so that the first line after a resume averages the same steps as without one."""

    step: int = 0
    images_seen: int = 0
    interval_loss: float = 0.0
    interval_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        # checkpoints from before the loss was saved resume with an empty interval
        self.interval_loss, self.interval_steps = float(state.get("interval_loss", 0.0)), int(state.get("interval_steps", 0))


def load_train_images(config: DMTrainConfig) -> tuple[torch.Tensor, dict]:
    """D_train as floats in [-1, 1] (x = u8 / 127.5 - 1) and the store's provenance attributes."""
    real = open_dataset(config.dataset, "train", config.subset, config.subset_seed, config.data_root)
    images = torch.from_numpy(real.images).float() / 127.5 - 1
    return images, real.attrs


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Rows of the global batch at `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch).

    A pure function of the step, so a resumed run sees exactly the data order of an uninterrupted one.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        permutation = numpy_rng(seed, "dm-data-order", int(epoch)).permutation(n)
        mask = epochs == epoch
        rows[mask] = permutation[positions[mask] % n]
    return rows


def lr_factor(step: int, preset: DMPreset, max_steps: int) -> float:
    """Linear warm-up, then constant (EDM) or cosine decay to zero at max_steps."""
    warmup = min(1.0, (step + 1) / max(preset.lr_warmup_steps, 1))
    if preset.lr_decay == "constant":
        return warmup
    progress = min(1.0, step / max(max_steps, 1))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, images_seen: int, batch_size: int,
               preset: DMPreset) -> None:
    """EDM's EMA: half-life in images, capped at `ema_rampup_ratio` of the images seen so far."""
    halflife = min(preset.ema_halflife_images, images_seen * preset.ema_rampup_ratio)
    beta = 0.5 ** (batch_size / max(halflife, 1e-8))
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1 - beta)


def step_checkpoint(out: Path, step: int) -> Path:
    return dmrun.checkpoint_dir(out) / f"step-{step:08d}"


def check_resumable(out: Path, config: DMTrainConfig) -> None:
    """Refuse to resume with settings that would make the continuation a different run."""
    refuse_changed_settings(read_json(out / dmrun.TRAIN_RUN_NAME)["config"], asdict(config), RESUMABLE_CHANGES,
                            where=f"--resume: {out}", hint="resume with the original settings or choose a new --out")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in read_jsonl(path) if e["step"] <= step))


def save_samples_grid(unet: UNet2DModel, scheduler_config: dict, path: Path, n: int) -> None:
    """A square grid PNG of Heun-18 samples (seed 0, indices 0..n-1) of a trained model."""
    from PIL import Image

    from generator.sampling import DiffusionModel, SamplerConfig, sample

    dm = DiffusionModel(unet, scheduler_config, str(path.parent), sha256="")
    # One chunk of exactly n: a preview needs no padding to a standard chunk size.
    images = sample(dm, range(n), seed=0, config=SamplerConfig(chunk=n), device=unet.device, progress=True)
    Image.fromarray(image_grid(images.numpy())).save(path)


def image_grid(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) uint8 -> one (rows*H, cols*W[, C]) uint8 image, as square as possible."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def export_model(unet: UNet2DModel, out: Path, record: dict, grid_samples: int) -> str:
    """Write the EMA UNet + scheduler config + grid + dm.json into `out`; the weights file goes in last.

    Files are written under a temporary directory and renamed into place; dm.json carries the weights'
    sha256, so a crash between renames leaves a directory `load_dm` rejects rather than a wrong model.
    """
    tmp = out / f".export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp)
    scheduler = edm_scheduler()
    scheduler.save_pretrained(tmp)
    sha256 = sha256_file(tmp / dmrun.WEIGHTS_NAME)
    save_samples_grid(unet, dict(scheduler.config), tmp / dmrun.SAMPLES_NAME, grid_samples)
    dmrun.write_record(tmp, {**record, "weights_sha256": sha256})
    for name in (dmrun.SAMPLES_NAME, "scheduler_config.json", "config.json", dmrun.RECORD_NAME, dmrun.WEIGHTS_NAME):
        os.replace(tmp / name, out / name)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return sha256


def save_snapshot(ema: torch.nn.Module, out: Path, record: dict, grid_samples: int) -> None:
    """Export the EMA model of this step as its own DM directory, leaving training untouched.

    The sample grid runs under a forked RNG, so a run with snapshots trains exactly like one without: the
    snapshot at the last step holds the same bytes as the run's final export.
    """
    directory = dmrun.snapshot_dir(out, record["steps"])
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        export_model(copy.deepcopy(ema).eval(), directory, {**record, "snapshot_of": str(out)}, grid_samples)


def dm_record(config: DMTrainConfig, preset: DMPreset, state: TrainState, ema: torch.nn.Module,
              images: torch.Tensor, data_attrs: dict, seconds_this_run: float, steps_this_run: int) -> dict:
    """dm.json's contents for the EMA model at the current step."""
    return run_record(
        config, dataset=config.dataset, subset=config.subset,
        subset_seed=config.subset_seed if config.subset else None, preset=preset.name,
        preset_config=preset.to_dict(), steps=state.step, images_seen=state.images_seen,
        finished=state.step >= config.max_steps, train_images=len(images),
        image_shape=list(images.shape[1:]), data_sources=data_attrs.get("sources"),
        data_subset=data_attrs.get("subset"), train_seconds_this_run=seconds_this_run,
        steps_this_run=steps_this_run, weights="EMA", parameters=sum(p.numel() for p in ema.parameters()),
        preconditioning="EDM (Karras et al. 2022), sigma_data 0.5, c_noise = ln(sigma)/4",
    )


def train_dm(config: DMTrainConfig) -> Path:
    """Train (or resume) a DM as configured; returns the output directory."""
    with run_lock(config.out, main_process=launch_state().is_main_process):
        return _train(config.resolved())


def _train(config: DMTrainConfig) -> Path:
    from accelerate import Accelerator

    preset = get_preset(config.preset)
    out = Path(config.out)
    existing = checkpoints(dmrun.checkpoint_dir(out), "step-*")
    if config.resume and not existing:
        raise VaegenError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume")
    if not config.resume and (existing or dmrun.read_record(out) is not None):
        raise VaegenError(f"{out} already holds a DM run; pass --resume to continue it or choose another --out")
    if config.resume:
        check_resumable(out, config)

    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    check_report_to(config.report_to)
    accelerator = Accelerator(mixed_precision=mixed_precision, **accelerator_kwargs(config.report_to, out))
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise VaegenError(f"--batch-size {config.batch_size} is not divisible by the {world} processes")
    local_batch = config.batch_size // world

    images, data_attrs = load_train_images(config)
    channels = images.shape[1]
    torch.manual_seed(derive(config.seed, "dm-init"))  # the initial weights
    unet = UNet2DModel(**preset.unet_kwargs(channels))
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=preset.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, preset, config.max_steps))
    # The lr schedule counts global steps, so it is checkpointed but not prepared (a prepared scheduler
    # steps once per process on multi-GPU runs).
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, state, lr_schedule)
    if config.resume:
        load_checkpoint(accelerator, existing[-1])
    scheduler = edm_scheduler()  # preconditioning constants only; nothing in it changes during training
    loss_fn = EDMLoss()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        starts = read_json(out / dmrun.TRAIN_RUN_NAME).get("starts", []) if config.resume else []
        starts.append(run_record(resumed_from_step=state.step if config.resume else None, num_processes=world))
        write_json_atomic(out / dmrun.TRAIN_RUN_NAME,
                          {"config": asdict(config), "preset": preset.to_dict(), "starts": starts})
        truncate_log(out / dmrun.TRAIN_LOG_NAME, state.step)
        start_trackers(accelerator, config.report_to, out, config.tracker_group, asdict(config))
        n_params = sum(p.numel() for p in ema.parameters())
        accelerator.print(f"dm train: {config.dataset} ({len(images)} images), preset {preset.name} "
                          f"({n_params / 1e6:.2f}M parameters), {world} process(es), "
                          f"mixed precision {mixed_precision}, steps {state.step} -> {config.max_steps}")

    start_step, start_time = state.step, time.time()
    deadline = start_time + config.max_minutes * 60 if config.max_minutes else math.inf
    bar = tqdm(total=config.max_steps, initial=state.step, unit="img", unit_scale=config.batch_size,
               disable=not accelerator.is_local_main_process, desc="dm train", dynamic_ncols=True)
    steps_timed, interval_start = 0, time.time()  # images/s counts this process's steps only
    unet.train()
    stops = StopRequests("the current step")  # a signal ends the loop after its step, with a checkpoint
    with stops:
        while state.step < config.max_steps and not stops.agreed(accelerator, time.time() >= deadline):
            rows = batch_indices(state.step, config.batch_size, len(images), config.seed)
            batch = images[rows[rank * local_batch:(rank + 1) * local_batch]].to(accelerator.device)
            noise_rng = torch_generator(config.seed, "dm-train-noise", state.step, rank)
            with accelerator.autocast():
                loss = loss_fn(unet, scheduler, batch, generator=noise_rng)
            accelerator.backward(loss)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.images_seen += config.batch_size
            update_ema(ema, accelerator.unwrap_model(unet), state.images_seen, config.batch_size, preset)
            if state.step in config.snapshot_steps and accelerator.is_main_process:
                save_snapshot(ema, out, dm_record(config, preset, state, ema, images, data_attrs,
                                                  time.time() - start_time, state.step - start_step),
                              config.grid_samples)

            state.interval_loss += loss.item()
            state.interval_steps += 1
            steps_timed += 1
            bar.update(1)
            if state.step % preset.log_every == 0 or state.step == config.max_steps:
                elapsed = time.time() - interval_start
                entry = {"step": state.step, "images_seen": state.images_seen,
                         "loss": state.interval_loss / state.interval_steps, "lr": lr_schedule.get_last_lr()[0],
                         "images_per_s": steps_timed * config.batch_size / max(elapsed, 1e-9),
                         "elapsed_s": time.time() - start_time}
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
                if accelerator.is_main_process:
                    append_jsonl(out / dmrun.TRAIN_LOG_NAME, entry)
                    log_values(accelerator, entry, state.step)
                state.interval_loss, state.interval_steps, steps_timed, interval_start = 0.0, 0, 0, time.time()
            if state.step % config.checkpoint_every == 0:
                save_checkpoint(accelerator, step_checkpoint(out, state.step), prune="step-*", keep=2)
    bar.close()
    if not step_checkpoint(out, state.step).is_dir():
        save_checkpoint(accelerator, step_checkpoint(out, state.step), prune="step-*", keep=2)
    if stops.requested is not None and state.step < config.max_steps:  # stopped by a signal (on some rank)
        raise stops.interrupted(f"checkpoint saved at step {state.step} of {config.max_steps}; "
                                "rerun the same command with --resume to continue")

    if accelerator.is_main_process:
        record = dm_record(config, preset, state, ema, images, data_attrs, time.time() - start_time,
                           state.step - start_step)
        export_model(copy.deepcopy(ema).eval(), out, record, config.grid_samples)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    return out
