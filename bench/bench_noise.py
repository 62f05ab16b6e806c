"""The initial noise of DM samples (`generator.sampling.initial_noise`): microseconds per 32x32x1 image by batch
size, the CPU's part of it (the Philox bits), and the old per-image generator for reference; on a GPU also
whether the device's noise has the CPU's bytes.

    .venv/bin/python bench/bench_noise.py --threads 1                      # CPU
    .venv/bin/python bench/bench_noise.py --device cuda --batches 1,64,1024,4096 --check-images 4096

Each figure is the best of --repeats calls (the machine may be shared), synchronized with the device.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from generator.sampling import NOISE_PER_IMAGE_GENERATOR, initial_noise, philox_words

SHAPE = (1, 32, 32)


def best_seconds(fn, device: str, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,64,1024", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check-images", type=int, default=0, help="images whose CPU and device noise are compared")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    initial_noise(np.arange(64), 0, SHAPE, device=device)  # warm-up: CUDA context, kernels, allocator
    rows = []
    for n in map(int, args.batches.split(",")):
        indices = np.arange(10_000, 10_000 + n)
        total = best_seconds(lambda indices=indices: initial_noise(indices, 0, SHAPE, device=device), device,
                             args.repeats)
        bits = best_seconds(lambda indices=indices: philox_words(indices, 0, 512), "cpu", args.repeats)
        rows.append({"batch": n, "us_per_image": round(total / n * 1e6, 3),
                     "cpu_bits_us_per_image": round(bits / n * 1e6, 3)})
    legacy = best_seconds(lambda: initial_noise(np.arange(256), 0, SHAPE, NOISE_PER_IMAGE_GENERATOR), "cpu", 3)
    result = {"device": device, "torch_threads": torch.get_num_threads(), "rows": rows,
              "per_image_generator_us_per_image": round(legacy / 256 * 1e6, 3)}
    print(f"initial noise of 32x32x1 images on {device}, torch threads {torch.get_num_threads()}, best of "
          f"{args.repeats}")
    for r in rows:
        print(f"  batch {r['batch']:5d}: {r['us_per_image']:8.2f} us/image (of which the CPU's Philox bits "
              f"{r['cpu_bits_us_per_image']:.2f})")
    print(f"  the old per-image generator (batch 256, CPU): {result['per_image_generator_us_per_image']:.2f} us/image")
    if args.check_images and device != "cpu":
        indices = np.arange(args.check_images)
        on_cpu = initial_noise(indices, 0, SHAPE, device="cpu")
        on_device = initial_noise(indices, 0, SHAPE, device=device).cpu()
        result["cpu_vs_device"] = {"values": on_cpu.numel(), "mismatches": int((on_cpu != on_device).sum()),
                                   "max_abs_difference": float((on_cpu - on_device).abs().max()),
                                   "identical": bool(torch.equal(on_cpu, on_device))}
        print(f"  {device} vs CPU: {result['cpu_vs_device']['mismatches']} of {result['cpu_vs_device']['values']} "
              "float32 values differ")
    return result


if __name__ == "__main__":
    main()
