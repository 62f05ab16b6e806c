"""One seeding helper with named purposes; one set of shared options; every program's exits on bad luck."""

import dataclasses
import itertools
import json

import click
import pytest
from click.testing import CliRunner

from studies.cli import COMMANDS, main
from vaegen.seeding import PURPOSES, derive, numpy_rng, torch_generator


def test_every_purpose_has_its_own_id_and_no_two_streams_coincide():
    ids = [pid for pid, _ in PURPOSES.values()]
    assert len(ids) == len(set(ids))
    # Every purpose, for neighbouring user seeds and small keys: all derived seeds distinct. This is what
    # `seed + 1` or `seed * 1000 + k` schemes fail (the next seed's stream equals another purpose's).
    seen = {}
    for purpose, (_, arity) in PURPOSES.items():
        for seed in range(3):
            for keys in itertools.product(range(3), repeat=arity):
                value = derive(seed, purpose, *keys)
                assert value not in seen, (purpose, seed, keys, seen.get(value))
                seen[value] = (purpose, seed, keys)
    assert all(0 <= v < 2**63 for v in seen)


def test_a_purpose_takes_exactly_its_keys_and_only_32_bit_words():
    with pytest.raises(ValueError, match="takes 1 key"):
        derive(0, "sample-noise")
    with pytest.raises(ValueError, match="takes 0 key"):
        derive(0, "vae-init", 0)  # a trailing 0 would alias another stream in a plain SeedSequence
    with pytest.raises(ValueError, match="2\\^32"):
        derive(2**32, "vae-init")  # a big seed spans two words and could alias (seed, key) pairs
    with pytest.raises(KeyError, match="unknown seed purpose"):
        derive(0, "my-own-stream")


def test_helpers_give_reproducible_generators_of_the_derived_seed():
    assert torch_generator(5, "vae-reparam", 1, 0, 2).initial_seed() == derive(5, "vae-reparam", 1, 0, 2)
    assert numpy_rng(5, "batch-order", 3, 0).integers(1 << 30) == numpy_rng(5, "batch-order", 3, 0).integers(1 << 30)


def all_commands():
    """(path, command) for every command and subcommand of the vaegen group."""
    out = []

    def walk(path, command):
        out.append((path, command))
        if isinstance(command, click.Group):
            for name in command.list_commands(None):
                walk([*path, name], command.get_command(None, name))

    walk([], main)
    return out


@pytest.mark.parametrize("path", [p for p, _ in all_commands()], ids=lambda p: " ".join(p) or "vaegen")
def test_minus_h_shows_help_with_defaults_everywhere(path):
    result = CliRunner().invoke(main, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and "--help" in result.output


def config_classes():
    """The dataclass whose defaults each command's options show, and how option names map to its fields."""
    from evaluator.evaluate import EvalConfig
    from generator.cli import SampleGridConfig
    from generator.generate import GenerateConfig
    from generator.sampling import SamplerConfig
    from generator.score import ScoreConfig
    from generator.train_dm import DMTrainConfig
    from trainer.train import TrainConfig

    sampler = {"sampler": ("sampler", "name"), "steps": ("sampler", "steps"), "chunk": ("sampler", "chunk")}
    return {
        ("train",): (TrainConfig, {}),
        ("generate",): (GenerateConfig, {"compile_": ("compile",)}),
        ("dm", "train"): (DMTrainConfig, {}),
        ("dm", "sample"): (SampleGridConfig, sampler),
        ("dm", "score"): (ScoreConfig, {**sampler, "dm_path": ("dm",)}),
        ("eval",): (EvalConfig, {}),
    }, SamplerConfig


def field_default(cls, path):
    value = cls
    for i, name in enumerate(path):
        field = {f.name: f for f in dataclasses.fields(value)}.get(name)
        if field is None:
            return dataclasses.MISSING
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = default if i == len(path) - 1 else (default if dataclasses.is_dataclass(default) else field.type)
    return value


def test_every_shown_default_equals_its_config_dataclass_default():
    classes, _ = config_classes()
    checked = 0
    for path, (cls, renames) in classes.items():
        command = main
        for name in path:
            command = command.get_command(None, name)
        ctx = click.Context(command)
        for param in command.params:
            shown = param.get_default(ctx) if isinstance(param, click.Option) else None
            if shown is None or param.name in ("threads", "device"):
                continue
            expected = field_default(cls, renames.get(param.name, (param.name,)))
            if expected is dataclasses.MISSING:
                continue  # an option that is not a config field (e.g. --quick)
            if isinstance(expected, tuple):
                shown = tuple(shown) if not isinstance(shown, str) else tuple(shown.split(","))
            assert shown == expected, (path, param.name, shown, expected)
            checked += 1
    assert checked >= 40  # the test would pass vacuously if the mapping broke


def test_flag_names_mean_the_same_in_every_command():
    """--subset, --subset-seed, --data-root, --threads and --device name one parameter in every command that has
    them (they are declared once, in vaegen/options.py)."""
    spellings = {}
    for _, command in all_commands():
        for param in getattr(command, "params", []):
            if isinstance(param, click.Option):
                for opt in param.opts:
                    spellings.setdefault(opt, set()).add(param.name)
    for flag in ("--subset", "--subset-seed", "--data-root", "--threads", "--device"):
        assert len(spellings.get(flag, {None})) == 1, (flag, spellings.get(flag))
    assert "--out-dir" not in spellings


def test_lazy_command_table_matches_the_commands():
    for name in COMMANDS:
        assert main.get_command(None, name).name in (name, "evaluate")


def test_a_locked_run_directory_is_refused_in_one_line_and_a_stale_lock_is_taken_over(tmp_path, support):
    from vaegen.runlock import lock_path, run_lock

    support.store(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--dataset", "fmnist", "--source", "real", "--data-root", str(tmp_path / "data"),
            "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    with run_lock(out):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is being written by" in result.output and "pid" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()

    lock_path(out).write_text(json.dumps({"host": "elsewhere", "pid": 999999, "command": "a dead job"}))
    result = CliRunner().invoke(main, args)  # nobody holds the flock: the file alone is no lock
    assert result.exit_code == 0, result.output
    assert not lock_path(out).exists()  # released and removed at the end


def test_a_full_disk_while_saving_a_vae_is_one_line_exit_2_and_the_rerun_resumes(tmp_path, support, monkeypatch):
    import errno

    import trainer.models as models

    support.store(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--dataset", "fmnist", "--source", "real", "--data-root", str(tmp_path / "data"),
            "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "1", "--out", str(out)]
    real_save = models.save_file

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "save_file", disk_full)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: no space left on device writing {out}")
    assert "Traceback" not in result.output
    assert not (out / "done.json").exists() and not (out / "model.safetensors").exists()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # the half-written file is gone
    monkeypatch.setattr(models, "save_file", real_save)
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "done.json").exists()
