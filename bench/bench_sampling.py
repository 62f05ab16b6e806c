"""Sampling speed: our EDM Heun loop vs the same model through diffusers' own scheduler loop, side by side.

    .venv/bin/python bench/bench_sampling.py [--dm runs/dm/NAME] [--n 64] [--device cpu|cuda] [--threads 1]

Both sides run the same UNet on the same batch with the same number of network evaluations (35 = Heun-18).
"ours" is `generator.sampling.sample` (EDM Algorithm 1, per-index seeding, fixed-shape chunks, uint8 output).
"diffusers" is the loop every diffusers pipeline runs (`scale_model_input` -> UNet -> `scheduler.step`) with
the model's EDMEulerScheduler for 35 steps, and diffusers' `randn_tensor` with one generator per image.
Speed does not depend on the weights, so without --dm a randomly initialised `small`-preset UNet is used.
Runs alternate (ours, diffusers, diffusers, ours, ...) so that a shared machine's load hits both alike;
the best of --repeats is reported. Target: ours/diffusers >= 1 (our loop must not be slower).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import EDMEulerScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from generator.edm import write_random_dm
from generator.sampling import SamplerConfig, load_dm, sample


@torch.no_grad()  # as diffusers pipelines run
def diffusers_loop(unet: UNet2DModel, scheduler: EDMEulerScheduler, n: int, steps: int, device) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=generators, device=torch.device(device)) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(unet(model_input, t).sample, t, x).prev_sample
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dm", default=None, help="A trained DM directory (default: random small-preset UNet).")
    parser.add_argument("--n", type=int, default=64, help="Images per run (one batch / one chunk).")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps (network evaluations: 2*steps-1).")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dm
        if path is None:
            path = write_random_dm(tmp, "small")
        dm = load_dm(path, args.device)
        unet = dm.unet
        scheduler = EDMEulerScheduler.from_config(dm.scheduler_config)
        config = SamplerConfig(steps=args.steps, chunk=args.n)
        nfe = config.network_evaluations

        runs = {
            "ours (edm-heun)": lambda: sample(dm, range(args.n), 0, config, args.device),
            "diffusers loop (EDMEuler)": lambda: diffusers_loop(unet, scheduler, args.n, nfe, args.device),
        }
        with torch.no_grad():  # warm-up: first-call allocations and kernel selection
            unet(torch.zeros(args.n, dm.channels, dm.image_size, dm.image_size, device=args.device),
                 torch.zeros(1, device=args.device))
        best = {name: float("inf") for name in runs}
        for repeat in range(args.repeats):
            order = list(runs.items()) if repeat % 2 == 0 else list(runs.items())[::-1]
            for name, run in order:
                synchronize(args.device)
                start = time.perf_counter()
                run()
                synchronize(args.device)
                best[name] = min(best[name], time.perf_counter() - start)

    params = sum(p.numel() for p in unet.parameters())
    print(f"model: {path if args.dm else 'random small preset'} ({params / 1e6:.2f}M params), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.n}, {nfe} network evaluations per image")
    for name, seconds in best.items():
        print(f"{name:28s} {args.n * nfe / seconds:9.1f} network evals/s {args.n / seconds:8.2f} images/s "
              f"({seconds:.2f} s)")
    ours, theirs = best.values()
    print(f"speed ratio ours/diffusers: {theirs / ours:.3f} (>= 1 means ours is not slower)")


if __name__ == "__main__":
    main()
