"""`vaegen dm train|sample|score`: thin click shells over `train`, `sample_grid` and `score`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from generator.presets import PRESETS
from generator.sampling import SAMPLERS, SamplerConfig
from vaegen.data import DATASETS
from vaegen.errors import VaegenError

SETTINGS = {"show_default": True}


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads. On a shared machine fewer threads than cores can be many times faster:
    OpenMP threads spin-wait for each other when another process holds a core."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VaegenError(f"--device {device} but no CUDA device is visible; use --device cpu")
    return device


def sampler_options(f):
    """--sampler/--steps/--seed/--chunk, shared by `dm sample` and `dm score`."""
    f = click.option("--chunk", default=64, type=click.IntRange(min=1),
                     help="Images per network call (fixed, so an image never depends on its batch).")(f)
    f = click.option("--seed", default=0, type=int, help="Sample i's noise comes from a generator seeded by "
                     "(seed, i).")(f)
    f = click.option("--steps", default=18, type=click.IntRange(min=1),
                     help="Sampler steps (edm-heun: 2*steps-1 network evaluations).")(f)
    f = click.option("--sampler", default="edm-heun", type=click.Choice(SAMPLERS), help="Sampler.")(f)
    return f


device_option = click.option("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
threads_option = click.option("--threads", default=None, type=click.IntRange(min=1),
                              help="torch CPU threads (default: torch's choice).")


@click.group(context_settings=SETTINGS)
def dm():
    """Train, sample and score the diffusion model p_DM."""


@dm.command(context_settings=SETTINGS)
@click.option("--dataset", default="fmnist", type=click.Choice(list(DATASETS)), help="Dataset (data/<name>.zarr).")
@click.option("--subset", default=None, type=click.IntRange(min=1), help="Train on data/<ds>-n<N>-s<S>.zarr.")
@click.option("--subset-seed", default=0, type=int, help="Seed S of the subset store.")
@click.option("--data-root", default="data", type=click.Path(file_okay=False), help="Where the stores are.")
@click.option("--preset", default="tiny", type=click.Choice(list(PRESETS)), help="Network and recipe.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: runs/dm/<dataset>[-n<N>-s<S>]-<preset>].")
@click.option("--max-steps", default=None, type=click.IntRange(min=1),
              help="Total optimizer steps; the cosine lr schedule ends here [default: the preset's].")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock budget of this invocation; stops with a checkpoint (resume later).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Global batch [default: preset's].")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW lr "
              "[default: preset's].")
@click.option("--seed", default=0, type=int, help="Seed of weights, data order and training noise.")
@click.option("--checkpoint-every", default=None, type=click.IntRange(min=1),
              help="Steps between checkpoints [default: preset's].")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--mixed-precision", default="auto", type=click.Choice(["auto", "no", "bf16", "fp16"]),
              help="auto: bf16 on GPUs that support it, else none.")
@click.option("--grid-samples", default=64, type=click.IntRange(min=1), help="Images in samples.png.")
@threads_option
def train(dataset, subset, subset_seed, data_root, preset, out, max_steps, max_minutes, batch_size, lr, seed,
          checkpoint_every, resume, mixed_precision, grid_samples, threads):
    """Train an EDM diffusion model on D_train (resumable; output in diffusers format)."""
    from generator.train_dm import TrainConfig
    from generator.train_dm import train as train_dm

    set_threads(threads)
    if out is None:
        name = dataset + (f"-n{subset}-s{subset_seed}" if subset else "")
        out = os.path.join("runs", "dm", f"{name}-{preset}")
    config = TrainConfig(dataset=dataset, out=out, preset=preset, subset=subset, subset_seed=subset_seed,
                         data_root=data_root, max_steps=max_steps, max_minutes=max_minutes,
                         batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                         resume=resume, mixed_precision=mixed_precision, grid_samples=grid_samples)
    click.echo(str(train_dm(config)))


@dataclass(frozen=True)
class SampleGridConfig:
    dm: str
    out: str = "grid.png"
    n: int = 64
    seed: int = 0
    sampler: SamplerConfig = SamplerConfig()
    device: str = "cpu"


def sample_grid(config: SampleGridConfig) -> Path:
    """Sample images 0..n-1 and write them as one grid PNG (plus <out>.json saying how)."""
    from PIL import Image

    from generator.sampling import load_dm, sample, sampler_record
    from generator.train_dm import image_grid
    from vaegen.provenance import run_record, write_json_atomic

    model = load_dm(config.dm, config.device)
    images = sample(model, range(config.n), config.seed, config.sampler, config.device, progress=True)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    Image.fromarray(image_grid(images.numpy())).save(tmp)
    os.replace(tmp, out)
    write_json_atomic(out.with_name(out.name + ".json"),
                      run_record(config, **sampler_record(model, config.sampler, config.seed)))
    return out


@dm.command(context_settings=SETTINGS)
@click.option("--dm", "dm_path", required=True, help="DM directory (ours, a diffusers UNet or pipeline dir).")
@click.option("--n", default=64, type=click.IntRange(min=1), help="Number of images.")
@click.option("--out", default="grid.png", type=click.Path(dir_okay=False), help="Grid PNG to write.")
@sampler_options
@device_option
@threads_option
def sample(dm_path, n, out, sampler, steps, seed, chunk, device, threads):
    """Sample a grid of images from a DM."""
    set_threads(threads)
    config = SampleGridConfig(dm=dm_path, out=out, n=n, seed=seed, device=resolve_device(device),
                              sampler=SamplerConfig(name=sampler, steps=steps, chunk=chunk))
    path = sample_grid(config)
    click.echo(str(path))


@dm.command(context_settings=SETTINGS)
@click.option("--dm", "dm_path", required=True, help="DM directory (ours, a diffusers UNet or pipeline dir).")
@click.option("--dataset", default=None, type=click.Choice(list(DATASETS)),
              help="Real data to compare with [default: the DM's dm.json].")
@click.option("--data-root", default="data", type=click.Path(file_okay=False), help="Where the stores are.")
@click.option("--n", default=1000, type=click.IntRange(min=20), help="Samples to score (and real images used).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Where to write the scores [default: <dm>/score.json].")
@click.option("--classifier-steps", default=800, type=click.IntRange(min=1),
              help="Training steps of the cached feature classifier (part of its cache key).")
@sampler_options
@device_option
@threads_option
def score(dm_path, dataset, data_root, n, out, classifier_steps, sampler, steps, seed, chunk, device, threads):
    """How good is p_DM: Frechet distance, precision/recall, memorization, two-sample test."""
    from generator.score import ScoreConfig
    from generator.score import score as score_dm

    set_threads(threads)
    config = ScoreConfig(dm=dm_path, dataset=dataset, data_root=data_root, n=n, out=out, seed=seed,
                         classifier_steps=classifier_steps,
                         sampler=SamplerConfig(name=sampler, steps=steps, chunk=chunk),
                         device=resolve_device(device))
    result = score_dm(config)
    click.echo(result["summary"])
