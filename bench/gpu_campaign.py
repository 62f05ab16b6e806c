"""The GPU campaign: what issue 24 needs measured on a GPU, in one call of under 10 minutes.

    bash bench/gpu_campaign.sh                          # on the GPU machine (finds or sets up a python first)
    SMOKE=1 bash bench/gpu_campaign.sh                  # the same steps at tiny sizes on a CPU (a few minutes)
    python bench/gpu_campaign.py run --out DIR [--smoke] [--budget-s 500]

Steps, in order of importance. Each runs in its own process under a timeout, so a failing or hung step is
recorded (steps.jsonl) and the campaign goes on; a step that the budget no longer allows is skipped.
  env           versions, device, nvidia-smi, the TF32 defaults, git commit
  noise         bench/bench_noise.py on the device: the initial noise's us/image at several batch sizes, the
                CPU's part of it (the Philox bits), the old per-image generator for reference, and whether the
                device's noise has the CPU's bytes (float32 mismatches out of some millions)
  null          bench/bench_null_pipeline.py on the device: generate_run with a zero-cost denoiser and its stage
                shares; the trainer's shard reader, images/s per process
  generate      generate_run with the `small` preset's UNet (random weights: speed does not depend on them),
                Heun-18 (35 network evaluations): bf16 at a few batch sizes, fp32 with TF32 off and on, and bf16
                compiled; images/s, and the hours SCALE = 100 and 1000 of FashionMNIST would take
  trainer       bench/bench_trainer.py: the FC VAE from shards (streaming), from a CPU pool, from a pool on the
                device
  train-cli     `vaegen train` itself, streaming and with --pool-on-device (when this checkout has the option;
                until then the step says so and measures streaming only)
  runs-per-gpu  k concurrent `vaegen train` runs of the compare study's size (FC VAE, batch 128) on one device,
                k = 1, 2, 4, ...: aggregate images/s, and the k after which it stops growing (>= 10% per
                doubling), i.e. the figure for `--runs-per-gpu`
  collect       results.json and results.md (printed), in --out with logs/ and raw/ (every step's figures)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # vaegen and the other benches, even from an uninstalled python

from vaegen.provenance import append_jsonl, read_json, read_jsonl, write_json_atomic  # noqa: E402

FMNIST_TRAIN = 60_000  # |D_train|: SCALE K means K * 60000 generated images
PROJECT_SCALES = (100, 1000)
SHAPE = (1, 32, 32)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each step does: the GPU campaign's, or the CPU smoke run's (same code paths, tiny sizes)."""

    device: str
    budget_s: int
    caps: dict                      # step -> its longest allowed time in seconds
    noise_batches: tuple[int, ...]
    noise_check_images: int         # images whose CPU and device noise are compared
    null_runs: tuple[tuple[str, ...], ...]  # bench_null_pipeline arguments, one run each
    dm_preset: str                  # the UNet the generate step measures
    steps: int                      # its sampler steps (edm-heun)
    generate_configs: tuple[dict, ...]
    target_s: float                 # length of one measured generate run
    max_images: int
    trainer_args: tuple[str, ...]
    n_train: int                    # the train-cli and runs-per-gpu steps' N (and their pool, K = 1)
    epochs: int
    runs_per_gpu: tuple[int, ...]


def generate_config(label, precision="bf16", batch_size=1024, tf32=False, compile_="off", chunk=None,
                    min_left_s=15) -> dict:
    """One configuration of the generate step; it starts only with `min_left_s` of the step's time left."""
    return {"label": label, "precision": precision, "tf32": tf32, "compile": compile_,
            "batch_size": batch_size, "chunk": chunk or batch_size, "min_left_s": min_left_s}


GPU = Sizes(
    device="cuda", budget_s=500,  # with python start-up and collect, well inside a 600 s call
    caps={"env": 25, "noise": 40, "null": 75, "generate": 140, "trainer": 55, "train-cli": 55, "runs-per-gpu": 100},
    noise_batches=(1, 64, 1024, 4096), noise_check_images=4096,
    null_runs=(("--images", "131072", "--batch-size", "4096", "--repeats", "2"),
               ("--images", "65536", "--batch-size", "1024", "--repeats", "2", "--skip", "reader")),
    dm_preset="small", steps=18,
    generate_configs=(generate_config("bf16 batch 1024"), generate_config("bf16 batch 256", batch_size=256),
                      generate_config("bf16 batch 4096", batch_size=4096),
                      generate_config("fp32 TF32 off", precision="fp32"),
                      generate_config("fp32 TF32 on", precision="fp32", tf32=True),
                      generate_config("bf16 compiled", compile_="on", min_left_s=90)),
    target_s=8.0, max_images=262_144,
    trainer_args=("--n", "60000", "--scale", "2", "--epochs", "4", "--shard-size", "4096"),
    n_train=60_000, epochs=4, runs_per_gpu=(1, 2, 4, 8, 16),
)
SMOKE = Sizes(
    device="cpu", budget_s=300,
    caps={"env": 60, "noise": 60, "null": 90, "generate": 120, "trainer": 60, "train-cli": 90, "runs-per-gpu": 90},
    noise_batches=(1, 64, 1024), noise_check_images=0,
    null_runs=(("--images", "2048", "--batch-size", "256", "--chunk", "64", "--steps", "2", "--repeats", "1",
                "--reader-images", "4096", "--reader-shard-size", "512", "--threads", "1"),),
    dm_preset="tiny", steps=2,
    generate_configs=(generate_config("bf16 batch 16", batch_size=16),
                      generate_config("fp32 TF32 off", precision="fp32", batch_size=16),
                      generate_config("fp32 TF32 on", precision="fp32", tf32=True, batch_size=16),
                      generate_config("bf16 compiled", compile_="on", batch_size=16)),
    target_s=0.5, max_images=64,
    trainer_args=("--n", "1024", "--scale", "2", "--epochs", "2", "--shard-size", "512"),
    n_train=512, epochs=2, runs_per_gpu=(1, 2),
)
STEPS = ("env", "noise", "null", "generate", "trainer", "train-cli", "runs-per-gpu")
COLLECT_RESERVE_S = 10


def command_output(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --- fixtures (made once in --work, by the first step that needs them) ------------------------------------------

def shard_fixture(work: Path, n: int) -> tuple[Path, Path]:
    """(data root with an fmnist store of n random training and 1000 test images, a K=1 shard run of n images)."""
    from vaegen import shardformat as sf
    from vaegen.data import store_attrs, store_path, write_store

    root, run = work / f"trainer-data-n{n}", work / f"trainer-shards-n{n}"
    if not (run / sf.INDEX_NAME).is_file():
        rng = np.random.default_rng(0)
        split = {name: (rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8), np.zeros(count, np.uint8))
                 for name, count in (("train", n), ("test", 1000))}
        write_store(store_path("fmnist", None, 0, root), split, store_attrs("fmnist"))
        sf.write_run(run, rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), 4096, {"dataset": "fmnist", "n_train": n})
    return root, run


def save_partial(args, name: str, result: dict) -> None:
    """A step's figures so far: a step killed by its timeout still leaves what it measured."""
    write_json_atomic(Path(args.out) / "raw" / f"{name}.json", result)


# --- env --------------------------------------------------------------------------------------------------------

def step_env(args, sizes: Sizes) -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "smoke": args.smoke}
    for pkg in ("torch", "diffusers", "accelerate", "webdataset", "zarr", "numpy", "triton"):
        try:
            info[f"{pkg}_version"] = md.version(pkg)
        except md.PackageNotFoundError:
            info[f"{pkg}_version"] = None
    info.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                default_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                default_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    device_memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", device_count=0, bf16_supported=None)
    info["nvidia_smi"] = command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,"
                                         "power.limit", "--format=csv,noheader"])
    info["git_commit"] = command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    info["git_dirty"] = bool(status) if status is not None else None
    print(f"device {info['device']}; torch {info['torch_version']} (CUDA {info['torch_cuda']}), diffusers "
          f"{info['diffusers_version']}, python {info['python']}, {info['cpu_count']} CPUs")
    return info


# --- noise ------------------------------------------------------------------------------------------------------

def step_noise(args, sizes: Sizes) -> dict:
    import bench_noise

    return bench_noise.main(["--device", sizes.device, "--batches", ",".join(map(str, sizes.noise_batches)),
                             "--check-images", str(sizes.noise_check_images)])


# --- null pipeline ----------------------------------------------------------------------------------------------

def step_null(args, sizes: Sizes) -> dict:
    import bench_null_pipeline

    result = {"runs": []}
    for run in sizes.null_runs:
        result["runs"].append({"args": list(run), "result": bench_null_pipeline.main(["--device", sizes.device, *run])})
        save_partial(args, "null", result)
    return result


# --- generate ---------------------------------------------------------------------------------------------------

def measure_generation(cfg: dict, sizes: Sizes, work: Path, dm_dir: Path) -> dict:
    """Warm-up, probe and measured generate_run of one configuration, each on a new run directory.

    The warm-up's loop includes one-off costs (CUDA context, cuDNN autotuning, torch.compile); the probe sizes
    the measured run to about `target_s`. Should every generate_run compile afresh (dynamo does not reuse the
    graph for a new UNet instance: the graph counter shows it), images/s is taken from the difference of the
    measured and the probe run, which paid the same compile.
    """
    import torch
    from bench_null_pipeline import zero_store
    from torch._dynamo.utils import counters

    from generator.generate import GenerateConfig, generate_run

    batch = cfg["batch_size"]
    base = GenerateConfig(dm=str(dm_dir), scale=1, out="", steps=sizes.steps, shard_size=4096, batch_size=batch,
                          chunk=cfg["chunk"], dataset="fmnist", precision=cfg["precision"], tf32=cfg["tf32"],
                          compile=cfg["compile"])

    def run(n: int, phase: str) -> tuple[dict, dict]:
        root, out = work / "stores" / f"n{n}", work / "generate" / phase
        if not root.exists():
            zero_store(root, n)
        shutil.rmtree(out, ignore_errors=True)
        graphs = counters["stats"]["unique_graphs"]
        record = generate_run(dataclasses.replace(base, out=str(out), data_root=str(root)))
        shutil.rmtree(out, ignore_errors=True)
        return dict(record["runs"][-1], new_graphs=counters["stats"]["unique_graphs"] - graphs), record

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    warm, _ = run(batch, "warmup")
    probe, _ = run(2 * batch, "probe")
    n = math.ceil((probe["images_per_s_rank0"] or 1.0) * sizes.target_s / batch) * batch
    n = max(2 * batch, min(n, max(2 * batch, sizes.max_images // batch * batch)))
    measured, record = run(n, "measure")
    rate = measured["images_per_s_rank0"]
    recompiled = measured["new_graphs"] > 0 and probe["new_graphs"] > 0
    if recompiled and n > 2 * batch and measured["loop_s_rank0"] > probe["loop_s_rank0"]:
        rate = (n - 2 * batch) / (measured["loop_s_rank0"] - probe["loop_s_rank0"])
    return {"images": n, "loop_s": measured["loop_s_rank0"], "images_per_s": round(rate, 2),
            "rate_by_difference": bool(recompiled), "warmup_loop_s": warm["loop_s_rank0"],
            "writer_blocked_s": measured["writer_blocked_s_rank0"], "writer_busy_s": measured["writer_busy_s_rank0"],
            "graphs_compiled": {"warmup": warm["new_graphs"], "probe": probe["new_graphs"],
                                "measure": measured["new_graphs"]},
            "identity_precision": record["identity"]["precision"], "identity_compile": record["identity"]["compile"],
            "noise_stream": record["identity"]["noise_stream"], "n_samples": record["n_samples"],
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def step_generate(args, sizes: Sizes) -> dict:
    import torch

    from generator.edm import write_random_dm
    from generator.sampling import SamplerConfig

    work = Path(args.work)
    dm_dir = work / f"dm-{sizes.dm_preset}"
    if not dm_dir.is_dir():
        write_random_dm(dm_dir, sizes.dm_preset)
    nfe = SamplerConfig(steps=sizes.steps).network_evaluations
    rows = []
    for cfg in sizes.generate_configs:
        row = {**cfg, "preset": sizes.dm_preset, "sampler": "edm-heun", "steps": sizes.steps, "nfe": nfe}
        left = args.deadline - time.time()
        if left < cfg["min_left_s"]:
            row.update(status="skipped", error=f"campaign budget: {left:.0f} s left")
        else:
            try:
                row.update(measure_generation(cfg, sizes, work, dm_dir), status="ok")
            except Exception as e:  # noqa: BLE001 - recorded, and the next configuration runs
                traceback.print_exc()
                row.update(status="failed", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        rows.append(row)
        print(f"generate {cfg['label']:18s} " + (f"{row['images_per_s']:10,.1f} images/s ({row['images']} images, "
                                                 f"precision {row['identity_precision']})" if row["status"] == "ok"
                                                 else f"{row['status']}: {row.get('error')}"), flush=True)
        torch._dynamo.reset()  # no compiled graph carries over to the next configuration
        save_partial(args, "generate", {"rows": rows, "projection": projection(rows)})
    return {"rows": rows, "projection": projection(rows)}


def projection(rows: list[dict]) -> dict | None:
    """Hours of SCALE = 100 and 1000 for FashionMNIST on one device at the fastest configuration measured."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["images_per_s"])
    return {"from": best["label"], **{f"scale_{k}": {"images": k * FMNIST_TRAIN,
                                                     "hours": round(k * FMNIST_TRAIN / best["images_per_s"] / 3600, 2)}
                                      for k in PROJECT_SCALES}}


# --- trainer ----------------------------------------------------------------------------------------------------

def step_trainer(args, sizes: Sizes) -> dict:
    import bench_trainer

    return bench_trainer.main(["--device", sizes.device, *sizes.trainer_args])


def train_command(root: Path, run: Path, out: Path, sizes: Sizes, seed: int = 0, *extra: str) -> list[str]:
    """`vaegen train` of a compare-study-sized FC VAE (batch 128) on the K=1 pool, evaluating twice (tiny)."""
    return [sys.executable, "-m", "vaegen", "train", "--dataset", "fmnist", "--data-root", str(root),
            "--shards", str(run), "--scale", "1", "--epochs", str(sizes.epochs),
            "--eval-every", str(max(1, sizes.epochs // 2)), "--eval-images", "256", "--batch-size", "128",
            "--seed", str(seed), "--out", str(out), *extra]


def training_rate(out: Path) -> float | None:
    """Images/s between the run's last two evaluations (no start-up, no first epoch), from metrics.jsonl."""
    metrics = read_jsonl(out / "metrics.jsonl")
    if len(metrics) < 2 or metrics[-1]["seconds"] <= metrics[-2]["seconds"]:
        return None
    return (metrics[-1]["images"] - metrics[-2]["images"]) / (metrics[-1]["seconds"] - metrics[-2]["seconds"])


def run_training(commands: list[list[str]], outs: list[Path], deadline: float, log: Path) -> list[float | None]:
    """Run `vaegen train` commands at once (each its own process, in the step's process group, so the campaign's
    timeout ends them too); their rates (None for a failed or unfinished run). Runs still going 5 s before the
    step's deadline are killed, so that the step can save what it has."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    with open(log, "a") as f:
        procs = [subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env) for cmd in commands]
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - 5 - time.time()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return [training_rate(out) if proc.returncode == 0 else None for proc, out in zip(procs, outs)]


def step_train_cli(args, sizes: Sizes) -> dict:
    work = Path(args.work)
    root, run = shard_fixture(work, sizes.n_train)
    help_text = subprocess.run([sys.executable, "-m", "vaegen", "train", "--help"], capture_output=True,
                               text=True).stdout
    result = {"n_train": sizes.n_train, "epochs": sizes.epochs, "pool_on_device_option": "--pool-on-device" in help_text}
    variants = {"streaming": ()}
    if result["pool_on_device_option"]:
        variants["pool on device"] = ("--pool-on-device",)
    else:
        print("vaegen train has no --pool-on-device in this checkout: measuring streaming only")
    for name, extra in variants.items():
        out = work / "train-cli" / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        rate, = run_training([train_command(root, run, out, sizes, 0, *extra)], [out], args.deadline,
                             Path(args.out) / "logs" / "train-cli-runs.log")
        result[name] = {"images_per_s": rate, "command": " ".join(train_command(root, run, out, sizes, 0, *extra)[1:])}
        save_partial(args, "train-cli", result)
        print(f"vaegen train {name:15s}: " + (f"{rate:10,.0f} images/s" if rate else "FAILED (see the log)"))
    return result


def step_runs_per_gpu(args, sizes: Sizes) -> dict:
    work = Path(args.work)
    root, run = shard_fixture(work, sizes.n_train)
    rows, last_s = [], 0.0
    for k in sizes.runs_per_gpu:
        left = args.deadline - time.time()
        if left < max(20.0, 1.5 * last_s):
            rows.append({"k": k, "status": "skipped", "error": f"campaign budget: {left:.0f} s left"})
            print(f"k={k}: skipped ({left:.0f} s left)")
            break
        outs = [work / "runs-per-gpu" / f"k{k}-run{i}" for i in range(k)]
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        rates = run_training([train_command(root, run, out, sizes, i) for i, out in enumerate(outs)], outs,
                             args.deadline, Path(args.out) / "logs" / "runs-per-gpu-runs.log")
        last_s = time.time() - t0
        ok = all(r is not None for r in rates)
        rows.append({"k": k, "status": "ok" if ok else "failed", "seconds": round(last_s, 1),
                     "per_run_images_per_s": rates, "aggregate_images_per_s": sum(rates) if ok else None})
        print(f"k={k:2d} concurrent runs: " + (f"{sum(rates):10,.0f} images/s in all, {sum(rates) / k:9,.0f} per run"
                                              if ok else f"FAILED ({rates})"), flush=True)
        save_partial(args, "runs-per-gpu", runs_per_gpu_result(rows, sizes))
        if not ok:
            break
    return runs_per_gpu_result(rows, sizes)


def runs_per_gpu_result(rows: list[dict], sizes: Sizes) -> dict:
    done = [r for r in rows if r["status"] == "ok"]
    saturated_at = next((a["k"] for a, b in zip(done, done[1:])
                         if b["aggregate_images_per_s"] < 1.1 * a["aggregate_images_per_s"]), None)
    return {"n_train": sizes.n_train, "epochs": sizes.epochs, "rows": rows, "growth_stops_after_k": saturated_at,
            "rule": "the first k whose next doubling adds less than 10% aggregate images/s"}


# --- the orchestration ------------------------------------------------------------------------------------------

STEP_FUNCTIONS = {"env": step_env, "noise": step_noise, "null": step_null, "generate": step_generate,
                  "trainer": step_trainer, "train-cli": step_train_cli, "runs-per-gpu": step_runs_per_gpu}


def run_step(name: str, limit: float, args, env: dict) -> dict:
    """One step in its own process (and process group, so a timeout also ends the runs it started)."""
    out = Path(args.out)
    cmd = [sys.executable, str(Path(__file__).resolve()), name, "--out", str(out), "--work", str(args.work),
           "--deadline", str(time.time() + limit), *(["--smoke"] if args.smoke else [])]
    t0 = time.time()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timeout"
    return {"step": name, "status": status, "rc": rc, "seconds": round(time.time() - t0, 1),
            "timeout_s": round(limit, 1), "log": f"logs/{name}.log"}


def cmd_run(args) -> int:
    sizes = SMOKE if args.smoke else GPU
    t0 = time.time()
    deadline = t0 + (args.budget_s or sizes.budget_s)
    out = Path(args.out).resolve()
    shutil.rmtree(out / "raw", ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir()
    (out / "steps.jsonl").unlink(missing_ok=True)
    args.out = str(out)
    args.work = tempfile.mkdtemp(prefix="vaegen-gpu-campaign-")
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               # cold compile caches inside the work dir: compile figures are a first run's, nothing is left behind
               TORCHINDUCTOR_CACHE_DIR=str(Path(args.work) / "inductor"), TRITON_CACHE_DIR=str(Path(args.work) / "triton"))
    if args.smoke:
        # torch.compile takes minutes on a CPU: the compile flags and generate_run's compile branch still run,
        # and torch.compile returns the module as it is.
        env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    write_json_atomic(out / "campaign.json", {"smoke": args.smoke, "started_epoch": t0, "budget_s": deadline - t0,
                                              "command": " ".join(sys.argv), "python": sys.executable})
    print(f"vaegen GPU campaign{' (SMOKE)' if args.smoke else ''}: budget {deadline - t0:.0f} s, results in {out}")
    try:
        for name in STEPS:
            limit = min(sizes.caps[name], deadline - COLLECT_RESERVE_S - time.time())
            if limit < 5:
                record = {"step": name, "status": "skipped", "rc": None, "seconds": 0, "timeout_s": 0,
                          "log": None}
            else:
                print(f"[{time.time() - t0:4.0f} s] {name} (at most {limit:.0f} s)", flush=True)
                record = run_step(name, limit, args, env)
                lines = (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
                shown = lines[-12:] if record["status"] == "ok" else lines[-25:]
                print("\n".join(f"    {line}" for line in shown), flush=True)
            if record["status"] != "ok":
                print(f"    {name}: {record['status']} (rc {record['rc']})")
            append_jsonl(out / "steps.jsonl", record)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    write_json_atomic(out / "campaign.json", {**read_json(out / "campaign.json"), "total_s": round(time.time() - t0)})
    print(cmd_collect(args))
    return 0


def cmd_step(args) -> int:
    sizes = SMOKE if args.smoke else GPU
    result = STEP_FUNCTIONS[args.command](args, sizes)
    write_json_atomic(Path(args.out) / "raw" / f"{args.command}.json", result)
    return 0


# --- collect ----------------------------------------------------------------------------------------------------

def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def cmd_collect(args) -> str:
    out = Path(args.out)

    def raw(name):
        path = out / "raw" / f"{name}.json"
        return read_json(path) if path.is_file() else None

    results = {"campaign": read_json(out / "campaign.json"), "steps": read_jsonl(out / "steps.jsonl"),
               **{name: raw(name) for name in STEPS}}
    write_json_atomic(out / "results.json", results)
    md = markdown(results)
    (out / "results.md").write_text(md)
    return md


def markdown(res: dict) -> str:
    camp, env = res["campaign"], res["env"] or {}
    lines = [f"# GPU campaign{' (SMOKE: CPU, tiny sizes)' if camp.get('smoke') else ''}", "",
             f"- device: {env.get('device')} ({env.get('nvidia_smi') or 'no nvidia-smi'}); torch "
             f"{env.get('torch_version')} (CUDA {env.get('torch_cuda')}), diffusers {env.get('diffusers_version')}, "
             f"python {env.get('python')}, {env.get('cpu_count')} CPUs; code {env.get('git_commit')}"
             f"{' (dirty tree)' if env.get('git_dirty') else ''}",
             f"- {camp.get('total_s', '?')} s of a {camp.get('budget_s', 0):.0f} s budget", ""]
    if noise := res["noise"]:
        lines += [f"## Initial noise on {noise['device']}", "", "| batch | us/image | of which CPU Philox bits |",
                  "|---|---|---|"]
        lines += [f"| {r['batch']} | {fmt(r['us_per_image'], 2)} | {fmt(r['cpu_bits_us_per_image'], 2)} |"
                  for r in noise["rows"]]
        lines += ["", f"The old per-image generator: {fmt(noise['per_image_generator_us_per_image'], 2)} us/image."]
        if check := noise.get("cpu_vs_device"):
            lines.append(f"Device vs CPU noise: {check['mismatches']} of {check['values']} float32 values differ "
                         f"(max {check['max_abs_difference']:.3g}).")
        lines.append("")
    if null := res["null"]:
        lines += ["## Null-model pipeline (bench_null_pipeline.py)", ""]
        for run in null["runs"]:
            gen, reader = run["result"]["generation"], run["result"]["reader"]
            if gen:
                cfg, timed = gen["config"], gen["timed"]
                lines += [f"**{cfg['sampler']} {cfg['steps']} steps, batch {cfg['batch_size']}, chunk {cfg['chunk']}:** "
                          f"{fmt(gen['best']['images_per_s'], 0)} images/s", "",
                          "| thread | stage | share of the loop | us/image |", "|---|---|---|---|"]
                for thread, key in (("main", "main_thread_s"), ("writer (parallel)", "writer_thread_s")):
                    lines += [f"| {thread} | {stage} | {100 * s / timed['loop_s']:.1f}% | "
                              f"{1e6 * s / timed['images']:.2f} |" for stage, s in timed[key].items()]
                lines.append("")
            if reader:
                lines += [f"Shard reader, one process of {name}: decode {fmt(row['decode_images_per_s'], 0)} images/s, "
                          f"epochs back to back {fmt(row['epoch_images_per_s'], 0)} images/s." for name, row in
                          reader["rows"].items()] + [""]
    if gen := res["generate"]:
        rows = gen["rows"]
        lines += [f"## `vaegen generate`, {rows[0]['preset']} preset (random weights), edm-heun {rows[0]['steps']} steps "
                  f"({rows[0]['nfe']} NFE)", "",
                  "| configuration | precision (identity) | compile | batch | images | images/s | writer blocked s | "
                  "warm-up loop s | peak GiB | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r.get('identity_precision', '–')} | {r['compile']} | {r['batch_size']} | "
                  f"{fmt(r.get('images'))} | {fmt(r.get('images_per_s'))} | {fmt(r.get('writer_blocked_s'), 3)} | "
                  f"{fmt(r.get('warmup_loop_s'), 2)} | {fmt(r.get('peak_memory_gib'), 2)} | {r['status']}"
                  f"{' (rate from measured - probe: every run compiled)' if r.get('rate_by_difference') else ''}"
                  f"{': ' + r['error'] if r.get('error') else ''} |" for r in rows]
        if p := gen.get("projection"):
            lines += ["", f"One device at the best configuration ({p['from']}): SCALE=100 (6M images) "
                          f"{p['scale_100']['hours']} h, SCALE=1000 (60M) {p['scale_1000']['hours']} h."]
        lines.append("")
    if trainer := res["trainer"]:
        lines += [f"## FC VAE training throughput (bench_trainer.py, N={trainer['n']}, batch {trainer['batch_size']})", ""]
        lines += [f"- {name}: {fmt(rate, 0)} images/s" for name, rate in trainer["images_per_s"].items()]
        lines += [f"- ratio shards / in-memory: {fmt(trainer['ratio_shards_over_in_memory'], 3)}", ""]
    if cli := res["train-cli"]:
        lines += [f"## `vaegen train` (N={cli['n_train']}, {cli['epochs']} epochs)", "",
                  f"- streaming: {fmt((cli.get('streaming') or {}).get('images_per_s'), 0)} images/s",
                  "- pool on device: " + (f"{fmt(cli['pool on device']['images_per_s'], 0)} images/s"
                                         if cli.get("pool on device") else
                                         "not measured: this checkout's `vaegen train` has no --pool-on-device"), ""]
    if runs := res["runs-per-gpu"]:
        lines += ["## Concurrent compare-sized VAE runs on one device", "",
                  "| k | aggregate images/s | per run | seconds | status |", "|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {fmt(r.get('aggregate_images_per_s'), 0)} | "
                  f"{fmt(r['aggregate_images_per_s'] / r['k'] if r.get('aggregate_images_per_s') else None, 0)} | "
                  f"{fmt(r.get('seconds'))} | {r['status']} |" for r in runs["rows"]]
        lines += ["", f"Throughput stops growing after k = {fmt(runs['growth_stops_after_k'])} ({runs['rule']}).", ""]
    lines += ["## Steps", "", "| step | status | rc | seconds | timeout s |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['timeout_s']} |" for s in res["steps"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "collect", *STEPS])
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (the same steps and code paths)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole campaign's budget [500 GPU, 300 SMOKE]")
    parser.add_argument("--work", default=None, help="(steps) the campaign's scratch directory")
    parser.add_argument("--deadline", type=float, default=math.inf, help="(steps) epoch seconds the step must end by")
    args = parser.parse_args()
    if args.command == "run":
        return cmd_run(args)
    if args.command == "collect":
        print(cmd_collect(args))
        return 0
    return cmd_step(args)


if __name__ == "__main__":
    sys.exit(main())
