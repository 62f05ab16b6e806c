"""The pipeline around the networks, with the networks taken out: what generation and the trainer's shard reader
cost per image before any model runs.

    .venv/bin/python bench/bench_null_pipeline.py                       # CPU, 32x32x1, Heun-18 sampler
    .venv/bin/python bench/bench_null_pipeline.py --images 65536 --steps 12 --device cuda --batch-size 4096

generation  `generator.generate.generate_run`, the loop `vaegen generate` runs, unchanged, with a zero-cost
            denoiser presented as the DM (`NullUNet`: the identity, no parameters to speak of). Every stage is
            timed by wrapping the function that does it (the code itself is not copied or changed):
              main thread (the critical path): noise (`sampling.initial_noise`), sampler bookkeeping
              (`sampling.solve` minus the network), the network (`NullUNet`, ~0), conversion to uint8
              (`sampling.to_uint8`), waiting on the writer (`writer.put` blocked), and the rest of the loop;
              writer thread (in parallel): packing and writing blocks (`ShardFile.write_block`: tar, npy, sha256,
              write) and committing shards (`ShardFile.commit`: fsync, rename, completion marker);
              around the loop: the resume scan (`shard_is_current`), the final check (`shard_problems`),
              index.json (`write_index`) and generation.json (`write_generation`).
            On CUDA the wrappers synchronize, so the stage shares are right and the total a little slow.
reader      the trainer's `trainer.data.ShardSource` (read, not modified) over a shard run written by the
            same `vaegen.shardformat` writer, no model: images/s of one process (one "worker") decoding an
            epoch (`epoch_share`, nothing else running) and of epochs consumed back to back through `batches()`
            (decode, shuffle, batch gather; the next epoch decoding in the background as in training), for 1
            and 2 processes' shares (a process of 2 reads half the shards).

Targets on a CPU: generation >= 50k images/s for 32x32x1 images (3x what one H200 must sustain for 60M images
in an hour); the reader well above what the trainer consumes. The figures (and the machine's load) go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import generator.sampling as sampling
from generator.edm import edm_scheduler
from generator.generate import GenerateConfig, generate_run
from vaegen import shardformat as sf
from vaegen.data import get_spec, store_attrs, store_path, write_store


class NullUNet(nn.Module):
    """A zero-cost stand-in for a diffusers UNet2DModel: returns its input (so D(x) = (c_skip + c_out c_in) x)."""

    def __init__(self, channels: int = 1, image_size: int = 32):
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels, sample_size=image_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device and a dtype, as a UNet has

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, x, timestep):
        return SimpleNamespace(sample=x)


def null_dm(channels: int = 1, image_size: int = 32, device="cpu") -> sampling.DiffusionModel:
    """A DiffusionModel (EDM preconditioning, as `vaegen dm train` saves) around a NullUNet."""
    config = {"_class_name": "EDMEulerScheduler", **edm_scheduler().config}
    return sampling.DiffusionModel(NullUNet(channels, image_size).to(device), config, "null", "0" * 64)


def zero_store(data_root: Path, n: int, dataset: str = "fmnist") -> None:
    """data_root/<dataset>.zarr with n zero training images: K=1 generates exactly n samples."""
    images = np.zeros((n, get_spec(dataset).channels, 32, 32), np.uint8)
    write_store(store_path(dataset, None, 0, data_root), {"train": (images, np.zeros(n, np.uint8))},
                store_attrs(dataset))


class StageTimer:
    """Seconds per stage, summed per thread, by wrapping module attributes for the duration of a `with`."""

    def __init__(self, cuda: bool):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.cuda, self.lock, self._undo = cuda, threading.Lock(), []

    def wrap(self, owner, name: str, stage: str, device_work: bool = True) -> None:
        """Time `owner.name` as `stage`; `device_work`: synchronize CUDA around it (the sampling thread's stages;
        the writer thread's must not wait for the sampler's kernels)."""
        original = getattr(owner, name, None)
        if original is None:  # an older checkout without this function (comparing before and after a change)
            return
        sync = self.cuda and device_work

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if sync:
                    torch.cuda.synchronize()
                with self.lock:
                    self.seconds[stage] += time.perf_counter() - t0
                    self.calls[stage] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


@contextlib.contextmanager
def null_model_generation(dm: sampling.DiffusionModel, timer: StageTimer | None):
    """`load_dm` returns `dm`; with a timer, every stage is timed (see the module docstring)."""
    real_load = sampling.load_dm
    sampling.load_dm = lambda path, device="cpu": dm
    if timer is not None:
        for owner, name, stage in ((sampling, "initial_noise", "noise"), (sampling, "solve", "solve"),
                                   (sampling, "to_uint8", "uint8"), (NullUNet, "forward", "network")):
            timer.wrap(owner, name, stage)
        for owner, name, stage in ((sf.ShardFile, "write_block", "pack+write"), (sf.ShardFile, "commit", "commit"),
                                   (sf, "shard_is_current", "resume scan"), (sf, "shard_problems", "final check"),
                                   (sf, "write_index", "index"), (sf, "write_generation", "generation.json")):
            timer.wrap(owner, name, stage, device_work=False)
    try:
        yield
    finally:
        sampling.load_dm = real_load
        if timer is not None:
            timer.restore()


def run_generation(cfg: GenerateConfig, dm, timed: bool) -> dict:
    """One generate_run on a fresh --out; images/s and (timed) the stage table."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    timer = StageTimer(cuda=dm.unet.device.type == "cuda") if timed else None
    t0 = time.perf_counter()
    with null_model_generation(dm, timer):
        record = generate_run(cfg)
    wall = time.perf_counter() - t0
    run = record["runs"][-1]
    result = {"images": record["n_samples"], "wall_s": wall, "loop_s": run["loop_s_rank0"],
              "images_per_s": record["n_samples"] / run["loop_s_rank0"], "images_per_s_wall": record["n_samples"] / wall,
              "writer_blocked_s": run["writer_blocked_s_rank0"], "writer_busy_s": run["writer_busy_s_rank0"],
              "bytes": sum(p.stat().st_size for p in Path(cfg.out).glob("shard-*.tar"))}
    if timer is not None:
        s = dict(timer.seconds)
        loop = run["loop_s_rank0"]
        main = {"noise": s.get("noise", 0.0), "sampler bookkeeping": s.get("solve", 0.0) - s.get("network", 0.0),
                "network (null)": s.get("network", 0.0), "uint8": s.get("uint8", 0.0),
                "waiting on the writer": run["writer_blocked_s_rank0"]}
        main["rest of the loop"] = max(0.0, loop - sum(main.values()))
        result["main_thread_s"] = main
        result["writer_thread_s"] = {"pack+write": s.get("pack+write", 0.0), "commit": s.get("commit", 0.0)}
        result["around_the_loop_s"] = {k: s.get(k, 0.0) for k in ("resume scan", "final check", "index",
                                                                     "generation.json")}
    return result


def bench_generation(args, work: Path) -> dict:
    device = torch.device(args.device)
    zero_store(work / "data", args.images)
    (work / "dm").mkdir(exist_ok=True)
    dm = null_dm(device=device)
    cfg = GenerateConfig(dm=str(work / "dm"), scale=1, out=str(work / "run"), sampler=args.sampler, steps=args.steps,
                         shard_size=args.shard_size, batch_size=args.batch_size, chunk=args.chunk or args.batch_size,
                         dataset="fmnist", data_root=str(work / "data"), precision="fp32", compile="off")
    run_generation(dataclasses.replace(cfg, out=str(work / "warmup")), dm, timed=False)
    untimed = [run_generation(cfg, dm, timed=False) for _ in range(args.repeats)]
    timed = min((run_generation(cfg, dm, timed=True) for _ in range(args.repeats)), key=lambda r: r["loop_s"])
    best = max(untimed, key=lambda r: r["images_per_s"])
    return {"config": {k: getattr(cfg, k) for k in ("sampler", "steps", "shard_size", "batch_size", "chunk")},
            "device": str(device), "best": best, "timed": timed}


def bench_reader(args, work: Path) -> dict:
    from trainer.data import ShardSource, open_shard_pool

    n = args.reader_images
    rng = np.random.default_rng(0)
    run_dir = work / "reader-run"
    sf.write_run(run_dir, rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), args.reader_shard_size,
                 {"dataset": "fmnist", "n_train": n})
    pool = open_shard_pool(run_dir, "fmnist", (1, 32, 32), n, 1)
    rows = {}
    for world in (1, 2):
        source = ShardSource(pool, n, args.reader_batch_size, seed=0, rank=0, world_size=world)
        try:
            decode = []
            for e in range(args.repeats):
                t0 = time.perf_counter()
                share = source.epoch_share(e)  # nothing runs beside it: no batches() call yet, so no prefetch
                decode.append(len(share) / (time.perf_counter() - t0))
            # Back to back as training consumes them (epoch e+1 decodes in the background meanwhile).
            epochs = args.repeats + 1
            t0 = time.perf_counter()
            count = sum(len(batch) for e in range(epochs) for batch in source.batches(e))
            stream = count / (time.perf_counter() - t0)
        finally:
            source.close()
        rows[f"{world} process(es)"] = {"images_per_worker": len(share), "decode_images_per_s": max(decode),
                                        "epoch_images_per_s": stream}
    return {"pool_images": n, "batch_size": args.reader_batch_size, "shard_size": args.reader_shard_size,
            "rows": rows}


def report(gen: dict | None, reader: dict | None) -> str:
    lines = []
    if gen is not None:
        cfg, best, timed = gen["config"], gen["best"], gen["timed"]
        lines += [f"generation, null denoiser, {gen['device']}: {cfg['sampler']} {cfg['steps']} steps, batch "
                  f"{cfg['batch_size']}, chunk {cfg['chunk']}, shards of {cfg['shard_size']}, {best['images']} "
                  "32x32x1 images",
                  f"  {best['images_per_s']:10,.0f} images/s (the loop; {best['images_per_s_wall']:,.0f} images/s "
                  "wall, with setup and the final index)",
                  f"  stage shares of the fastest timed run ({timed['images_per_s']:,.0f} images/s with the timers on):"]
        loop = timed["loop_s"]
        for name, seconds in timed["main_thread_s"].items():
            lines.append(f"    main   {name:24s} {100 * seconds / loop:5.1f}%  "
                         f"{1e6 * seconds / timed['images']:7.2f} us/image")
        for name, seconds in timed["writer_thread_s"].items():
            lines.append(f"    writer {name:24s} {100 * seconds / loop:5.1f}%  "
                         f"{1e6 * seconds / timed['images']:7.2f} us/image (in parallel)")
        for name, seconds in timed["around_the_loop_s"].items():
            lines.append(f"    around {name:24s} {seconds * 1e3:7.1f} ms")
    if reader is not None:
        lines.append(f"shard reader (trainer.data.ShardSource, no model): pool {reader['pool_images']} images, "
                     f"batch {reader['batch_size']}, shards of {reader['shard_size']}")
        for name, row in reader["rows"].items():
            lines.append(f"  {name:14s} one worker: decode {row['decode_images_per_s']:10,.0f} images/s, epochs back to "
                         f"back through batches() {row['epoch_images_per_s']:10,.0f} images/s "
                         f"({row['images_per_worker']} images each)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32768, help="images generated per measured run")
    parser.add_argument("--sampler", default="edm-heun")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=None, help="network chunk (default: the batch size)")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--reader-images", type=int, default=60000, help="the shard reader's pool (N, K=1)")
    parser.add_argument("--reader-batch-size", type=int, default=128)
    parser.add_argument("--reader-shard-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="runs with and without the stage timers; the "
                        "fastest of each is reported (the machine may be shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", choices=["generation", "reader"], default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # generate's progress bar would drown the figures
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-null-"))
    try:
        gen = bench_generation(args, work) if args.skip != "generation" else None
        reader = bench_reader(args, work) if args.skip != "reader" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"torch threads {torch.get_num_threads()}")
    print(report(gen, reader))
    result = {"generation": gen, "reader": reader, "torch_threads": torch.get_num_threads()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
