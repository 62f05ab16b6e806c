"""Helper of bench/gpu_campaign.sh: each subcommand is one time-boxed step of the campaign.

    env      --out FILE                      versions, device, nvidia-smi, git commit -> JSON
    prepare  --work DIR --presets a,b --out FILE
                                             random-weight DMs of the presets (UNet + EDM scheduler), the
                                             evaluator's data store, the CPU cost of the per-image noise -> JSON
    gen      --work DIR --preset P --configs SPEC[,SPEC...] --rows FILE ...
                                             shard generation throughput, one row per configuration -> JSONL
    store    --root DIR --n N                an fmnist store of N zero images (N = |D_train| for the CLI step)
    collect  --out DIR                       every step's output -> results.json + results.md (printed)

A configuration SPEC is precision:compile:mode:chunk:batch, e.g. bf16:on:reduce-overhead:1024:1024 (the
`vaegen generate` flags --precision, --compile, --compile-mode, --chunk, --batch-size); in `gen`, `best` is the
fastest successful row of the preset measured so far (in --rows).

How `gen` measures one configuration, all in one process through `generator.generate.generate_run` (the loop
`vaegen generate` runs), each call on a new run directory and a data store whose N sets the image count:
  1. warm-up run of one batch: its loop time includes torch.compile, CUDA-graph capture, cuDNN start-up;
  2. probe run of one batch: sizes the measured run (and shows whether a second generate_run recompiles:
     the dynamo graph counter is recorded for every run);
  3. measured run of about --target-s seconds: images/s = generation.json runs[-1] images_per_s_rank0 (the
     sampling loop with the writer thread, not DM loading or manifests); writer_blocked_s from the same record.
  compile warm-up = warm-up loop seconds - one batch at the measured rate. Should every generate_run compile
  afresh (dynamo not reusing the graph for a new UNet instance; the graph counters show it), images/s is
  taken from the difference of the measured and the probe run, which paid the same compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEUN18_NFE = 35                     # the paper's sampler: EDM Heun, 18 steps
FMNIST_TRAIN = 60_000               # |D_train| of FashionMNIST: make shards SCALE=K makes K * 60000 images
PROJECT_SCALES = (100, 1000)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a killed step
    return rows


def append_jsonl(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def command_output(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --- env ----------------------------------------------------------------------------------------------------

def cmd_env(args) -> None:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for pkg in ("torch", "diffusers", "accelerate", "webdataset", "zarr", "numpy", "triton"):
        try:
            info[f"{pkg}_version"] = md.version(pkg)
        except md.PackageNotFoundError:
            info[f"{pkg}_version"] = None
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    device_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", device_count=0,
                    bf16_supported=None)
    info["nvidia_smi"] = command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                                         "clocks.max.sm,power.limit", "--format=csv,noheader"])
    info["git_commit"] = command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    info["git_dirty"] = bool(status) if status is not None else None
    write_json(Path(args.out), info)
    print(f"device {info['device']}; torch {info['torch_version']} (CUDA {info['torch_cuda']}), "
          f"diffusers {info['diffusers_version']}, python {info['python']}, {info['cpu_count']} CPUs")


# --- prepare ------------------------------------------------------------------------------------------------

def cmd_prepare(args) -> None:
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    from generator.edm import edm_scheduler
    from generator.presets import get_preset
    from generator.sampling import initial_noise
    from vaegen.data import store_attrs, store_path, write_store

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    info = {"presets": {}}
    for name in args.presets.split(","):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        unet = UNet2DModel(**get_preset(name).unet_kwargs(1))  # random weights: speed does not depend on them
        out = work / "dm" / name
        unet.save_pretrained(out)
        edm_scheduler().save_pretrained(out)  # EDM preconditioning, as `vaegen dm train` saves it
        params = sum(p.numel() for p in unet.parameters())
        info["presets"][name] = {"params": params, "dir": str(out), "build_s": round(time.perf_counter() - t0, 2)}
        print(f"DM {name}: {params / 1e6:.2f}M parameters (random weights) -> {out}")

    # The evaluator bench reads data/fmnist.zarr's test split: the real store when there is one, else random
    # images of the same shape (q* speed per Adam step does not depend on pixel values; convergence may).
    real = REPO / "data" / "fmnist.zarr"
    if real.is_dir():
        info["eval_data"] = {"root": str(REPO / "data"), "kind": "real FashionMNIST (data/fmnist.zarr)"}
    else:
        rng = np.random.default_rng(0)
        root = work / "evaldata"
        n = args.eval_images
        images = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
        labels = np.zeros(n, np.uint8)
        write_store(store_path("fmnist", None, 0, root), {"train": (images, labels), "test": (images, labels)},
                    store_attrs("fmnist"))
        info["eval_data"] = {"root": str(root), "kind": f"random uint8 images ({n}; no data/fmnist.zarr here)"}
    print(f"evaluator data: {info['eval_data']['kind']}")

    # Sample i's noise is drawn on the CPU from its own generator, synchronously between network chunks: its
    # cost per image bounds images/s from above whatever the GPU does.
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        initial_noise(range(1024), 0, (1, 32, 32))
        best = min(best, time.perf_counter() - t0)
    info["noise_us_per_image"] = round(best / 1024 * 1e6, 2)
    info["noise_bound_images_per_s"] = round(1024 / best, 1)
    print(f"per-image noise on the CPU: {info['noise_us_per_image']} us/image "
          f"(bounds generation at {info['noise_bound_images_per_s']:.0f} images/s)")
    write_json(Path(args.out), info)


# --- gen ----------------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> dict:
    try:
        precision, compile_, mode, chunk, batch = spec.split(":")
        cfg = {"precision": precision, "compile": compile_, "compile_mode": mode, "chunk": int(chunk),
               "batch_size": int(batch)}
    except ValueError:
        raise SystemExit(f"bad configuration {spec!r}; expected precision:compile:mode:chunk:batch") from None
    if cfg["batch_size"] % cfg["chunk"]:
        raise SystemExit(f"{spec}: the batch size must be a multiple of the chunk")
    return cfg


def spec_of(row: dict) -> str:
    return ":".join(str(row[k]) for k in ("precision", "compile", "compile_mode", "chunk", "batch_size"))


def best_row(rows: list[dict], preset: str, nfe: int | None = None) -> dict | None:
    ok = [r for r in rows if r.get("preset") == preset and r.get("status") == "ok"
          and (nfe is None or r.get("nfe") == nfe)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def label_of(cfg: dict) -> str:
    how = "eager" if cfg["compile"] == "off" else f"compile-{cfg['compile']}/{cfg['compile_mode']}"
    return f"{cfg['precision']} {how} chunk {cfg['chunk']} batch {cfg['batch_size']}"


def zero_store(root: Path, n: int) -> Path:
    """root/fmnist.zarr with n zero training images (unless there), so that --scale 1 makes n samples."""
    import numpy as np

    from vaegen.data import store_attrs, store_path, write_store

    if not store_path("fmnist", None, 0, root).exists():
        write_store(store_path("fmnist", None, 0, root),
                    {"train": (np.zeros((n, 1, 32, 32), np.uint8), np.zeros(n, np.uint8))}, store_attrs("fmnist"))
    return root


def cmd_store(args) -> None:
    print(f"{zero_store(Path(args.root), args.n)}: fmnist store of {args.n} zero images")


class StoreCache:
    """Data roots holding an fmnist store of exactly n training images, one per n."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, n: int) -> Path:
        return zero_store(self.root / f"n{n}", n)


def measure(args, cfg: dict, stores: StoreCache, raw: Path) -> dict:
    """Warm-up, probe and measured generate_run of one configuration (see the module docstring)."""
    import torch
    from torch._dynamo.utils import counters

    from generator.generate import GenerateConfig, generate_run
    from generator.sampling import SamplerConfig

    work = Path(args.work)
    cuda = torch.cuda.is_available()
    nfe = SamplerConfig(name=args.sampler, steps=args.steps).network_evaluations
    base = GenerateConfig(dm=str(work / "dm" / args.preset), scale=1, out="", sampler=args.sampler,
                          steps=args.steps, shard_size=args.shard_size, batch_size=cfg["batch_size"],
                          chunk=cfg["chunk"], dataset="fmnist", precision=cfg["precision"],
                          compile=cfg["compile"], compile_mode=cfg["compile_mode"])
    tag = re.sub(r"[^a-z0-9]+", "-", f"{args.preset} {args.step} {label_of(cfg)}".lower()).strip("-")

    def run(n: int, phase: str) -> tuple[dict, dict]:
        out = work / "runs" / f"{tag}-{phase}"
        shutil.rmtree(out, ignore_errors=True)
        graphs = counters["stats"]["unique_graphs"]
        record = generate_run(dataclasses.replace(base, out=str(out), data_root=str(stores(n))))
        result = dict(record["runs"][-1], new_graphs=counters["stats"]["unique_graphs"] - graphs)
        if phase == "measure":
            shutil.copy(out / "generation.json", raw / f"{tag}.generation.json")
        shutil.rmtree(out, ignore_errors=True)
        return result, record

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = cfg["batch_size"]
    warm, _ = run(batch, "warmup")
    probe, _ = run(batch, "probe")
    rate0 = probe["images_per_s_rank0"] or 1.0
    n = math.ceil(rate0 * args.target_s / batch) * batch
    n = max(batch * args.min_batches, min(n, max(batch, args.max_images // batch * batch)))
    meas, record = run(n, "measure")
    rate = meas["images_per_s_rank0"]
    recompiled = meas["new_graphs"] > 0 and probe["new_graphs"] > 0 and n > batch
    if recompiled and meas["loop_s_rank0"] > probe["loop_s_rank0"]:
        # Every generate_run compiled afresh (dynamo did not reuse the graph for a new UNet instance): the probe
        # and the measured run paid the same compile, so their difference is the sampling alone.
        rate = round((n - batch) / (meas["loop_s_rank0"] - probe["loop_s_rank0"]), 3)
    identity = record["identity"]
    return {
        "images": n, "loop_s": meas["loop_s_rank0"], "images_per_s": rate,
        "images_per_s_loop": meas["images_per_s_rank0"], "rate_by_difference": bool(recompiled),
        "network_evals_per_s": round(rate * nfe, 1),
        "heun18_images_per_s_scaled": round(rate * nfe / HEUN18_NFE, 2),
        "writer_blocked_s": meas["writer_blocked_s_rank0"], "writer_busy_s": meas["writer_busy_s_rank0"],
        "warmup_loop_s": warm["loop_s_rank0"],
        "compile_warmup_s": round(max(0.0, warm["loop_s_rank0"] - batch / rate), 2),
        "probe_images_per_s": probe["images_per_s_rank0"],
        "graphs_compiled": {"warmup": warm["new_graphs"], "probe": probe["new_graphs"], "measure": meas["new_graphs"]},
        "measure_wall_s": meas["wall_s"],
        "resolved_precision": identity.get("precision"), "resolved_compile": identity.get("compile"),
        "channels_last": identity.get("channels_last"), "device": meas.get("device"),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def cmd_gen(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from generator.presets import get_preset
    from generator.sampling import SamplerConfig

    work, rows_path = Path(args.work), Path(args.rows)
    raw = rows_path.parent / "generation"
    raw.mkdir(parents=True, exist_ok=True)
    stores = StoreCache(work / "stores")
    nfe = SamplerConfig(name=args.sampler, steps=args.steps).network_evaluations
    specs = []
    for spec in args.configs.split(","):
        if spec == "best":  # the fastest configuration of this preset in the matrix so far
            best = best_row([r for r in read_jsonl(rows_path) if r.get("step") != "heun18"], args.preset)
            if best is None:
                print(f"{args.preset}: no successful row yet, so no best configuration to measure")
                continue
            spec = spec_of(best)
        if spec not in specs:
            specs.append(spec)
    get_preset(args.preset)  # an unknown name fails here, before any work
    params = (read_json(Path(args.prepared), {}) if args.prepared else {}).get("presets", {}).get(args.preset, {})
    dynamo_off = "1" in (os.environ.get("TORCHDYNAMO_DISABLE"), os.environ.get("TORCH_COMPILE_DISABLE"))
    for spec in specs:
        cfg = parse_spec(spec)  # the flags as given; the row's resolved_* fields say what they resolved to
        row = {"step": args.step, "preset": args.preset, "params": params.get("params"), "sampler": args.sampler,
               "steps": args.steps, "nfe": nfe, **cfg, "label": label_of(cfg), "dynamo_disabled": dynamo_off}
        left = args.deadline - time.time() if args.deadline else math.inf
        if left < args.min_left:
            row.update(status="skipped", error=f"campaign budget: {left:.0f} s left")
            append_jsonl(rows_path, row)
            print(f"{args.preset:6s} {row['label']:52s} skipped ({left:.0f} s of the budget left)")
            continue
        t0 = time.perf_counter()
        try:
            row.update(measure(args, cfg, stores, raw), status="ok")
        except Exception as e:  # noqa: BLE001 - recorded, and the campaign goes on
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0][:300]
            row.update(status="failed", error=f"{type(e).__name__}: {first}")
        row["config_s"] = round(time.perf_counter() - t0, 1)
        append_jsonl(rows_path, row)
        if row["status"] == "ok":
            print(f"{args.preset:6s} {row['label']:52s} {row['images_per_s']:10.1f} img/s at {nfe} NFE "
                  f"({row['network_evals_per_s']:.0f} evals/s; Heun-18 scaled {row['heun18_images_per_s_scaled']:.1f}"
                  f" img/s)  writer blocked {row['writer_blocked_s']:.3f} of {row['loop_s']:.2f} s, compile/warm-up "
                  f"{row['compile_warmup_s']:.1f} s, {row['images']} images"
                  + (f", peak {row['peak_memory_gib']} GiB" if row["peak_memory_gib"] is not None else ""),
                  flush=True)
        else:
            print(f"{args.preset:6s} {row['label']:52s} FAILED {row['error']}", flush=True)
        torch._dynamo.reset()  # no graph, guard or dynamic-shape decision carries over to the next configuration
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- collect ------------------------------------------------------------------------------------------------

def parse_trainer(log: str) -> dict:
    out = {}
    if m := re.search(r"ratio shards / in-memory = ([\d.]+)", log):
        out["ratio_shards_over_in_memory"] = float(m.group(1))
    for name, key in (("in-memory", "in_memory_images_per_s"), ("shards", "shards_images_per_s")):
        if m := re.search(rf"^\s+{name}\s+([\d.]+) img/s", log, re.M):
            out[key] = float(m.group(1))
    if m := re.search(r"^device (\S+), torch threads (\d+), N=(\d+), batch (\d+)", log, re.M):
        out.update(device=m.group(1).rstrip(","), n=int(m.group(3)), batch_size=int(m.group(4)))
    return out


def parse_evaluator(log: str) -> dict:
    out = {}
    if m := re.search(r"q\* optimization, (\d+) points, <= (\d+) Adam steps", log):
        out.update(points=int(m.group(1)), max_iters=int(m.group(2)))
    if m := re.search(r"batched\s+([\d.]+) s\s+G_a =\s*([-\d.]+)", log):
        out.update(batched_s=float(m.group(1)), gap_batched=float(m.group(2)))
    if m := re.search(r"one at a time\s*([\d.]+) s\s+G_a =\s*([-\d.]+)", log):
        out.update(one_at_a_time_s=float(m.group(1)), gap_one_at_a_time=float(m.group(2)))
    if m := re.search(r"speed-up \(one at a time / batched\): ([\d.]+)x", log):
        out["speedup"] = float(m.group(1))
    if m := re.search(r"^device (\S+), threads", log, re.M):
        out["device"] = m.group(1).rstrip(",")
    return out


def projection(row: dict | None, how: str) -> dict | None:
    if row is None:
        return None
    rate = row["images_per_s"] if row["nfe"] == HEUN18_NFE else row["heun18_images_per_s_scaled"]
    out = {"preset": row["preset"], "config": describe(row), "spec": spec_of(row),
           "heun18_images_per_s": rate, "how": how,
           "rate_source": ("measured directly at Heun-18 (35 NFE)" if row["nfe"] == HEUN18_NFE else
                           f"scaled from {row['nfe']} NFE by {row['nfe']}/{HEUN18_NFE} (per-image overhead not "
                           "scaled: an upper bound on time per image, so a pessimistic rate)")}
    for k in PROJECT_SCALES:
        images = k * FMNIST_TRAIN
        seconds = images / rate + (row.get("compile_warmup_s") or 0)
        out[f"scale_{k}"] = {"images": images, "seconds": round(seconds), "hours": round(seconds / 3600, 2)}
    return out


def fmt(x, digits=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def cmd_collect(args) -> None:
    out = Path(args.out)
    meta = read_json(out / "campaign.json", {})
    env = read_json(out / "env.json", {})
    prepared = read_json(out / "prepare.json", {})
    steps = read_jsonl(out / "steps.jsonl")
    rows = read_jsonl(out / "raw" / "gen.jsonl")
    logs = out / "logs"
    project_preset = meta.get("project_preset", "paper")

    matrix = [r for r in rows if r.get("step") != "heun18"]
    heun = [r for r in rows if r.get("step") == "heun18"]
    best = {p: best_row(matrix, p) for p in sorted({r["preset"] for r in matrix})}
    best_heun = best_row(heun, project_preset, HEUN18_NFE)
    for r in heun:  # how far the NFE-scaled estimate of the same configuration was off
        twin = [m for m in matrix if m.get("status") == "ok" and r.get("status") == "ok" and m["preset"] == r["preset"]
                and spec_of(m) == spec_of(r)]
        if twin:
            r["scaled_estimate_from_matrix"] = twin[0]["heun18_images_per_s_scaled"]
            r["direct_over_scaled"] = round(r["images_per_s"] / twin[0]["heun18_images_per_s_scaled"], 3)
    defaults_spec = meta.get("defaults_spec")
    default_heun = next((r for r in heun if r.get("status") == "ok" and spec_of(r) == defaults_spec), None)
    default_matrix = next((r for r in matrix if r.get("status") == "ok" and r["preset"] == project_preset
                           and spec_of(r) == defaults_spec), None)
    proj = {
        "best": (projection(best_heun, "best settings found, measured at Heun-18") if best_heun else
                 projection(best.get(project_preset), "best settings found; no direct Heun-18 row, NFE-scaled")),
        "make_shards_defaults": projection(default_heun or default_matrix,
                                           f"what `make shards` runs: --precision auto --compile auto and the "
                                           f"default chunk and batch ({defaults_spec})"),
        "dataset": "fmnist", "n_train": FMNIST_TRAIN, "gpus": 1,
        "note": "sampling into shards only (no DM training, no `shards verify`), one GPU, plus one compile "
                "warm-up; ranks split whole shards, so k GPUs divide these times by about k",
    }

    trainer_log = (logs / "trainer.log").read_text() if (logs / "trainer.log").is_file() else ""
    evaluator_log = (logs / "evaluator.log").read_text() if (logs / "evaluator.log").is_file() else ""
    cli_run = (read_json(out / "raw" / "cli.generation.json") or {}).get("runs", [{}])[-1]
    results = {
        "campaign": meta,
        "environment": env,
        "prepare": prepared,
        "generation": {
            "how": "generate_run (the `vaegen generate` loop) per configuration: warm-up run of one batch, probe "
                   "run of one batch, measured run; images/s = generation.json runs[-1].images_per_s_rank0 "
                   "(sampling loop incl. noise and the writer hand-off, excl. DM loading and compile: "
                   "compile_warmup_s = warm-up loop - one batch at the measured rate)",
            "sampler": meta.get("sampler"), "steps": meta.get("steps"), "rows": matrix,
            "best_per_preset": {p: (r and {"config": r["label"], "images_per_s": r["images_per_s"],
                                           "heun18_images_per_s_scaled": r["heun18_images_per_s_scaled"]})
                                for p, r in best.items()},
        },
        "heun18": {"rows": heun, "how": "the fastest configuration found (and the Makefile's), at edm-heun 18 "
                                        "steps, measured the same way"},
        "cli": {"command": "python -m vaegen generate (tiny preset) + vaegen shards verify",
                "images_per_s": cli_run.get("images_per_s_rank0"),
                "writer_blocked_s": cli_run.get("writer_blocked_s_rank0"),
                "verify": next((s["status"] for s in steps if s.get("step") == "cli-verify"), None)},
        "projection": proj,
        "trainer": {"command": meta.get("trainer_command"), **parse_trainer(trainer_log),
                    "status": next((s["status"] for s in steps if s.get("step") == "trainer"), None)},
        "evaluator": {"command": meta.get("evaluator_command"), **parse_evaluator(evaluator_log),
                      "data": prepared.get("eval_data", {}).get("kind"),
                      "status": next((s["status"] for s in steps if s.get("step") == "evaluator"), None)},
        "steps": steps,
    }
    write_json(out / "results.json", results)
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)


def numerics(r: dict) -> tuple[str, str, str]:
    """(precision, compile, mode) as they ran, with the flag beside it where it was `auto`."""
    prec = r.get("resolved_precision") or r["precision"]
    compiled = r.get("resolved_compile")
    if compiled is None:  # the row did not run: the flags
        comp, mode = r["compile"], r["compile_mode"] if r["compile"] != "off" else "–"
    else:
        comp, mode = ("compiled", compiled) if compiled else ("eager", "–")
    if r["precision"] == "auto":
        prec += " (auto)"
    if r["compile"] == "auto":
        comp += " (auto)"
    return prec, comp, mode


def describe(r: dict) -> str:
    """A row's configuration as it ran, e.g. 'bf16 (auto), compiled (auto) default, chunk 64, batch 256'."""
    prec, comp, mode = numerics(r)
    return f"{prec}, {comp}{'' if mode == '–' else ' ' + mode}, chunk {r['chunk']}, batch {r['batch_size']}"


def row_status(r: dict) -> str:
    status = r["status"] + (f": {r['error']}" if r.get("error") else "")
    if r.get("dynamo_disabled") and (r.get("resolved_compile") or r["compile"] == "on"):
        status += " (dynamo disabled: compile was a no-op)"
    if r.get("status") == "ok" and (r.get("graphs_compiled") or {}).get("measure"):
        status += (" (every run compiled again: img/s from the measured minus the probe run)"
                   if r.get("rate_by_difference") else
                   f" (the measured run compiled {r['graphs_compiled']['measure']} graph(s): img/s includes it)")
    return status


def markdown(res: dict) -> str:
    meta, env, gen = res["campaign"], res["environment"], res["generation"]
    lines = [f"# GPU campaign {meta.get('started', '')}{' (SMOKE: CPU, tiny sizes)' if meta.get('smoke') else ''}",
             "",
             f"- device: {env.get('device')} ({env.get('nvidia_smi') or 'no nvidia-smi'}); torch "
             f"{env.get('torch_version')} (CUDA {env.get('torch_cuda')}), diffusers {env.get('diffusers_version')}, "
             f"triton {env.get('triton_version')}, python {env.get('python')}, {env.get('cpu_count')} CPUs",
             f"- code: {env.get('git_commit')}{' (dirty tree)' if env.get('git_dirty') else ''}; "
             f"campaign {meta.get('total_s', '?')} s of a {meta.get('budget_s')} s budget",
             f"- per-image noise on the CPU: {fmt(res['prepare'].get('noise_us_per_image'))} us "
             f"(bounds generation at {fmt(res['prepare'].get('noise_bound_images_per_s'), 0)} images/s)",
             "", f"## Shard generation, {gen['sampler']} {gen['steps']} steps", "", gen["how"] + ".", "",
             "| preset | params | precision | compile | mode | chunk | batch | images | img/s | evals/s | Heun-18 img/s "
             "(scaled) | writer blocked s | loop s | compile warm-up s | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def gen_line(r):
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "–"
        prec, comp, mode = numerics(r)
        return (f"| {r['preset']} | {params} | {prec} | {comp} | {mode} | {r['chunk']} | {r['batch_size']} | "
                f"{fmt(r.get('images'))} | {fmt(r.get('images_per_s'))} | {fmt(r.get('network_evals_per_s'), 0)} | "
                f"{fmt(r.get('heun18_images_per_s_scaled'))} | {fmt(r.get('writer_blocked_s'), 3)} | "
                f"{fmt(r.get('loop_s'), 2)} | {fmt(r.get('compile_warmup_s'))} | {fmt(r.get('peak_memory_gib'), 2)} | "
                f"{row_status(r)} |")

    lines += [gen_line(r) for r in gen["rows"]]
    lines += ["", "## Heun-18 (35 NFE), measured directly", "",
              "| preset | config | images | img/s | NFE-scaled estimate | direct / scaled | writer blocked s | "
              "compile warm-up s | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["heun18"]["rows"]:
        lines.append(f"| {r['preset']} | {describe(r)} | {fmt(r.get('images'))} | {fmt(r.get('images_per_s'))} | "
                     f"{fmt(r.get('scaled_estimate_from_matrix'))} | {fmt(r.get('direct_over_scaled'), 3)} | "
                     f"{fmt(r.get('writer_blocked_s'), 3)} | {fmt(r.get('compile_warmup_s'))} | {row_status(r)} |")
    lines += ["", "## Projected wall time of `make shards DATASET=fmnist` on one GPU", "",
              "| settings | preset | config | Heun-18 img/s | rate from | SCALE=100 (6M) | SCALE=1000 (60M) |",
              "|---|---|---|---|---|---|---|"]
    for key in ("best", "make_shards_defaults"):
        p = res["projection"].get(key)
        if p:
            lines.append(f"| {key} | {p['preset']} | {p['config']} | {fmt(p['heun18_images_per_s'])} | "
                         f"{p['rate_source']} | {p['scale_100']['hours']} h | {p['scale_1000']['hours']} h |")
        else:
            lines.append(f"| {key} | – | not measured | – | – | – | – |")
    t, e, c = res["trainer"], res["evaluator"], res["cli"]
    lines += ["", "## Trainer and evaluator", "",
              "| bench | figures | status |", "|---|---|---|",
              f"| VAE training, shards vs in-memory (`{t.get('command')}`) | in-memory "
              f"{fmt(t.get('in_memory_images_per_s'), 0)} img/s, shards {fmt(t.get('shards_images_per_s'), 0)} img/s, "
              f"**ratio {fmt(t.get('ratio_shards_over_in_memory'), 3)}** | {t.get('status')} |",
              f"| q*, batched vs one at a time (`{e.get('command')}`; {e.get('data')}) | {e.get('points')} points: "
              f"{fmt(e.get('batched_s'), 2)} s vs {fmt(e.get('one_at_a_time_s'), 2)} s, **{fmt(e.get('speedup'))}× "
              f"faster**, G_a {fmt(e.get('gap_batched'), 2)} vs {fmt(e.get('gap_one_at_a_time'), 2)} | "
              f"{e.get('status')} |",
              f"| `python -m vaegen generate` CLI + `vaegen shards verify` | {fmt(c.get('images_per_s'))} img/s, "
              f"writer blocked {fmt(c.get('writer_blocked_s'), 3)} s | verify {c.get('verify')} |",
              "", "## Steps", "", "| step | status | rc | seconds | timeout s | log |", "|---|---|---|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s.get('step')} | {s.get('status')} | {s.get('rc')} | {s.get('seconds')} | "
                     f"{s.get('timeout_s')} | {s.get('log')} |")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--presets", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("gen")
    p.add_argument("--work", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--configs", required=True, help="comma-separated precision:compile:mode:chunk:batch or best")
    p.add_argument("--rows", required=True, help="JSONL file the rows are appended to")
    p.add_argument("--step", default="matrix", help="the campaign step (heun18 rows are kept apart)")
    p.add_argument("--prepared", default=None, help="prepare's JSON (parameter counts)")
    p.add_argument("--sampler", default="edm-heun")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--target-s", type=float, default=3.0, help="length of the measured run")
    p.add_argument("--min-batches", type=int, default=2, help="the measured run's minimum, in batches")
    p.add_argument("--max-images", type=int, default=131072)
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds; configurations left then are skipped")
    p.add_argument("--min-left", type=float, default=20.0, help="seconds a configuration needs to be started")
    p.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("store")
    p.add_argument("--root", required=True)
    p.add_argument("--n", type=int, required=True)
    p = sub.add_parser("collect")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    commands = {"env": cmd_env, "prepare": cmd_prepare, "gen": cmd_gen, "store": cmd_store, "collect": cmd_collect}
    commands[args.command](args)


if __name__ == "__main__":
    main()
