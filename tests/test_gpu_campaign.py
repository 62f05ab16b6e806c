"""bench/gpu_campaign.sh in SMOKE mode (CPU, tiny sizes): every step runs, and its figures say what they claim.

The GPU campaign is meant for a machine this suite never sees, so this runs the same steps, code paths and
report on a CPU; a typo in a step, a renamed flag or a changed bench output fails here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool) and x > 0 and x != float("inf")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign")
    env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("BUDGET_S", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_campaign.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_every_step_ran_within_the_budget(campaign):
    out, res = campaign
    steps = {s["step"]: s for s in res["steps"]}
    assert list(steps) == ["env", "noise", "null", "generate", "trainer", "train-cli", "runs-per-gpu"]
    assert {s["status"] for s in steps.values()} == {"ok"}, steps
    assert sum(s["seconds"] for s in steps.values()) <= res["campaign"]["budget_s"]
    assert res["campaign"]["smoke"] is True and res["env"]["torch_version"] and res["env"]["device"].startswith("cpu")
    md = (out / "results.md").read_text()
    for heading in ("## Initial noise", "## Null-model pipeline", "## `vaegen generate`", "## FC VAE training",
                    "## `vaegen train`", "## Concurrent compare-sized VAE runs", "## Steps"):
        assert heading in md, heading
    assert (out / "logs.tar.gz").is_file() and (out / "logs" / "generate.log").is_file()


@pytest.mark.slow
def test_noise_figures_amortize_and_beat_the_per_image_generator(campaign):
    noise = campaign[1]["noise"]
    rows = {r["batch"]: r for r in noise["rows"]}
    assert set(rows) == {1, 64, 1024}
    assert all(positive(r["us_per_image"]) and positive(r["cpu_bits_us_per_image"]) for r in rows.values())
    assert rows[1024]["us_per_image"] < rows[1]["us_per_image"]  # per-call costs amortize over a batch
    assert rows[1024]["cpu_bits_us_per_image"] < noise["per_image_generator_us_per_image"]
    assert "cpu_vs_device" not in noise  # nothing to compare with on a CPU


@pytest.mark.slow
def test_null_pipeline_times_every_stage_and_the_null_network_costs_nothing(campaign):
    run = campaign[1]["null"]["runs"][0]["result"]
    gen, reader = run["generation"], run["reader"]
    assert gen["best"]["images"] == 2048 and positive(gen["best"]["images_per_s"])
    timed = gen["timed"]
    main = timed["main_thread_s"]
    assert set(main) == {"noise", "sampler bookkeeping", "network (null)", "uint8", "waiting on the writer",
                         "rest of the loop"}
    assert positive(main["noise"]) and positive(main["sampler bookkeeping"]) and positive(main["uint8"])
    assert main["network (null)"] < 0.2 * main["sampler bookkeeping"]
    assert sum(main.values()) == pytest.approx(timed["loop_s"], rel=0.02)  # the stages account for the loop
    assert positive(timed["writer_thread_s"]["pack+write"]) and positive(timed["writer_thread_s"]["commit"])
    assert positive(timed["around_the_loop_s"]["index"])
    rows = reader["rows"]
    assert rows["1 process(es)"]["images_per_worker"] == 4096
    assert rows["2 process(es)"]["images_per_worker"] == 2048  # 8 shards of 512, half each
    assert all(positive(r["decode_images_per_s"]) and positive(r["epoch_images_per_s"]) for r in rows.values())


@pytest.mark.slow
def test_generate_rows_record_what_ran(campaign):
    gen = campaign[1]["generate"]
    rows = {r["label"]: r for r in gen["rows"]}
    assert all(r["status"] == "ok" and positive(r["images_per_s"]) and r["n_samples"] == r["images"]
               for r in rows.values()), rows
    assert rows["bf16 batch 16"]["identity_precision"] == "bf16"
    # TF32 exists only on CUDA: on a CPU the run is plain fp32, and its identity says so
    assert rows["fp32 TF32 on"]["identity_precision"] == rows["fp32 TF32 off"]["identity_precision"] == "fp32"
    assert rows["bf16 compiled"]["identity_compile"] == "default" and rows["bf16 batch 16"]["identity_compile"] is False
    assert {r["noise_stream"] for r in rows.values()} == {"vaegen sample-noise v2: philox4x64-10 (seed, i), "
                                                          "box-muller f64"}
    best = max(rows.values(), key=lambda r: r["images_per_s"])
    assert gen["projection"]["from"] == best["label"]
    assert gen["projection"]["scale_1000"]["hours"] == pytest.approx(
        60_000_000 / best["images_per_s"] / 3600, rel=0.01)


@pytest.mark.slow
def test_trainer_steps_measure_streaming_and_concurrent_runs(campaign):
    res = campaign[1]
    trainer = res["trainer"]
    assert set(trainer["images_per_s"]) == {"in-memory", "shards"}  # no device pool on a CPU
    assert all(positive(v) for v in trainer["images_per_s"].values())
    assert trainer["ratio_shards_over_in_memory"] == pytest.approx(
        trainer["images_per_s"]["shards"] / trainer["images_per_s"]["in-memory"])
    cli = res["train-cli"]
    assert positive(cli["streaming"]["images_per_s"]) and "--shards" in cli["streaming"]["command"]
    assert ("pool on device" in cli) == cli["pool_on_device_option"]
    runs = res["runs-per-gpu"]["rows"]
    assert [r["k"] for r in runs] == [1, 2] and all(r["status"] == "ok" for r in runs)
    for r in runs:
        assert len(r["per_run_images_per_s"]) == r["k"] and all(positive(x) for x in r["per_run_images_per_s"])
        assert r["aggregate_images_per_s"] == pytest.approx(sum(r["per_run_images_per_s"]))
