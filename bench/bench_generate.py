"""Shard generation throughput: end to end (`generate_run`: sampling + writer thread + index and generation
records) vs the same sampling calls with no writing, side by side in one process; bytes per image vs raw pixels.

    python bench/bench_generate.py                                   # a tiny random UNet, CPU
    python bench/bench_generate.py --dm runs/dm/fmnist-small --n 2048 --steps 18

Prints images/s of both, the overhead ratio (end to end / sampling only; the target is >= 0.95, i.e. writing
costs < 5% of the wall time), the time the sampler waited on the writer, disk bytes per image / raw pixel
bytes (target <= 1.1), and on request channels_last on/off for the sampling-only loop. Each measurement is
repeated and the best kept, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_null_pipeline import zero_store

from generator.edm import write_random_dm
from generator.generate import GenerateConfig, generate_run
from generator.sampling import SamplerConfig, load_dm, sample
from vaegen.data import get_spec


def sampling_only(dm, n, cfg: GenerateConfig, sampler: SamplerConfig, device, dtype) -> float:
    """Seconds to draw the same n images in the same batches as `generate_run`, discarding them."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, n, cfg.shard_size):
            last = min(first + cfg.shard_size, n)
            for lo in range(first, last, cfg.batch_size):
                sample(dm, np.arange(lo, min(lo + cfg.batch_size, last)), cfg.seed, sampler, device=device,
                       dtype=dtype).numpy()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dm", default=None, help="DM directory (default: a random tiny UNet)")
    parser.add_argument("--n", type=int, default=1024, help="images per measurement")
    parser.add_argument("--sampler", default="edm-heun")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--channels-last-check", action="store_true",
                        help="also time the sampling-only loop without channels_last")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        if args.dm:  # a copy without dm.json, so that N can be set to --n (no training-store check)
            skip = shutil.ignore_patterns("dm.json", "checkpoints")
            dm_dir = Path(shutil.copytree(args.dm, work / "dm", ignore=skip))
            dm_json = Path(args.dm) / "dm.json"
            meta = json.loads(dm_json.read_text()) if dm_json.is_file() else {}
        else:
            dm_dir, meta = write_random_dm(work / "dm", "tiny"), {}
        dataset = meta.get("dataset", "fmnist")
        zero_store(work / "data", args.n, dataset)
        channels = get_spec(dataset).channels
        cfg = GenerateConfig(dm=str(dm_dir), scale=1, out="", sampler=args.sampler, steps=args.steps,
                             shard_size=args.shard_size, batch_size=args.batch_size, chunk=args.chunk,
                             dataset=dataset, data_root=str(work / "data"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sampler = SamplerConfig(name=args.sampler, steps=args.steps,
                                **({"chunk": args.chunk} if args.chunk else {}))
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        dm = load_dm(str(dm_dir), device)
        dm.unet.to(memory_format=torch.channels_last)
        if device.type == "cuda":  # as generate does by default there: compiled, so both sides are the same
            dm.unet = torch.compile(dm.unet)
        sampling_only(dm, min(args.n, sampler.chunk), cfg, sampler, device, dtype)  # warm-up / compile

        # Wall seconds and CPU seconds (all threads of this process: robust to other load on a shared CPU).
        only, full, cpu_only, cpu_full = [], [], [], []
        for r in range(args.repeats):  # interleaved, so background load hits both sides alike
            c0 = time.process_time()
            only.append(sampling_only(dm, args.n, cfg, sampler, device, dtype))
            cpu_only.append(time.process_time() - c0)
            out = work / f"run{r}"
            t0, c0 = time.perf_counter(), time.process_time()
            record = generate_run(dataclasses.replace(cfg, out=str(out)))
            full.append((time.perf_counter() - t0, record["runs"][-1]))
            cpu_full.append(time.process_time() - c0)
            size = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
            shutil.rmtree(out)
        best_full, run = min(full, key=lambda x: x[0])

        raw = args.n * channels * 32 * 32
        ips_only, ips_full = args.n / min(only), args.n / best_full
        print(f"device {device}, dtype {dtype}, DM {args.dm or 'random tiny UNet'}, {args.sampler} {args.steps} "
              f"steps (chunk {sampler.chunk}), {args.n} images, shard size {args.shard_size}, "
              f"batch {args.batch_size}, best of {args.repeats}")
        print(f"sampling only       {ips_only:10.1f} img/s")
        print(f"end to end          {ips_full:10.1f} img/s   (incl. DM load, checks, index and records)")
        print(f"overhead ratio      {ips_full / ips_only:10.3f}   (end to end / sampling only; target >= 0.95)")
        if device.type == "cpu":
            print(f"CPU-time ratio      {min(cpu_only) / min(cpu_full):10.3f}   (sampling only / end to end CPU "
                  "seconds, all threads; the wall ratio's analogue on a busy machine)")
        print(f"generate's loop     {args.n / run['loop_s_rank0']:10.1f} img/s   (sampling + handing off to the writer)")
        print(f"sampler waited on writer {run['writer_blocked_s_rank0']:.3f} s of {run['loop_s_rank0']:.3f} s "
              f"({100 * run['writer_blocked_s_rank0'] / run['loop_s_rank0']:.2f}%); writer thread busy "
              f"{run['writer_busy_s_rank0']:.3f} s")
        print(f"bytes per image     {size / args.n:10.1f}   raw {raw / args.n:.0f}  ratio {size / raw:.4f} "
              f"(target <= 1.1)")
        if args.channels_last_check:
            dm_plain = load_dm(str(dm_dir), device)
            plain = min(sampling_only(dm_plain, args.n, cfg, sampler, device, dtype) for _ in range(args.repeats))
            print(f"sampling only, no channels_last {args.n / plain:10.1f} img/s "
                  f"(channels_last speed-up {plain / min(only):.3f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
