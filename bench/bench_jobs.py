"""A study's VAE phase sequentially (`--jobs 1`) vs in parallel (`--jobs N`), side by side in one invocation:
wall time of each, the speed-up, and whether every run's weights and gaps are bit-identical.

    python bench/bench_jobs.py                                 # make compare's VAE phase, seed 0, cpu preset
    python bench/bench_jobs.py --preset smoke --study compare   # a quick check
    python bench/bench_jobs.py --seeds 0 --parallel-out runs/studies/compare-fmnist-cpu   # then `make compare`
                                                               # resumes the parallel half with the other seeds

The prerequisites (data, DM, shards) are built first, untimed, by the sequential study; both studies then only
train and evaluate their VAE runs (the prerequisites are shared files under runs/dm/ and shards/, so the second
study finds them). The sequential study runs with the environment's threads (torch's default: every core), as
`make compare JOBS=1` would; the parallel one gives each job cores / N threads. Target (issue 16): >= 1.6x on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def study(args: argparse.Namespace, jobs: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "vaegen", "study", args.study, "--dataset", args.dataset, "--preset", args.preset,
           "--seeds", args.seeds, "--jobs", str(jobs), "--out", str(out)]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode:
        sys.exit(f"the --jobs {jobs} study failed (its error is above); nothing was measured")
    return time.perf_counter() - start


def measured(path: Path) -> dict | None:
    """gaps.json without what names the run (its directory, command and time), which differs by design."""
    if not path.exists():
        return None
    gaps = json.loads(path.read_text())
    return {k: v for k, v in gaps.items() if k not in ("provenance", "run_dir")}


def same_results(one: Path, two: Path) -> tuple[int, list[str]]:
    """(runs compared, runs whose weights or gaps differ) over the runs both study directories finished."""
    names = sorted(p.parent.name for p in (one / "runs").glob("*/model.safetensors")
                   if (two / "runs" / p.parent.name / "model.safetensors").exists())
    differ = []
    for name in names:
        a, b = one / "runs" / name, two / "runs" / name
        gaps = [measured(d / "eval" / "gaps.json") for d in (a, b)]
        if (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes() or gaps[0] != gaps[1]:
            differ.append(name)
    return len(names), differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="compare")
    ap.add_argument("--dataset", default="fmnist")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", default="0", help="seeds of both studies (default: one seed, 4 VAE runs)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs (default: one per core)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/jobs"), help="where the study directories go")
    ap.add_argument("--parallel-out", type=Path, default=None,
                    help="the parallel study's directory (default: WORK/jobsN), e.g. the real study's, to keep its runs")
    args = ap.parse_args()
    sequential = args.work / "jobs1"
    parallel = args.parallel_out or args.work / f"jobs{args.jobs}"
    for d in (sequential, parallel):
        if (d / "runs").exists() and any((d / "runs").iterdir()):
            sys.exit(f"{d} already holds runs: a resumed study would time nothing; choose an empty --work")

    # The sequential study builds the prerequisites; `study.json` records each invocation's VAE phase alone
    # (`vae_minutes`), which is what is compared.
    t_seq = study(args, 1, sequential)
    t_par = study(args, args.jobs, parallel)
    vae = [60 * json.loads((d / "study.json").read_text())["vae_minutes"] for d in (sequential, parallel)]
    compared, differ = same_results(sequential, parallel)
    print(f"whole study (the first also built the prerequisites): {t_seq:.0f} s vs {t_par:.0f} s")
    print(f"VAE phase: jobs 1 {vae[0]:.0f} s, jobs {args.jobs} {vae[1]:.0f} s: speed-up {vae[0] / vae[1]:.2f}x")
    print(f"bit-identical weights and gaps: {compared - len(differ)} of {compared} runs"
          + (f" (differ: {', '.join(differ)})" if differ else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
