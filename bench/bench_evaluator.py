"""Evaluator speed: batched q* optimization vs one point at a time, and IWAE k=5000 on the FashionMNIST test set.

1. Amortization gap: the same per-datapoint Adam optimization (same settings, same convergence test) run on
   `--points` test images all together vs one image at a time (as in the original amortization-gap code),
   side by side in one run; prints both wall times, the speed-up ratio and both mean gaps (they agree up to
   Monte-Carlo noise: the computation per point is identical, only the noise draws differ).
2. IWAE log p(x) with k=5000 on the full FashionMNIST test set (10000 images): wall time and images/s.

FC VAE (the paper's MNIST-type model): random init by default (speed does not depend on the weights), or a
trained one with --run-dir. Needs data/fmnist.zarr (`vaegen data fmnist`).

    .venv/bin/python bench/bench_evaluator.py [--points 100 --iwae-images 10000 --device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from evaluator.gaps import PosteriorOptConfig, amortization_gap, batches
from evaluator.likelihood import iwae_log_px
from trainer.models import build_vae, load_vae
from vaegen.data import open_dataset


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100, help="test images for the q* comparison")
    parser.add_argument("--max-iters", type=int, default=300, help="Adam steps cap per point (both runs)")
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--iwae-images", type=int, default=10000, help="test images for IWAE (10000 = all)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--max-decode", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--run-dir", default=None, help="a trained VAE run (default: random-init FC VAE)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--skip-qstar", action="store_true", help="only the IWAE timing")
    parser.add_argument("--skip-iwae", action="store_true", help="only the q* comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is faster for small ops when the cores are shared)")
    args = parser.parse_args()

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = load_vae(args.run_dir, device) if args.run_dir else build_vae({"arch": "fc"}).to(device).eval()
    vae.requires_grad_(False)
    test = open_dataset("fmnist", "test", root=args.data_root)
    x_all = vae.preprocess(torch.from_numpy(test.images).to(device))
    print(f"device {device}, threads {torch.get_num_threads()}, model {vae.config['arch']} "
          f"({'trained: ' + args.run_dir if args.run_dir else 'random init'})")

    if not args.skip_qstar:
        # 1. batched vs one point at a time, same settings (after a warm-up: first calls allocate and dispatch)
        x = x_all[:args.points]
        settings = PosteriorOptConfig(max_iters=args.max_iters, eval_samples=100)
        amortization_gap(vae, x[:2], PosteriorOptConfig(max_iters=20), progress=False)
        batched, t_batched = timed(lambda: amortization_gap(
            vae, x, settings, torch.Generator(device=device).manual_seed(0), args.max_decode, progress=False), device)
        one_by_one = PosteriorOptConfig(**{**settings.__dict__, "batch_size": 1})
        single, t_single = timed(lambda: amortization_gap(
            vae, x, one_by_one, torch.Generator(device=device).manual_seed(0), args.max_decode, progress=False), device)
        print(f"\nq* optimization, {args.points} points, <= {args.max_iters} Adam steps, "
              f"{settings.samples_per_step} samples/step")
        print(f"  batched      {t_batched:9.2f} s   G_a = {batched.gap.mean():8.3f}   "
              f"mean steps {batched.iterations.float().mean():.0f}")
        print(f"  one at a time{t_single:9.2f} s   G_a = {single.gap.mean():8.3f}   "
              f"mean steps {single.iterations.float().mean():.0f}")
        print(f"  speed-up (one at a time / batched): {t_single / t_batched:.1f}x")

    # 2. IWAE k=5000 on the test set
    if args.skip_iwae:
        return
    x = x_all[:args.iwae_images]
    generator = torch.Generator(device=device).manual_seed(0)

    def run_iwae():
        return torch.cat([iwae_log_px(vae, x[sl], args.iwae_k, generator, args.max_decode)
                          for sl in batches(len(x), args.batch_size, f"IWAE k={args.iwae_k}")])

    log_px, t_iwae = timed(run_iwae, device)
    print(f"\nIWAE k={args.iwae_k} on {len(x)} FashionMNIST test images: {t_iwae:.1f} s "
          f"({len(x) / t_iwae:.1f} images/s, {len(x) * args.iwae_k / t_iwae:,.0f} decoded latents/s), "
          f"mean log p(x) {log_px.mean():.2f} nats")


if __name__ == "__main__":
    main()
