"""The `vaegen` click group. Stage commands live in their own packages and are imported on first use,
so `vaegen --help` and `vaegen data` stay fast (no torch/diffusers import). Every program runs through
`vaegen.interrupts.run_command`: one-line errors, clean exits on signals and on a full disk."""

from __future__ import annotations

import importlib

import click

from vaegen import __version__
from vaegen.interrupts import run_command
from vaegen.options import CONTEXT, dataset_options

# name -> ("module:attribute" of a click command or group, one-line help shown by `vaegen --help`).
# The help is repeated here so that listing the commands imports nothing heavy.
COMMANDS = {
    "data": ("vaegen.cli:data", "Build data/<dataset>.zarr from the official files."),
    "dm": ("generator.cli:dm", "Train, sample and score the diffusion model p_DM."),
    "generate": ("generator.cli:generate", "Precompute SCALE x |D_train| DM samples into shards."),
    "shards": ("generator.cli:shards", "Inspect and verify shard runs."),
    "train": ("trainer.cli:train", "Train a VAE from shards, real or augmented data."),
    "eval": ("evaluator.cli:evaluate", "Measure a trained VAE's gaps, log-likelihood and probes."),
    "report": ("evaluator.report:report", "Tables and plots for a study directory."),
    "study": ("vaegen.studies:study", "The paper's comparisons and ablations, resumable."),
}


class LazyGroup(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(args, prog_name, **kwargs)
        run_command(self, prog_name or "vaegen", args)

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


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vaegen")
def main():
    """vaegen: train VAEs on diffusion-model samples (DMaaPx) and measure their generalization gaps.

    Pipeline: data -> dm train -> generate (shards) -> train (VAE) -> eval -> report.
    """


@click.command(context_settings=CONTEXT)
@click.argument("dataset")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Directory with the official files (also searched: $VAEGEN_DATA, ~/.cache/vaegen/<dataset>, "
                   "and for fmnist /usr/share/datasets/fashion-mnist).")
@click.option("--no-download", is_flag=True, help="Never try the official URLs.")
@dataset_options(help_suffix=" Written as a store of its own.", with_dataset=False)
def data(dataset, data_dir, no_download, subset, subset_seed, data_root):
    """Build <data-root>/<DATASET>.zarr from the official files (fmnist, mnist, binary-mnist, cifar10)."""
    from vaegen.data import build_store

    path = build_store(dataset, data_root, subset, subset_seed, data_dir, download=not no_download)
    click.echo(str(path))


def _console_script(name: str):
    """`vaegen-<name>`: the same click command as `vaegen <name>`, as its own program."""
    def run():
        run_command(main.get_command(None, name), f"vaegen-{name}")
    return run


generate_entry = _console_script("generate")
train_entry = _console_script("train")
eval_entry = _console_script("eval")
