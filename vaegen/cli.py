"""The `vaegen` click group. Stage commands live in their own packages and are imported on first use,
so `vaegen --help` and `vaegen data` stay fast (no torch/diffusers import)."""

from __future__ import annotations

import importlib

import click

from vaegen import __version__

# name -> ("module:attribute" of a click command or group, one-line help shown by `vaegen --help`).
# The help is repeated here so that listing the commands imports nothing heavy.
COMMANDS = {
    "data": ("vaegen.cli:data", "Build data/<dataset>.zarr from the official files."),
    "dm": ("generator.cli:dm", "Train, sample and score the diffusion model p_DM."),
    "generate": ("generator.generate:generate", "Precompute SCALE x |D_train| DM samples into shards."),
    "shards": ("generator.generate:shards", "Inspect and verify shard runs."),
    "train": ("trainer.cli:train", "Train a VAE from shards, real or augmented data."),
    "eval": ("evaluator.cli:evaluate", "Measure a trained VAE's gaps, log-likelihood and probes."),
    "report": ("evaluator.report:report", "Tables and plots for a study directory."),
    "study": ("vaegen.studies:study", "The paper's comparisons and ablations, resumable."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vaegen")
def main():
    """vaegen: train VAEs on diffusion-model samples (DMaaPx) and measure their generalization gaps.

    Pipeline: data -> dm train -> generate (shards) -> train (VAE) -> eval -> report.
    """


@click.command(context_settings={"show_default": True})
@click.argument("dataset")
@click.option("--out-dir", default="data", type=click.Path(file_okay=False), help="Where <dataset>.zarr goes.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Directory with the official files (also searched: $VAEGEN_DATA, ~/.cache/vaegen/<dataset>, "
                   "and for fmnist /usr/share/datasets/fashion-mnist).")
@click.option("--subset", default=None, type=click.IntRange(min=1),
              help="Keep a seeded, class-balanced subset of N training images.")
@click.option("--seed", default=0, type=int, help="Seed of the subset.")
@click.option("--no-download", is_flag=True, help="Never try the official URLs.")
def data(dataset, out_dir, data_dir, subset, seed, no_download):
    """Build data/<DATASET>.zarr from the official files (fmnist, mnist, binary-mnist, cifar10)."""
    from vaegen.data import build_store

    path = build_store(dataset, out_dir, subset, seed, data_dir, download=not no_download)
    click.echo(str(path))


def _console_script(name: str):
    """`vaegen-<name>`: the same click command as `vaegen <name>`, as its own program."""
    def run():
        main.get_command(None, name)(prog_name=f"vaegen-{name}")
    return run


generate_entry = _console_script("generate")
train_entry = _console_script("train")
eval_entry = _console_script("eval")
