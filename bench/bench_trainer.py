"""Training throughput from shards (trainer.data.ShardSource, webdataset) vs from in-memory tensors.

Same FC VAE, same batch size, same number of images, measured side by side in one run (epochs alternate
between the paths; medians): the ratio shards / in-memory must be >= 0.9, i.e. the loader is never the
bottleneck. On a GPU a third path keeps the pool on the device (indexing a device tensor with a device
permutation, no loader, no copy per batch): what a device-resident pool can reach.
The shard run is written here (random FashionMNIST-shaped images; the pixel values do not matter for speed).

    .venv/bin/python bench/bench_trainer.py [--n 10000 --epochs 6 --device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.data import ShardSource, open_shard_pool
from trainer.models import build_vae
from vaegen.shardformat import write_run


class Trainer:
    """The FC VAE training step, timed per epoch for a given batch iterator."""

    def __init__(self, device: str):
        torch.manual_seed(0)
        self.device = device
        self.vae = build_vae({"arch": "fc"}).to(device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=1e-3)

    def epoch_rate(self, batches) -> float:
        seen, start = 0, time.perf_counter()
        for images in batches:
            x = self.vae.preprocess(images.to(self.device, non_blocking=True))
            loss = -self.vae(x).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            seen += len(images)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="images per effective epoch (N)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per path")
    parser.add_argument("--scale", type=int, default=3, help="pool of scale*N shard samples")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    pool_images = rng.integers(0, 256, (args.scale * args.n, 1, 32, 32), dtype=np.uint8)
    in_memory = torch.from_numpy(pool_images[:args.n].copy())
    on_device = in_memory.to(args.device)

    def memory_batches(epoch):
        order = torch.randperm(args.n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, args.n, args.batch_size):
            yield in_memory[order[i:i + args.batch_size]]

    def device_batches(epoch):
        generator = torch.Generator(device=args.device).manual_seed(epoch)
        order = torch.randperm(args.n, generator=generator, device=args.device)
        for i in range(0, args.n, args.batch_size):
            yield on_device[order[i:i + args.batch_size]]

    paths = {"in-memory": memory_batches}
    if not args.device.startswith("cpu"):
        paths["device pool"] = device_batches
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        write_run(run_dir, pool_images, args.shard_size, {"dataset": "fmnist", "n_train": args.n})
        pool = open_shard_pool(run_dir, "fmnist", (1, 32, 32), args.n, args.scale)
        source = ShardSource(pool, args.n, args.batch_size, seed=0)
        paths["shards"] = source.batches
        trainer = Trainer(args.device)
        rates = {name: [] for name in paths}
        # Alternate epoch by epoch on the same model, so every path sees the same machine load (the CPU may be
        # shared); the shard path's epochs include its first, unprefetched, load.
        for epoch in range(args.epochs):
            for name, batches in paths.items():
                rates[name].append(trainer.epoch_rate(batches(epoch)))
        source.close()
    median = {k: float(np.median(v)) for k, v in rates.items()}
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, N={args.n}, batch {args.batch_size}, "
          f"FC VAE, {args.epochs} alternating epochs per path (median)")
    for name, values in rates.items():
        print(f"  {name:11s} {median[name]:9.0f} img/s   (per epoch: {', '.join(f'{v:.0f}' for v in values)})")
    ratio = median["shards"] / median["in-memory"]
    print(f"ratio shards / in-memory = {ratio:.3f}  ({'OK' if ratio >= 0.9 else 'BELOW'} the 0.9 target)")
    result = {"device": args.device, "n": args.n, "batch_size": args.batch_size, "epochs": args.epochs,
              "images_per_s": median, "per_epoch": rates, "ratio_shards_over_in_memory": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
