"""`dm frontier`: NFE -> steps, the recommendation rule, and a tiny end-to-end run that resumes."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import generator.frontier as frontier_module
from generator.cli import frontier_command
from generator.frontier import (
    METRICS,
    FrontierConfig,
    frontier,
    recommend,
    steps_for,
    summarize,
)
from vaegen.errors import VaegenError


def test_target_nfe_maps_to_the_closest_step_count_and_the_cheaper_one_on_a_tie():
    assert [steps_for("edm-heun", t) for t in (1, 2, 5, 6, 35)] == [1, 1, 3, 3, 18]  # NFE 1, 1, 5, 5, 35
    assert [steps_for(name, 7) for name in ("dpm-solver++", "dpm-solver++3m", "unipc", "ddim")] == [7] * 4


def rows(sampler, nfe, seeds=(0, 1, 2), sd=0.1, **means):
    """Synthetic point rows: every metric 1.0 +- sd across seeds unless given."""
    offsets = sd * np.array([-1.0, 0.0, 1.0])[:len(seeds)]
    return [{"sampler": sampler, "steps": (nfe + 1) // 2 if sampler == "edm-heun" else nfe, "nfe": nfe,
             "seed": seed, "sampling_seconds": nfe / 10, **{m: means.get(m, 1.0) + offset for m in METRICS}}
            for seed, offset in zip(seeds, offsets)]


def test_recommendation_is_the_cheapest_point_inside_the_band_on_every_metric():
    table = summarize(rows("edm-heun", 35) + rows("edm-heun", 9, fd=3.0)
                      + rows("unipc", 5, fd=1.1, precision=0.4)    # inside on fd, outside on precision
                      + rows("unipc", 7, recall=1.5)               # outside on recall
                      + rows("unipc", 9, fd=1.15)                  # inside (|0.15| < 2 * 0.1)
                      + rows("dpm-solver++", 13))
    result = recommend(table)
    assert result["point"] == {"sampler": "unipc", "nfe": 9, "steps": 9}
    assert result["bound_by"] == ["recall"]  # what keeps unipc from NFE 7
    assert {(c["sampler"], c["nfe"]): c["outside"] for c in result["rejected_cheaper"]} == {
        ("unipc", 5): ["precision"], ("unipc", 7): ["recall"]}
    assert result["band"]["fd"] == pytest.approx([0.8, 1.2]) and "cheapest" in result["rule"]


def test_band_widens_to_the_pooled_within_point_sd_when_the_reference_is_less_noisy():
    tight_reference = rows("edm-heun", 35, sd=0.01)
    candidate = rows("unipc", 5, fd=1.25, sd=0.2)  # 25 reference sds away, but within 2 pooled sds
    result = recommend(summarize(tight_reference + candidate))
    assert result["pooled_sd"]["fd"] == pytest.approx(np.sqrt((0.01**2 + 0.2**2) / 2))
    assert result["point"]["sampler"] == "unipc"
    assert recommend(summarize(tight_reference + rows("unipc", 5, fd=1.5, sd=0.2)))["point"]["nfe"] == 35


def test_one_seed_gives_no_recommendation():
    assert recommend(summarize(rows("edm-heun", 35, seeds=(0,))))["point"] is None


@pytest.fixture(scope="module")
def tiny_dm(tmp_path_factory, support):
    """A random EDM UNet trained on nothing, a store of random images, and an isolated classifier cache."""
    root = tmp_path_factory.mktemp("frontier")
    support.store(root / "data", n_train=100, n_test=50)
    support.dm(root / "dm", widths=(4, 8))
    (root / "dm" / "dm.json").write_text(json.dumps({"dataset": "fmnist"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        yield root


def tiny_config(root, **overrides):
    return FrontierConfig(**{"dm": str(root / "dm"), "samplers": ("edm-heun", "unipc"), "nfe": (3,),
                             "seeds": (0, 1), "n": 20, "data_root": str(root / "data"), "chunk": 20,
                             "classifier_steps": 2, **overrides})


def test_tiny_frontier_writes_every_output_and_a_rerun_scores_nothing_again(tiny_dm, monkeypatch):
    result = frontier(tiny_config(tiny_dm))
    out = tiny_dm / "dm" / "frontier"
    names = sorted(p.name for p in (out / "points").iterdir())
    assert names == [f"{s}-seed{seed}.json" for s in ("edm-heun-nfe03", "edm-heun-nfe35", "unipc-nfe03")
                     for seed in (0, 1)]
    point = json.loads((out / "points" / "unipc-nfe03-seed1.json").read_text())
    assert point["sampling_seconds"] > 0 and point["target_nfe"] == 3 and point["network_evaluations"] == 3
    assert set(point["samples"]) >= set(METRICS) and point["n"] == 20 and "floor_real_test_vs_train" in point
    assert [(g["sampler"], g["nfe"], g["seeds"]) for g in result["summary"]] == [
        ("edm-heun", 3, [0, 1]), ("unipc", 3, [0, 1]), ("edm-heun", 35, [0, 1])]
    assert result["recommendation"]["point"] is not None
    assert json.loads((out / "frontier.json").read_text())["recommendation"] == result["recommendation"]
    csv_lines = (out / "frontier.csv").read_text().splitlines()
    assert csv_lines[0].startswith("sampler,steps,nfe,target_nfe,seed,sampling_seconds,fd,") and len(csv_lines) == 7
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    calls = []
    monkeypatch.setattr(frontier_module, "sample", lambda *a, **k: calls.append(a))
    rerun = CliRunner().invoke(frontier_command, [
        "--dm", str(tiny_dm / "dm"), "--samplers", "edm-heun,unipc", "--nfe", "3", "--seeds", "0,1", "--n", "20",
        "--data-root", str(tiny_dm / "data"), "--chunk", "20", "--classifier-steps", "2", "--device", "cpu"])
    assert rerun.exit_code == 0, rerun.output
    assert "recommended:" in rerun.output and calls == []
    assert {p: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == mtimes


def test_kept_points_from_other_settings_are_refused(tiny_dm):
    out = tiny_dm / "other"
    (out / "points").mkdir(parents=True)
    (out / "points" / "edm-heun-nfe03-seed0.json").write_text(json.dumps({"config": {"n": 21}, "dm": {}}))
    with pytest.raises(VaegenError, match="other settings"):
        frontier(tiny_config(tiny_dm, out=str(out)))


@pytest.mark.parametrize("args, message", [(["--nfe", "5,x"], "comma-separated list of int"),
                                           (["--samplers", "heun"], "unknown or no samplers")])
def test_bad_lists_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(frontier_command, ["--dm", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
