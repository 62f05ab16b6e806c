"""bench/gpu_campaign.sh in SMOKE mode (CPU, tiny sizes): every step runs and the report has every figure.

The GPU campaign is meant for a machine this suite never sees, so this runs the same steps, code paths and
report on a CPU; a typo in a step, a renamed flag or a changed bench output format fails here first.
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


def number(x) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool) and x == x  # not NaN


@pytest.mark.slow
def test_smoke_campaign_writes_every_section(tmp_path):
    out = tmp_path / "campaign"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("BUDGET_S", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_campaign.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    res = json.loads((out / "results.json").read_text())
    for section in ("campaign", "environment", "prepare", "generation", "heun18", "cli", "projection", "trainer",
                    "evaluator", "steps"):
        assert section in res, section
    assert res["campaign"]["smoke"] is True
    assert res["environment"]["torch_version"] and res["environment"]["diffusers_version"]
    assert number(res["prepare"]["noise_us_per_image"])

    # every step ran to completion within the budget: nothing skipped, failed or timed out
    steps = {s["step"]: s["status"] for s in res["steps"]}
    assert {"env", "prepare", "matrix-tiny-eager", "cli-generate", "cli-verify", "trainer", "evaluator",
            "heun18"} <= set(steps)
    assert set(steps.values()) == {"ok"}, steps

    rows = res["generation"]["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert {(r["precision"], r["compile"]) for r in rows} >= {("fp32", "off"), ("bf16", "off"), ("fp32", "on")}
    assert {r["compile_mode"] for r in rows if r["compile"] == "on"} == {"default", "reduce-overhead"}
    assert len({r["chunk"] for r in rows}) >= 2
    for r in rows:
        for key in ("images_per_s", "network_evals_per_s", "heun18_images_per_s_scaled", "writer_blocked_s",
                    "compile_warmup_s", "loop_s", "images"):
            assert number(r[key]) and r[key] >= 0, (key, r)
        assert r["images_per_s"] > 0 and r["nfe"] == 3

    heun = res["heun18"]["rows"]
    assert heun and all(r["status"] == "ok" and r["nfe"] == 35 and number(r["images_per_s"]) for r in heun)
    for key in ("best", "make_shards_defaults"):
        p = res["projection"][key]
        assert p["rate_source"].startswith("measured directly"), p
        assert number(p["heun18_images_per_s"]) and p["heun18_images_per_s"] > 0
        assert p["scale_100"]["images"] == 6_000_000 and p["scale_1000"]["images"] == 60_000_000
        assert number(p["scale_100"]["hours"]) and number(p["scale_1000"]["hours"])

    assert number(res["cli"]["images_per_s"]) and res["cli"]["verify"] == "ok"
    trainer, evaluator = res["trainer"], res["evaluator"]
    for key in ("ratio_shards_over_in_memory", "in_memory_images_per_s", "shards_images_per_s"):
        assert number(trainer[key]), trainer
    for key in ("batched_s", "one_at_a_time_s", "speedup", "gap_batched", "gap_one_at_a_time"):
        assert number(evaluator[key]), evaluator

    md = (out / "results.md").read_text()
    for heading in ("## Shard generation", "## Heun-18", "## Projected wall time", "## Trainer and evaluator",
                    "## Steps"):
        assert heading in md
    assert (out / "logs" / "trainer.log").is_file() and (out / "logs" / "heun18.log").is_file()
    assert list((out / "raw" / "generation").glob("*.generation.json"))
