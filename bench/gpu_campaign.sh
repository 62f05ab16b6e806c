#!/usr/bin/env bash
# GPU measurement campaign: what vaegen's three stages do on one GPU, in one run of under 10 minutes.
#
#   bash bench/gpu_campaign.sh                     # on the GPU machine (needs nothing but this repository)
#   SMOKE=1 bash bench/gpu_campaign.sh             # the same steps at tiny sizes on a CPU (a few minutes)
#   OUT=DIR PYTHON=/path/to/python BUDGET_S=540 WHEELS=.whl PACK=1 bash bench/gpu_campaign.sh
#
# Measures, side by side within the run:
#   1. shard generation images/s (generator.generate.generate_run, the `vaegen generate` loop) for the tiny,
#      small and paper DM presets (random weights), fp32 vs bf16, eager vs torch.compile vs CUDA graphs
#      (reduce-overhead), chunk 64/256/1024; a few-step sampler, scaled to Heun-18 by NFE, and the fastest
#      configuration (plus the Makefile's settings) measured directly at Heun-18;
#   2. the projected wall time of `make shards DATASET=fmnist SCALE=100|1000` on one GPU from that;
#   3. VAE training from shards vs in-memory tensors (bench/bench_trainer.py);
#   4. batched vs one-at-a-time q* (bench/bench_evaluator.py --skip-iwae);
# plus the device, driver and versions. Output in $OUT (default bench/results/gpu-campaign-<date>/):
# results.json, results.md, logs/ (one log per step), raw/ (rows, generation.json of every measured run), and
# logs.tar.gz holding logs/, raw/ and the step files (PACK=1: only results.json, results.md and logs.tar.gz stay).
#
# Every step runs under `timeout` and within the campaign's budget (BUDGET_S from the start, default 540 s on
# a GPU): a failing or hung step is recorded in steps.jsonl and the campaign goes on. Steps run in order of
# importance, so when the budget runs short it is the later compile variants that are skipped.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
T0=$(date +%s)
SMOKE="${SMOKE:-0}"
OUT="${OUT:-bench/results/gpu-campaign-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs" "$OUT/raw"
OUT="$(cd "$OUT" && pwd)"
: >"$OUT/steps.jsonl"
: >"$OUT/raw/gen.jsonl"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vaegen-gpu-campaign.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # vaegen importable even by a python it is not installed in
export TQDM_DISABLE=1                                  # progress bars would drown the figures in the logs
export PYTHONUNBUFFERED=1                              # figures reach the console as they are measured
# Cold compile caches inside the work dir: compile warm-up figures are a first run's, and nothing is left behind.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache" TRITON_CACHE_DIR="$WORK/triton-cache"

say() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }

# --- the campaign's sizes -----------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    BUDGET_S="${BUDGET_S:-300}"
    PRESETS="tiny"
    PROJECT_PRESET="tiny"          # stands in for paper: same code path, CPU-sized
    MATRIX_STEPS=2                 # edm-heun 2 steps = 3 NFE
    EAGER_SPECS="fp32:off:default:8:16 fp32:off:default:16:16 bf16:off:default:16:16"
    # torch.compile on a CPU takes minutes even for the tiny UNet, so SMOKE runs with dynamo disabled: the
    # compile flags and generate_run's compile branch are exercised, and torch.compile returns the module as is.
    export TORCHDYNAMO_DISABLE=1 TORCH_COMPILE_DISABLE=1
    COMPILED=("tiny fp32:on:default:16:16" "tiny fp32:on:reduce-overhead:16:16")
    DEFAULTS_SPEC="auto:auto:default:8:8"
    GEN_ARGS=(--target-s 0.3 --max-images 32 --min-batches 1 --min-left 5 --threads 1)
    HEUN_ARGS=(--target-s 0.3 --max-images 16 --min-batches 1 --min-left 5 --threads 1)
    CLI_ARGS=(--precision fp32 --chunk 16 --batch-size 16 --threads 1)
    CLI_N=32
    TRAINER_ARGS=(--device cpu --n 1024 --scale 2 --epochs 2 --shard-size 512)
    EVALUATOR_ARGS=(--skip-iwae --device cpu --points 4 --max-iters 20 --threads 1)
    RESERVE_S=60                   # kept for the Heun-18 step and the report
    CAP_GEN=120 CAP_COMPILED=90 CAP_BENCH=90
    PREPARE_ARGS=(--threads 1)
    export OMP_NUM_THREADS=1
else
    BUDGET_S="${BUDGET_S:-540}"
    PRESETS="tiny small paper"
    PROJECT_PRESET="paper"
    MATRIX_STEPS=4                 # edm-heun 4 steps = 7 NFE: network-bound like Heun-18, 5x shorter
    EAGER_SPECS=""
    for precision in fp32 bf16; do
        for chunk in 64 256 1024; do EAGER_SPECS+="$precision:off:default:$chunk:1024 "; done
    done
    # In order of importance: a compile of the paper UNet takes about a minute, so not all may fit.
    COMPILED=("paper bf16:on:default:1024:1024" "paper bf16:on:reduce-overhead:1024:1024"
              "small bf16:on:reduce-overhead:1024:1024" "tiny bf16:on:reduce-overhead:1024:1024"
              "paper fp32:on:default:1024:1024" "paper auto:auto:default:64:256"
              "small bf16:on:default:1024:1024" "tiny bf16:on:default:1024:1024"
              "paper bf16:on:reduce-overhead:256:1024" "paper fp32:on:reduce-overhead:1024:1024")
    DEFAULTS_SPEC="auto:auto:default:64:256"  # what `make shards` runs: --precision/--compile auto, chunk 64
    GEN_ARGS=(--target-s 2.5 --max-images 131072 --min-batches 2 --min-left 20)
    HEUN_ARGS=(--target-s 6 --max-images 65536 --min-batches 2 --min-left 25)
    CLI_ARGS=(--precision bf16 --chunk 256 --batch-size 1024)
    CLI_N=16384
    TRAINER_ARGS=(--device cuda --n 60000 --scale 2 --epochs 4)
    EVALUATOR_ARGS=(--skip-iwae --device cuda --points 50 --max-iters 300)
    PREPARE_ARGS=()
    RESERVE_S=140
    CAP_GEN=150 CAP_COMPILED=200 CAP_BENCH=150
fi
DEADLINE=$((T0 + BUDGET_S))
STEP_DEADLINE=$DEADLINE   # lowered while the optional compile variants run, to keep RESERVE_S for the end

# --- steps --------------------------------------------------------------------------------------------------

# run_step NAME CAP CMD...: run CMD under `timeout` (CAP seconds, or less to stay within the budget), output
# to logs/NAME.log (stdout also to the console), and record the outcome in steps.jsonl. Never fails itself.
run_step() {
    local name=$1 cap=$2 log="$OUT/logs/$1.log" start left limit rc status
    shift 2
    start=$(date +%s)
    left=$((STEP_DEADLINE - start))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        say "$name: skipped (campaign budget spent)"
        record_step "$name" skipped "" 0 0
        return 0
    fi
    say "$name (at most ${limit} s): $*"
    rc=0
    timeout --kill-after=15 "$limit" "$@" 2>>"$log" | tee -a "$log" || rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$status" = ok ] || { say "$name: $status (rc $rc); last lines of $log:"; tail -n 5 "$log" | sed 's/^/    /'; }
    record_step "$name" "$status" "$rc" "$(($(date +%s) - start))" "$limit"
}

record_step() {  # name status rc seconds timeout_s
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "log": "logs/%s.log"}\n' \
        "$1" "$2" "${3:-null}" "$4" "$5" "$1" >>"$OUT/steps.jsonl"
}

gen() {  # gen STEP-NAME PRESET SPECS... : one process measuring the configurations in order
    local name=$1 preset=$2 extra=()
    shift 2
    local specs
    specs=$(IFS=,; echo "$*")
    [ "$name" = heun18 ] && extra=(--steps 18 "${HEUN_ARGS[@]}") || extra=(--steps "$MATRIX_STEPS" "${GEN_ARGS[@]}")
    run_step "$name" "${CAP:-$CAP_GEN}" "${HELPER[@]}" gen --work "$WORK" --preset "$preset" --configs "$specs" \
        --rows "$OUT/raw/gen.jsonl" --prepared "$OUT/prepare.json" --step "${name%%-*}" \
        --deadline "$STEP_DEADLINE" "${extra[@]}"
}

# find_python: $PYTHON, else .venv/bin/python, else python3. If it cannot import the stack: install the wheels in
# $WHEELS (default .whl/, e.g. diffusers, webdataset, zarr and their pure dependencies carried to an offline
# machine whose python3 has torch) into the work dir; failing that, try `make setup`.
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
            --target "$WORK/site" "$wheels"/*.whl >"$OUT/logs/wheels.log" 2>&1; then
            export PYTHONPATH="$PYTHONPATH:$WORK/site"  # ahead of site-packages: carry only what the image lacks
            if "$candidate" -c "$imports" >>"$OUT/logs/python-check.log" 2>&1; then
                PY=$candidate
                return 0
            fi
        fi
        say "python: still missing after the wheels: $(tail -n 1 "$OUT/logs/python-check.log") (see logs/wheels.log)"
    fi
    say "python: trying make setup"
    # Fail fast when offline instead of pip's minutes of retries.
    if PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=15 timeout 240 make setup >"$OUT/logs/setup.log" 2>&1 \
        && .venv/bin/python -c "$imports" >>"$OUT/logs/python-check.log" 2>&1; then
        PY=.venv/bin/python
        return 0
    fi
    say "python: make setup FAILED (no network? see $OUT/logs/setup.log: $(tail -n 1 "$OUT/logs/setup.log"))."
    say "python: install torch, diffusers, webdataset, zarr, accelerate and click, carry their wheels in" \
        "$wheels, or pass PYTHON=/path/to/python"
    return 1
}

write_meta() {  # campaign.json: what this run was (collect adds it to results.json)
    "$PY" - "$OUT/campaign.json" <<EOF
import json, sys
json.dump({"smoke": $([ "$SMOKE" = 1 ] && echo True || echo False), "started_epoch": $T0,
           "started": "$(date -d "@$T0" '+%Y-%m-%d %H:%M:%S %Z' 2>/dev/null || date)",
           "total_s": $(($(date +%s) - T0)), "budget_s": $BUDGET_S, "python": "$PY", "out": "$OUT",
           "sampler": "edm-heun", "steps": $MATRIX_STEPS, "presets": "$PRESETS",
           "project_preset": "$PROJECT_PRESET", "defaults_spec": "$DEFAULTS_SPEC",
           "trainer_command": "bench/bench_trainer.py ${TRAINER_ARGS[*]}",
           "evaluator_command": "bench/bench_evaluator.py ${EVALUATOR_ARGS[*]}",
           "command": "SMOKE=$SMOKE bash bench/gpu_campaign.sh"}, open(sys.argv[1], "w"), indent=2)
EOF
}

# --- the campaign -------------------------------------------------------------------------------------------
say "vaegen GPU campaign$([ "$SMOKE" = 1 ] && echo ' (SMOKE)'), budget ${BUDGET_S} s, results in $OUT"
if ! find_python; then
    printf '{"campaign": {"error": "no python with torch, diffusers, webdataset, zarr, accelerate, click"}}\n' \
        >"$OUT/results.json"
    printf '# GPU campaign\n\nNo usable python: see logs/python-check.log and logs/setup.log.\n' >"$OUT/results.md"
    exit 1
fi
say "python: $PY"
HELPER=("$PY" "$REPO/bench/gpu_campaign.py")
write_meta

timeout 20 nvidia-smi >"$OUT/logs/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi here" >>"$OUT/logs/nvidia-smi.txt"
run_step env 60 "${HELPER[@]}" env --out "$OUT/env.json"
run_step prepare 180 "${HELPER[@]}" prepare --work "$WORK" --presets "${PRESETS// /,}" --out "$OUT/prepare.json" \
    "${PREPARE_ARGS[@]}"

# 1. eager matrix: every preset x precision x chunk (no compile, so one process per preset is cheap)
for preset in $PRESETS; do
    # shellcheck disable=SC2086  # the specs are words on purpose
    gen "matrix-$preset-eager" "$preset" $EAGER_SPECS
done

# The user's path: the CLI on a fresh run dir, then `vaegen shards verify` on what it wrote.
CLI_STORE="$WORK/cli-data"
run_step cli-store 60 "${HELPER[@]}" store --root "$CLI_STORE" --n "$CLI_N"
run_step cli-generate 120 "$PY" -m vaegen generate --dm "$WORK/dm/tiny" --scale 1 --out "$WORK/cli-run" \
    --sampler edm-heun --steps "$MATRIX_STEPS" --compile off --compile-mode default --dataset fmnist \
    --data-root "$CLI_STORE" "${CLI_ARGS[@]}"
cp "$WORK/cli-run/generation.json" "$OUT/raw/cli.generation.json" 2>/dev/null || true
run_step cli-verify 60 "$PY" -m vaegen shards verify "$WORK/cli-run"

# 3. and 4.: the trainer and evaluator benches (short and bounded, so before the open-ended compile rows)
run_step trainer "$CAP_BENCH" "$PY" bench/bench_trainer.py "${TRAINER_ARGS[@]}"
EVAL_ROOT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['eval_data']['root'])" \
    "$OUT/prepare.json" 2>/dev/null || echo data)
run_step evaluator "$CAP_BENCH" "$PY" bench/bench_evaluator.py "${EVALUATOR_ARGS[@]}" --data-root "$EVAL_ROOT"

# 1. continued: compiled variants, one process each (no compile state shared), while RESERVE_S is left.
STEP_DEADLINE=$((DEADLINE - RESERVE_S))
i=0
for entry in "${COMPILED[@]}"; do
    i=$((i + 1))
    read -r preset spec <<<"$entry"
    case " $PRESETS " in *" $preset "*) ;; *) continue ;; esac
    CAP=$CAP_COMPILED gen "matrix-$preset-compiled$i" "$preset" "$spec"
done
STEP_DEADLINE=$DEADLINE

# 2. the fastest configuration of the projection preset, and the Makefile's, at the paper's Heun-18
CAP=$((DEADLINE - $(date +%s) - 10)) gen heun18 "$PROJECT_PRESET" best "$DEFAULTS_SPEC"

write_meta
"${HELPER[@]}" collect --out "$OUT" >"$OUT/logs/collect.log" 2>&1 \
    || { say "collect FAILED:"; tail -n 20 "$OUT/logs/collect.log"; exit 1; }
cat "$OUT/results.md"
# Everything but the two result files also goes into one archive: a machine that returns only a few files
# (PACK=1 keeps just these three) still brings back every log.
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs raw campaign.json env.json prepare.json steps.jsonl 2>/dev/null || true
if [ "${PACK:-0}" = 1 ]; then
    rm -rf "${OUT:?}/logs" "${OUT:?}/raw" "$OUT/campaign.json" "$OUT/env.json" "$OUT/prepare.json" "$OUT/steps.jsonl"
fi
say "done in $(($(date +%s) - T0)) s: $OUT/results.json, $OUT/results.md, logs in $OUT/logs.tar.gz"
