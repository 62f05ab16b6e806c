"""The VAE run contract's reader (vaegen.vaerun.read_run) on a run the trainer wrote and the evaluator scored."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

import trainer.models
from studies.cli import main
from vaegen import vaerun
from vaegen.errors import VaegenError


def test_the_contract_names_the_files_the_trainer_writes():
    assert (vaerun.MODEL_CONFIG_NAME, vaerun.MODEL_WEIGHTS_NAME) == \
        (trainer.models.MODEL_CONFIG_NAME, trainer.models.MODEL_WEIGHTS_NAME)


def test_read_run_sees_every_file_of_a_trained_and_evaluated_run(tmp_path, support):
    support.store(tmp_path / "data")
    run = tmp_path / "runs" / "vae" / "r"
    torch.set_num_threads(1)
    train = ["train", "--dataset", "fmnist", "--source", "real", "--out", str(run), "--data-root",
             str(tmp_path / "data"), "--epochs", "2", "--eval-every", "1", "--batch-size", "16"]
    assert CliRunner().invoke(main, train).exit_code == 0
    trained = vaerun.read_run(run, require_finished=True)
    assert trained.finished and trained.config["dataset"] == "fmnist" and trained.model["arch"] == "fc"
    assert [m["epoch"] for m in trained.metrics] == [1, 2]
    assert trained.gaps is None and trained.gap_curves == []
    evaluate = ["eval", str(run), "--quick", "--gaps", "robustness", "--iwae-k", "0", "--attack-iters", "2",
                "--attack-images", "2", "--attack-seeds", "2", "--smoothness-pairs", "0"]
    assert CliRunner().invoke(main, evaluate).exit_code == 0
    evaluated = vaerun.read_run(run)
    assert evaluated.gaps == json.loads((run / "eval" / "gaps.json").read_text())
    assert evaluated.config == trained.config and evaluated.metrics == trained.metrics


@pytest.mark.parametrize("breakage,message", [
    ("no config", "is not a VAE run (missing config.json)"),
    ("not finished", "is not a finished VAE run (missing model.safetensors, done.json)"),
    ("bad json", "config.json is not valid JSON"),
    ("not an object", "config.json is not a JSON object"),
])
def test_read_run_refuses_in_one_line(tmp_path, breakage, message):
    run = tmp_path / "run"
    run.mkdir()
    config = {"no config": None, "bad json": "{", "not an object": "[1]"}.get(breakage, '{"dataset": "fmnist"}')
    if config is not None:
        (run / "config.json").write_text(config)
    (run / "model.json").write_text('{"arch": "fc"}')
    with pytest.raises(VaegenError, match=re.escape(message)) as error:
        vaerun.read_run(run, require_finished=breakage == "not finished")
    assert "\n" not in str(error.value)
    assert vaerun.is_run_dir(run) == (breakage != "no config")
