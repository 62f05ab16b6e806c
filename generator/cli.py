"""The generator's commands, thin click shells over plain functions that take a frozen config:

    vaegen dm train | sample | score | frontier       the diffusion model p_DM
    vaegen generate (vaegen-generate)                   shards of DM samples (generator.generate)
    vaegen shards verify                                check a shard run (vaegen.shardformat)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from generator.frontier import FrontierConfig
from generator.generate import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, GenerateConfig
from generator.presets import PRESETS
from generator.sampling import SAMPLERS, SamplerConfig
from vaegen.dmrun import DM_ROOT
from vaegen.errors import VaegenError
from vaegen.launch import is_main_process
from vaegen.options import (
    CONTEXT,
    DATASET_NAMES,
    data_root_option,
    dataset_options,
    device_option,
    resolve_device,
    set_threads,
    threads_option,
    tracking_options,
)


def sampler_options(f):
    """--sampler/--steps/--seed/--chunk, shared by `dm sample` and `dm score`."""
    f = click.option("--chunk", default=SamplerConfig.chunk, type=click.IntRange(min=1),
                     help="Images per network call (fixed, so an image never depends on its batch).")(f)
    f = click.option("--seed", default=0, type=click.IntRange(min=0),
                     help="Sample i's noise is a function of (seed, i) (counter-based Philox).")(f)
    f = click.option("--steps", default=SamplerConfig.steps, type=click.IntRange(min=1),
                     help="Sampler steps (edm-heun: 2*steps-1 network evaluations).")(f)
    f = click.option("--sampler", default=SamplerConfig.name, type=click.Choice(SAMPLERS), help="Sampler.")(f)
    return f


@click.group(context_settings=CONTEXT)
def dm():
    """Train, sample and score the diffusion model p_DM."""



@dm.command(context_settings=CONTEXT)
@dataset_options()
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
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Seed of weights, data order and training noise.")
@click.option("--checkpoint-every", default=None, type=click.IntRange(min=1),
              help="Steps between checkpoints [default: preset's].")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--mixed-precision", default="auto", type=click.Choice(["auto", "no", "bf16", "fp16"]),
              help="auto: bf16 on GPUs that support it, else none.")
@click.option("--grid-samples", default=64, type=click.IntRange(min=1), help="Images in samples.png.")
@click.option("--snapshot-steps", default=None, metavar="S1,S2,...",
              help="Also export the EMA model at these steps to <out>/snapshots/step-NNNNNNNN/ (graded DMs "
                   "from one run; training is unchanged).")
@tracking_options
@threads_option
def train(dataset, subset, subset_seed, data_root, preset, out, max_steps, max_minutes, batch_size, lr, seed,
          checkpoint_every, resume, mixed_precision, grid_samples, snapshot_steps, report_to, tracker_group, threads):
    """Train an EDM diffusion model on D_train (resumable; output in diffusers format)."""
    from generator.train_dm import DMTrainConfig, train_dm
    from vaegen.dmrun import dm_name
    from vaegen.interrupts import set_resume_hint

    set_threads(threads)
    set_resume_hint("rerun the same command with --resume to continue from the last checkpoint")
    out = out or str(DM_ROOT / dm_name(dataset, subset, subset_seed, preset))
    config = DMTrainConfig(dataset=dataset, out=out, preset=preset, subset=subset, subset_seed=subset_seed,
                         data_root=data_root, max_steps=max_steps, max_minutes=max_minutes,
                         batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                         resume=resume, mixed_precision=mixed_precision, grid_samples=grid_samples,
                         snapshot_steps=parse_steps(snapshot_steps or ""), report_to=report_to,
                         tracker_group=tracker_group)
    out = train_dm(config)
    if is_main_process():  # one line per launch, not per rank
        click.echo(str(out))


def parse_steps(text: str) -> tuple[int, ...]:
    """'200,400' -> (200, 400): positive step numbers, sorted, without repeats."""
    try:
        steps = sorted({int(s) for s in text.replace(" ", "").split(",") if s})
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of steps", param_hint="--snapshot-steps") from None
    if any(s < 1 for s in steps):
        raise click.BadParameter("steps start at 1", param_hint="--snapshot-steps")
    return tuple(steps)


@dataclass(frozen=True)
class SampleGridConfig:
    dm: str
    out: str = "grid.png"
    n: int = 64
    seed: int = 0
    sampler: SamplerConfig = SamplerConfig()
    device: str = "cpu"


def write_sample_grid(config: SampleGridConfig) -> Path:
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


@dm.command(context_settings=CONTEXT)
@click.option("--dm", "dm_path", required=True, help="DM directory (ours, a diffusers UNet or pipeline dir).")
@click.option("--n", default=64, type=click.IntRange(min=1), help="Number of images.")
@click.option("--out", default="grid.png", type=click.Path(dir_okay=False), help="Grid PNG to write.")
@sampler_options
@device_option
@threads_option
def sample(dm_path, n, out, sampler, steps, seed, chunk, device, threads):
    """Sample a grid of images from a DM."""
    set_threads(threads)
    config = SampleGridConfig(dm=dm_path, out=out, n=n, seed=seed, device=str(resolve_device(device)),
                              sampler=SamplerConfig(name=sampler, steps=steps, chunk=chunk))
    path = write_sample_grid(config)
    click.echo(str(path))


@dm.command(context_settings=CONTEXT)
@click.option("--dm", "dm_path", required=True, help="DM directory (ours, a diffusers UNet or pipeline dir).")
@click.option("--dataset", default=None, type=click.Choice(DATASET_NAMES),
              help="Real data to compare with [default: the DM's dm.json].")
@data_root_option
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
    from generator.score import ScoreConfig, score_dm

    set_threads(threads)
    config = ScoreConfig(dm=dm_path, dataset=dataset, data_root=data_root, n=n, out=out, seed=seed,
                         classifier_steps=classifier_steps,
                         sampler=SamplerConfig(name=sampler, steps=steps, chunk=chunk),
                         device=str(resolve_device(device)))
    result = score_dm(config)
    click.echo(result["summary"])


# --- the sampler frontier (its loop: generator/frontier.py) ------------------------------------------------

def comma_list(kind):
    """A click callback parsing "a,b,c" into a tuple of `kind`, with a one-line error."""
    def parse(ctx, param, value: str) -> tuple:
        try:
            items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise VaegenError(f"--{param.name} {value!r}: expected a comma-separated list of {kind.__name__}") from None
        if not items:
            raise VaegenError(f"--{param.name} is empty")
        return items
    return parse


@dm.command("frontier", context_settings=CONTEXT)
@click.option("--dm", "dm_path", required=True, help="DM directory (ours, a diffusers UNet or pipeline dir).")
@click.option("--samplers", default=",".join(FrontierConfig.samplers), callback=comma_list(str),
              help=f"Comma-separated samplers, of {', '.join(SAMPLERS)}.")
@click.option("--nfe", default=",".join(map(str, FrontierConfig.nfe)), callback=comma_list(int),
              help="Comma-separated target network evaluations per image (edm-heun: the closest 2*steps-1).")
@click.option("--seeds", default=",".join(map(str, FrontierConfig.seeds)), callback=comma_list(int),
              help="Comma-separated sampling seeds; the noise band needs at least 2.")
@click.option("--n", default=FrontierConfig.n, type=click.IntRange(min=20), help="Samples per point.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output directory "
              "[default: <dm>/frontier]; existing point files there are kept (resume).")
@click.option("--dataset", default=None, type=click.Choice(DATASET_NAMES),
              help="Real data to compare with [default: the DM's dm.json].")
@data_root_option
@click.option("--classifier-steps", default=FrontierConfig.classifier_steps, type=click.IntRange(min=1),
              help="Training steps of the cached feature classifier (as in `dm score`).")
@click.option("--chunk", default=FrontierConfig.chunk, type=click.IntRange(min=1), help="Images per network call.")
@device_option
@threads_option
def frontier_command(dm_path, samplers, nfe, seeds, n, out, dataset, data_root, classifier_steps, chunk, device,
                     threads):
    """Quality per network evaluation of every sampler, and the cheapest one as good as Heun at 35."""
    from generator.frontier import FrontierConfig, frontier

    set_threads(threads)
    config = FrontierConfig(dm=dm_path, samplers=samplers, nfe=nfe, seeds=seeds, n=n, out=out, dataset=dataset,
                            data_root=data_root, device=str(resolve_device(device)), chunk=chunk,
                            classifier_steps=classifier_steps)
    best = frontier(config)["recommendation"]["point"]
    click.echo(f"recommended: {best['sampler']} at NFE {best['nfe']} ({best['steps']} steps)" if best
               else "no recommendation: the reference's noise band needs at least 2 seeds")


# --- shards ------------------------------------------------------------------------------------------------

class ScaleType(click.ParamType):
    """SCALE is a whole multiple K >= 1 of |D_train|; anything else is a one-line error (exit 2)."""

    name = "K"

    def convert(self, value, param, ctx):
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if k < 1 or str(value).strip() != str(k):
            raise VaegenError(f"--scale must be a whole number >= 1 (K in K x |D_train| samples), got {value!r}")
        return k


@click.command(context_settings=CONTEXT)
@click.option("--dm", required=True, type=click.Path(), help="Diffusion model directory (runs/dm/NAME).")
@click.option("--scale", required=True, type=ScaleType(), help="K: generate K x |D_train| samples.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory shards/<dataset>/<run>, or any fsspec URL (s3://bucket/prefix/run; credentials "
                   "and endpoint from the environment: AWS_*, ~/.aws, FSSPEC_S3_*).")
@click.option("--sampler", default=GenerateConfig.sampler, type=click.Choice(SAMPLERS), help="Sampler.")
@click.option("--steps", default=GenerateConfig.steps, type=click.IntRange(min=1),
              help="Sampler steps (edm-heun 18 = 35 network evaluations).")
@click.option("--seed", default=GenerateConfig.seed, type=click.IntRange(min=0),
              help="Sample i's noise is a function of (seed, i) (counter-based Philox).")
@click.option("--shard-size", default=DEFAULT_SHARD_SIZE, type=click.IntRange(min=1), help="Samples per shard.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, type=click.IntRange(min=1),
              help="Images per sampling call and process; keep it a multiple of --chunk (no padded chunks).")
@click.option("--chunk", default=None, type=click.IntRange(min=1),
              help="Network batch; the sampler pads to it so images never depend on the batch. Default: the "
                   "sampler's (64). Part of the run's identity: larger is faster on a GPU.")
@dataset_options(default=None, help_suffix=" Only for a DM without dm.json (which says what it was trained on).")
@click.option("--precision", default=GenerateConfig.precision, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 on CUDA with bf16 support, else fp32. Part of the run's identity.")
@click.option("--compile", "compile_", default=GenerateConfig.compile, type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the UNet (auto: on for CUDA).")
@click.option("--compile-mode", default=GenerateConfig.compile_mode,
              type=click.Choice(["default", "reduce-overhead", "max-autotune"]),
              help="torch.compile mode; reduce-overhead replays CUDA graphs (part of the run's identity).")
@click.option("--tf32/--no-tf32", default=GenerateConfig.tf32,
              help="fp32 on CUDA with TF32 tensor cores (convolutions, matmuls); recorded as precision tf32 (part "
                   "of the run's identity).")
@click.option("--channels-last/--no-channels-last", default=GenerateConfig.channels_last,
              help="channels_last memory format for the UNet.")
@threads_option
def generate(dm, scale, out, sampler, steps, seed, shard_size, batch_size, chunk, dataset, subset, subset_seed,
             data_root, precision, compile_, compile_mode, tf32, channels_last, threads):
    """Precompute SCALE x |D_train| samples of the DM into WebDataset shards (resumable, any process count)."""
    from generator.generate import generate_run

    set_threads(threads)
    cfg = GenerateConfig(dm=dm, scale=scale, out=out, sampler=sampler, steps=steps, seed=seed,
                         shard_size=shard_size, batch_size=batch_size, chunk=chunk, dataset=dataset, subset=subset,
                         subset_seed=subset_seed, data_root=data_root, precision=precision, compile=compile_,
                         compile_mode=compile_mode, tf32=tf32, channels_last=channels_last)
    record = generate_run(cfg)
    if is_main_process():
        click.echo(f"{out}: {record['n_samples']} samples (K={record['scale']} x N={record['n_train']}) "
                   f"in {record['num_shards']} shards")


@click.group(context_settings=CONTEXT)
def shards():
    """Inspect and verify shard runs."""


@shards.command("verify", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
def verify(run_dir):
    """Check every shard against its marker and index.json; exit 2 naming each bad shard.

    RUN_DIR is a run directory or an fsspec URL (s3://bucket/prefix/run): every shard is read and hashed."""
    from vaegen.shardformat import verify_run

    summary = verify_run(run_dir)
    click.echo(f"OK {run_dir}: {summary['shards']} shards, {summary['images']} images, {summary['bytes']} bytes")
