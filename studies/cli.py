"""The `vaegen` command group: every stage's commands, the studies and the report.

Stage commands live with their stage (generator/cli.py, trainer/cli.py, evaluator/cli.py) and are imported on
first use, so `vaegen --help` and `vaegen data` stay fast (no torch/diffusers import). Every program runs through
`vaegen.interrupts.run_command`: one-line errors, clean exits on signals and on a full disk.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from vaegen import __version__
from vaegen.errors import VaegenError
from vaegen.interrupts import run_command
from vaegen.options import CONTEXT, DATASET_NAMES, REPORT_TO, data_root_option, dataset_options


def _stage(name: str):
    """The click command or group of a stage, imported when first asked for."""
    if name in ("dm", "generate", "shards"):
        import generator.cli as module
    elif name == "train":
        import trainer.cli as module
    else:
        import evaluator.cli as module
    return getattr(module, {"eval": "evaluate"}.get(name, name))


# name -> one-line help shown by `vaegen --help` (repeated here so that listing the commands imports nothing heavy)
COMMANDS = {
    "data": "Build data/<dataset>.zarr from the official files.",
    "dm": "Train, sample and score the diffusion model p_DM.",
    "generate": "Precompute SCALE x |D_train| DM samples into shards.",
    "shards": "Inspect and verify shard runs.",
    "train": "Train a VAE from shards, real or augmented data.",
    "eval": "Measure a trained VAE's gaps, log-likelihood and probes.",
    "report": "Tables and plots for a study directory.",
    "study": "The paper's comparisons and ablations, resumable.",
}


class LazyGroup(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(args, prog_name, **kwargs)
        run_command(self, prog_name or "vaegen", args)

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name == "data":
            return data
        if name == "study":
            return study
        if name == "report":
            return report
        return _stage(name) if name in COMMANDS else None

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


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


@click.command(context_settings=CONTEXT)
@click.argument("study_dir", type=click.Path(file_okay=False))
def report(study_dir):
    """Build report.md, CSV tables and PNG plots for STUDY_DIR from its run directories."""
    from studies.report import build_report

    click.echo(str(build_report(study_dir)))


# --- studies -------------------------------------------------------------------------------------------------

def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(k) for k in text.split())
    except ValueError:
        raise VaegenError(f"{flag} takes space-separated integers, e.g. {flag} '1 2 5'") from None
    return values


def _study_command(kind):
    @click.command(kind.name, context_settings=CONTEXT, help=kind.help)
    @click.option("--dataset", default="fmnist", type=click.Choice(DATASET_NAMES))
    @click.option("--preset", default="cpu", type=click.Choice(["smoke", "demo", "cpu", "paper"]))
    @click.option("--scales", default=None, help="Space-separated SCALEs for the ablation (default: the preset's).")
    @click.option("--seeds", default=None, help="Space-separated VAE seeds (default: the preset's).")
    @click.option("--subset", default=None, type=click.IntRange(min=1), help="|D_train| (default: the preset's).")
    @click.option("--epochs", default=None, type=click.IntRange(min=1), help="VAE epochs (default: the preset's).")
    @click.option("--dm-max-steps", default=None, type=click.IntRange(min=1),
                  help="DM training steps (default: the DM preset's).")
    @click.option("--sigma", default=None, type=click.FloatRange(min=0, min_open=True),
                  help="The Gaussian likelihood's sigma for every run (default: the preset's, else the trainer's).")
    @click.option("--budget-minutes", default=None, type=click.FloatRange(min=0),
                  help="Start no new run after this many minutes of this invocation (default: the preset's).")
    @click.option("--jobs", default=None, type=click.IntRange(min=1),
                  help="VAE runs at a time [default: runs-per-gpu x the GPUs, else one per CPU core].")
    @click.option("--runs-per-gpu", default=1, type=click.IntRange(min=1),
                  help="VAE runs sharing one GPU, each in its own process.")
    @click.option("--executor", default="local", type=click.Choice(["local", "slurm"]),
                  help="local: subprocesses on this machine; slurm: the prerequisites as Slurm jobs and the VAE runs "
                       "as one job array (submitit), requeued on preemption.")
    @click.option("--partition", default=None, help="--executor slurm: the partition [default: the cluster's].")
    @click.option("--time-min", default=24 * 60, type=click.IntRange(min=1),
                  help="--executor slurm: each task's time limit in minutes.")
    @click.option("--cpus-per-task", default=1, type=click.IntRange(min=1), help="--executor slurm.")
    @click.option("--gpus-per-task", default=0, type=click.IntRange(min=0), help="--executor slurm.")
    @click.option("--array-parallelism", default=64, type=click.IntRange(min=1),
                  help="--executor slurm: VAE runs of the array running at once.")
    @click.option("--sbatch", "sbatch_flags", default="",
                  help="--executor slurm: more sbatch flags, passed through, e.g. '--account=proj --qos=long'.")
    @click.option("--report-to", default="none", type=click.Choice(REPORT_TO),
                  help="An experiment tracker for every VAE run (one tracker run each, grouped by the study).")
    @click.option("--reuse/--no-reuse", default=True,
                  help="Copy a run that finished in another study directory instead of training it again.")
    @click.option("--out", default=None, type=click.Path(file_okay=False),
                  help="Study directory [default: runs/studies/<study>-<dataset>-<preset>].")
    @data_root_option
    def command(dataset, preset, scales, seeds, subset, epochs, dm_max_steps, sigma, budget_minutes, jobs,
                runs_per_gpu, executor, partition, time_min, cpus_per_task, gpus_per_task, array_parallelism,
                sbatch_flags, report_to, reuse, out, data_root):
        from studies.jobs import LocalExecutor, default_jobs
        from studies.presets import get_study_preset
        from studies.study import default_study_dir, run_study

        overrides = {"subset": subset, "epochs": epochs, "dm_max_steps": dm_max_steps, "sigma": sigma,
                     "budget_minutes": budget_minutes, "scales": _ints(scales, "--scales"),
                     "seeds": _ints(seeds, "--seeds")}
        if any(k < 1 for k in overrides["scales"] or ()):
            raise VaegenError("every SCALE must be >= 1")
        chosen = get_study_preset(preset, **overrides)
        study_dir = Path(out) if out else default_study_dir(kind.name, dataset, chosen.name)
        if executor == "slurm":
            try:
                from studies.slurm import SlurmExecutor
            except ImportError:
                raise VaegenError("--executor slurm needs submitit: pip install 'vaegen[slurm]'") from None
            runner = SlurmExecutor(study_dir / "slurm", partition, time_min, cpus_per_task, gpus_per_task,
                                   array_parallelism, shlex.split(sbatch_flags))
        else:
            runner = LocalExecutor(jobs or default_jobs(runs_per_gpu), runs_per_gpu)
        click.echo(f"{kind.name} study of {dataset}, {executor} executor, preset {chosen}", err=True)
        study_dir = run_study(kind, dataset, chosen, str(study_dir), runner, data_root, reuse, report_to)
        click.echo(str(study_dir / "report.md"))

    return command


@click.group(context_settings=CONTEXT)
def study():
    """The paper's comparisons and ablations, and the studies it leaves open; rerunning a study skips its
    finished runs."""


def _add_studies() -> None:
    from studies.catalog import STUDIES

    for kind in STUDIES.values():
        study.add_command(_study_command(kind))


_add_studies()


def _console_script(name: str):
    """`vaegen-<name>`: the same click command as `vaegen <name>`, as its own program."""
    def run():
        run_command(main.get_command(None, name), f"vaegen-{name}")
    return run


generate_entry = _console_script("generate")
train_entry = _console_script("train")
eval_entry = _console_script("eval")
