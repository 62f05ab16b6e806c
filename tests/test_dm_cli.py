"""`vaegen dm ...` as a user types it: one-line errors with exit code 2, a grid from `dm sample`."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from studies.cli import main


@pytest.fixture(scope="module")
def dm_dir(tmp_path_factory, support):
    return support.dm(tmp_path_factory.mktemp("dm"))


def assert_one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output


def test_dm_sample_writes_a_grid_and_its_provenance(dm_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["dm", "sample", "--dm", str(dm_dir), "--n", "6", "--steps", "2",
                                       "--chunk", "6", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (3 * 32, 2 * 32)
    record = json.loads(out.with_name("grid.png.json").read_text())
    assert record["network_evaluations"] == 3 and record["dm"]["kind"] == "edm" and "command" in record


def test_dm_sample_of_a_directory_that_is_no_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["dm", "sample", "--dm", str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert_one_line_error(result, "not a diffusion model directory")


def test_dm_train_without_the_dataset_store_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["dm", "train", "--data-root", str(tmp_path / "nodata"), "--subset", "50",
                                       "--out", str(tmp_path / "run")])
    assert_one_line_error(result, "vaegen data fmnist --subset 50 --subset-seed 0")


def test_dm_score_without_dm_json_or_dataset_is_a_one_line_error(dm_dir):
    result = CliRunner().invoke(main, ["dm", "score", "--dm", str(dm_dir)])
    assert_one_line_error(result, "pass --dataset")


def test_options_show_their_defaults_and_ranges():
    result = CliRunner().invoke(main, ["dm", "train", "--help"])
    assert result.exit_code == 0 and "default: tiny" in result.output and "x>=1" in result.output
