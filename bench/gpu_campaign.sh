#!/usr/bin/env bash
# The GPU campaign (bench/gpu_campaign.py says what it measures), in one call of under 10 minutes:
#
#   bash bench/gpu_campaign.sh                     # on the GPU machine (needs nothing but this repository)
#   SMOKE=1 bash bench/gpu_campaign.sh             # the same steps at tiny sizes on a CPU (a few minutes)
#   OUT=DIR PYTHON=/path/to/python BUDGET_S=500 WHEELS=.whl PACK=1 bash bench/gpu_campaign.sh
#
# This script only finds a python that can import the stack (PYTHON, else .venv/bin/python, else python3; if it
# cannot, it installs the wheels in WHEELS (default .whl/: diffusers, webdataset, zarr, ... carried to an
# offline machine whose python3 has torch) into a scratch directory, and failing that tries `make setup`), then
# runs `gpu_campaign.py run`. Output in OUT (default bench/results/gpu-campaign-<date>/): results.json,
# results.md, logs/, raw/ (every step's figures), and logs.tar.gz of logs/ and raw/ (PACK=1: only results.json,
# results.md and logs.tar.gz stay, for a machine that returns only a few files).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SMOKE="${SMOKE:-0}"
OUT="${OUT:-bench/results/gpu-campaign-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/vaegen-campaign-python.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # vaegen importable even by a python it is not installed in

say() { printf '%s\n' "$*"; }

find_python() {
    local imports="import torch, diffusers, webdataset, zarr, accelerate, click"
    local candidate=${PYTHON:-} wheels=${WHEELS:-$REPO/.whl}
    if [ -z "$candidate" ]; then
        if [ -x .venv/bin/python ]; then candidate=.venv/bin/python; else candidate=python3; fi
    fi
    if "$candidate" -c "$imports" >"$OUT/logs/python-check.log" 2>&1; then
        PY=$candidate
        return 0
    fi
    say "python: $candidate cannot import the stack ($(tail -n 1 "$OUT/logs/python-check.log"))"
    if compgen -G "$wheels/*.whl" >/dev/null; then
        say "python: installing the wheels in $wheels for $candidate (no index)"
        if timeout 120 "$candidate" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SCRATCH/site" "$wheels"/*.whl >"$OUT/logs/wheels.log" 2>&1; then
            export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"  # after site-packages' torch: carry only what is missing
            if "$candidate" -c "$imports" >>"$OUT/logs/python-check.log" 2>&1; then
                PY=$candidate
                return 0
            fi
        fi
        say "python: still missing after the wheels (see logs/wheels.log)"
    fi
    say "python: trying make setup"
    if PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=15 timeout 240 make setup >"$OUT/logs/setup.log" 2>&1 \
        && .venv/bin/python -c "$imports" >>"$OUT/logs/python-check.log" 2>&1; then
        PY=.venv/bin/python
        return 0
    fi
    say "python: none found. Install torch, diffusers, webdataset, zarr, accelerate and click, carry their wheels" \
        "in $wheels, or pass PYTHON=/path/to/python (logs/setup.log: $(tail -n 1 "$OUT/logs/setup.log"))"
    return 1
}

if ! find_python; then
    printf '{"campaign": {"error": "no python with torch, diffusers, webdataset, zarr, accelerate, click"}}\n' \
        >"$OUT/results.json"
    printf '# GPU campaign\n\nNo usable python: see logs/python-check.log and logs/setup.log.\n' >"$OUT/results.md"
    exit 1
fi
ARGS=(run --out "$OUT")
[ "$SMOKE" = 1 ] && ARGS+=(--smoke)
[ -n "${BUDGET_S:-}" ] && ARGS+=(--budget-s "$BUDGET_S")
"$PY" bench/gpu_campaign.py "${ARGS[@]}"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs raw campaign.json steps.jsonl 2>/dev/null || true
if [ "${PACK:-0}" = 1 ]; then
    rm -rf "${OUT:?}/logs" "${OUT:?}/raw" "$OUT/campaign.json" "$OUT/steps.jsonl"
fi
say "results: $OUT/results.json, $OUT/results.md; logs in $OUT/logs.tar.gz"
