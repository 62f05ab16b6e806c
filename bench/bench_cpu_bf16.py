"""The CPU fast path: bf16 against fp32 for DM training and Heun sampling, side by side, and what bf16 does to the
samples (`dm score`'s metrics of both sets against the same real images).

    .venv/bin/python bench/bench_cpu_bf16.py --dm models/fmnist-n1000-s0-small [--n 1000] [--threads 2]

Training: the `small` preset for --train-steps steps from the same seed, fp32 (`--mixed-precision no`) and bf16
(Accelerate's CPU autocast, `--mixed-precision bf16`), interleaved in --rounds; images/s from each step's wall time.
Sampling: Heun at --steps steps on the same noise, the network in fp32 and cast to bf16 (as `vaegen-generate
--precision bf16` does), interleaved in chunks; then both sample sets are scored exactly as `vaegen dm score`
scores (one Scorer: same classifier, same real references). Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from generator.sampling import SamplerConfig, sample
from generator.score import ScoreConfig, Scorer


def native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 dot products itself (else torch emulates them)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def train_rate(data_root: str, precision: str, steps: int, out: Path, threads: int) -> float:
    """images/s of `steps` small-preset DM steps, from the loop's own log (a process each: Accelerate fixes the
    mixed-precision mode once per process)."""
    subprocess.run([sys.executable, "-m", "vaegen", "dm", "train", "--dataset", "fmnist", "--subset", "1000",
                    "--preset", "small", "--data-root", data_root, "--out", str(out), "--max-steps", str(steps),
                    "--checkpoint-every", str(10 ** 6), "--grid-samples", "1", "--mixed-precision", precision,
                    "--threads", str(threads)], check=True, capture_output=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return log[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dm", required=True, help="A trained DM (sampling and scoring).")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--n", type=int, default=1000, help="Samples per precision (and real images scored).")
    parser.add_argument("--steps", type=int, default=12, help="Heun steps (the cpu preset's 12).")
    parser.add_argument("--chunks", type=int, default=4, help="Sampling alternates precisions over this many chunks.")
    parser.add_argument("--train-steps", type=int, default=40, help="DM training steps per precision and round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/cpu_bf16.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"native_bf16": native_bf16(), "threads": torch.get_num_threads(), "n": args.n,
              "sampler": f"edm-heun {args.steps}", "train_steps": args.train_steps}

    rates = {"no": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in (("no", "bf16") if r % 2 == 0 else ("bf16", "no")):
                rates[precision].append(train_rate(args.data_root, precision, args.train_steps,
                                                   Path(tmp) / f"{precision}-{r}", torch.get_num_threads()))
    result["train_images_per_s"] = {"fp32": max(rates["no"]), "bf16": max(rates["bf16"])}

    scorer = Scorer(ScoreConfig(dm=args.dm, data_root=args.data_root, n=args.n))
    config = SamplerConfig(name="edm-heun", steps=args.steps)
    edges = [round(i * args.n / args.chunks) for i in range(args.chunks + 1)]
    samples, seconds = {"fp32": [], "bf16": []}, {"fp32": 0.0, "bf16": 0.0}
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            start = time.perf_counter()
            samples[name].append(sample(scorer.dm, range(lo, hi), 0, config, "cpu", dtype=dtype))
            seconds[name] += time.perf_counter() - start
    result["sample_images_per_s"] = {k: args.n / v for k, v in seconds.items()}
    result["scores"] = {}
    for name, parts in samples.items():
        images = torch.cat(parts).numpy()
        record = scorer.record(ScoreConfig(dm=args.dm, data_root=args.data_root, n=args.n, sampler=config), images)
        result["scores"][name] = {k: record["samples"][k] for k in ("fd", "precision", "recall", "c2st_accuracy")}
        floor = record["floor_real_test_vs_train"]
    result["scores"]["real floor"] = {k: floor[k] for k in ("fd", "precision", "recall", "c2st_accuracy")}
    result["identical_images"] = int((torch.cat(samples["fp32"]) == torch.cat(samples["bf16"])).all(dim=(1, 2, 3))
                                     .sum())

    t, s = result["train_images_per_s"], result["sample_images_per_s"]
    print(f"native bf16: {result['native_bf16']}, {result['threads']} thread(s)")
    print(f"DM training (small, batch 64): fp32 {t['fp32']:.1f} img/s, bf16 {t['bf16']:.1f} img/s "
          f"({t['bf16'] / t['fp32']:.2f}x)")
    print(f"Heun-{args.steps} sampling: fp32 {s['fp32']:.2f} img/s, bf16 {s['bf16']:.2f} img/s "
          f"({s['bf16'] / s['fp32']:.2f}x)")
    print("scores (FD, precision, recall, C2ST accuracy):")
    for name, score in result["scores"].items():
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in score.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
