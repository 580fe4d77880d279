#!/usr/bin/env bash
# One prepared check of bpjax on a GPU: the cross-check table and the network tests,
# the step benchmark in float32 and bfloat16 (MFU against both matmul peaks of the same run),
# fit's speed against a bare loop, GPT-2 small's tokens/s and MFU, and the Pallas attention's
# forward + backward against the jnp paths (then GPT-2 small again with it), and GPT-2 124M's step
# exported for CUDA with its compiled memory (scripts/benchmarks/gpt2_memory.py), after bp.gpt's
# parity with transformers' GPT-2 at 124M's size (scripts/benchmarks/gpt2_parity.py), and a 200-step
# fine-tune of a 124M-sized GPT-2 folder (scripts/examples/finetune_gpt2.py) with its loss curve.
#
#   bash scripts/benchmarks/gpu_check.sh OUT_DIR
#
# Every result goes into OUT_DIR, seven files at most (the device tool brings back eight):
#   summary.md         the machine, the versions and one row per stage: status, seconds, key line
#   gpu_check.log      every stage's full output, in order
#   bench_float32.md   scripts/benchmarks/bench.py's report, float32 compute
#   bench_bfloat16.md  the same, bfloat16 compute with float32 master weights
#   fit_speed.json     scripts/benchmarks/fit_speed.py's measurements (when that script is there)
#   finetune_losses.json, finetune_curves.png   the fine-tune's losses, as numbers and drawn
# and the summary is printed last, so that the tail of stdout holds it. The exit status is 0
# when every stage passed or was skipped, 1 otherwise; a failed stage never stops the others.
#
# On a GPU (or TPU) it runs the full sizes, sized to end within 8 minutes on one H100: every
# stage has its own time limit and all of them share a budget (BPJAX_GPU_CHECK_BUDGET seconds,
# default 460), so a stage that would start too late is skipped, and said so. The float32 bench
# includes the PyTorch column when torch is importable (on the GPU if torch sees CUDA); should
# that run fail with torch in its output, it is rerun once with --no-torch. Where JAX's backend is the CPU,
# or with BPJAX_GPU_CHECK_TINY=1, it runs tiny sizes instead and a small subset of the tests
# (the CPU smoke test, tests/test_gpu_check.py). bpjax is not installed: PYTHONPATH is the
# repository root. mnist1d is installed from wheels in .whl/ when there are some (the folder the
# device tool carries wheels in); without mnist1d, fit_speed runs on synthetic data of MNIST-1D's
# shape (--synthetic).
#
# Environment: PYTHON (default python3); BPJAX_GPU_CHECK_TINY=1; BPJAX_GPU_CHECK_BUDGET;
# BPJAX_GPU_CHECK_WORKERS (pytest-xdist workers on a GPU, default 8); BPJAX_COMMIT (the commit to
# report where the copy has no .git, e.g. BPJAX_COMMIT=$(git rev-parse --short HEAD) written
# into the command by the caller).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT_DIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.md"
rm -f "$OUT_DIR"/{gpu_check.log,summary.md,bench_float32.md,bench_bfloat16.md,fit_speed.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${BPJAX_GPU_CHECK_BUDGET:-460}
START=$(date +%s)
ROWS=()          # "stage|status|seconds|key line"
FAILED=0

say() { echo "$@" | tee -a "$LOG"; }

record() {       # record STAGE STATUS SECONDS KEYLINE
    ROWS+=("$1|$2|$3|${4//|//}")
    case $2 in ok* | skipped*) ;; *) FAILED=1 ;; esac
}

# run_stage STAGE LIMIT_S KEY_REGEX COMMAND...: run COMMAND with a time limit (the smaller of
# LIMIT_S and what is left of the budget), its output into the log and stdout; record its
# status and the last output line that matches KEY_REGEX.
run_stage() {
    local stage=$1 limit=$2 key=$3
    shift 3
    local left=$((START + BUDGET - $(date +%s) - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        say "=== $stage: skipped, ${left}s of the ${BUDGET}s budget left"
        record "$stage" "skipped (budget spent)" 0 ""
        return
    fi
    say ""
    say "=== $stage (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    : >"$WORK/stage.out"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/stage.out"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    local line
    line=$(grep -E -- "$key" "$WORK/stage.out" | tail -n 1 | cut -c1-160)
    [ -z "$line" ] && line=$(grep -v '^\s*$' "$WORK/stage.out" | tail -n 1 | cut -c1-160)
    say "=== $stage: $status in $(($(date +%s) - t0)) s"
    record "$stage" "$status" "$(($(date +%s) - t0))" "$line"
}

# ----------------------------------------------------------------------------- the machine

t0=$(date +%s)
say "=== env"
say "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host $(hostname); $(nproc) CPU cores"
DRIVER="no nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    DRIVER=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')
    timeout 30 nvidia-smi 2>&1 | tee -a "$LOG" >/dev/null
fi
say "driver: $DRIVER"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)
if [ -n "$COMMIT" ]; then
    DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
    [ "$DIRTY" -gt 0 ] && COMMIT="$COMMIT (+$DIRTY modified files)"
else
    COMMIT="${BPJAX_COMMIT:-unknown} (no .git here)"
fi
SOURCES=$(find bpjax scripts tests -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-12)
say "bpjax: commit $COMMIT; sha256 of bpjax/ scripts/ tests/ *.py: $SOURCES"
timeout -k 5 90 "$PY" - >"$WORK/env.out" 2>&1 <<'EOF'
import importlib.metadata as md
import platform
import sys

names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "optax", "orbax-checkpoint",
         "chex", "numpy", "mnist1d", "torch", "pytest-xdist"]
found = [f"python {platform.python_version()}"]
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        if not name.startswith("jax-cuda"):
            found.append(f"{name} absent")
print("versions: " + ", ".join(found))
print(f"python: {sys.executable}")
import jax

devices = jax.devices()
print(f"device: {jax.default_backend()}, {len(devices)} × {devices[0].device_kind}")
try:
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        print(f"device memory for JAX: {stats['bytes_limit'] / 2**30:.1f} GiB")
except Exception as e:             # not every backend has memory_stats
    print(f"device memory: unknown ({type(e).__name__})")
print(f"backend={jax.default_backend()}")
EOF
ENV_RC=$?
tee -a "$LOG" <"$WORK/env.out"
BACKEND=$(sed -n 's/^backend=//p' "$WORK/env.out")
DEVICE=$(sed -n 's/^device: //p' "$WORK/env.out")
VERSIONS=$(sed -n 's/^versions: //p' "$WORK/env.out")
if [ "$ENV_RC" -eq 0 ]; then
    record env ok $(($(date +%s) - t0)) "$DEVICE"
else
    record env "FAILED (exit $ENV_RC)" $(($(date +%s) - t0)) "$(tail -n 1 "$WORK/env.out" | cut -c1-160)"
fi

if [ "${BPJAX_GPU_CHECK_TINY:-0}" = 1 ]; then
    MODE=tiny
    WHY="BPJAX_GPU_CHECK_TINY=1"
elif [ -z "$BACKEND" ] || [ "$BACKEND" = cpu ]; then
    MODE=tiny
    WHY="JAX's backend is ${BACKEND:-unknown}, not an accelerator"
else
    MODE=full
    WHY="JAX's backend is $BACKEND"
fi
say "mode: $MODE ($WHY)"
[ "$MODE" = tiny ] && say "tiny mode: tiny sizes and a subset of the tests; no timing here means anything"

# ----------------------------------------------------------------------------- mnist1d

t0=$(date +%s)
say ""
say "=== data"
DATA_STATUS=ok
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    SITE="$WORK/site"
    say "installing ${#WHEELS[@]} wheel(s) from .whl/ into a temporary folder: ${WHEELS[*]}"
    if timeout -k 5 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        DATA_STATUS="FAILED (pip install of .whl/*.whl)"
        say "pip install failed (its output is above in the log)"
    fi
fi
if MNIST1D=$("$PY" -c "import mnist1d.data, importlib.metadata as m; print(m.version('mnist1d'))" 2>>"$LOG"); then
    DATA=mnist1d
    DATA_LINE="mnist1d $MNIST1D: MNIST-1D generated locally"
else
    DATA=synthetic
    DATA_LINE="no mnist1d: fit_speed falls back to synthetic data of MNIST-1D's shape (--synthetic)"
fi
say "$DATA_LINE"
record data "$DATA_STATUS" $(($(date +%s) - t0)) "$DATA_LINE"

# ----------------------------------------------------------------------------- the stages

PYTEST=("$PY" -m pytest -q -p no:cacheprovider tests/test_crosscheck.py tests/test_networks.py)
if [ "$MODE" = full ]; then
    WORKERS=${BPJAX_GPU_CHECK_WORKERS:-8}
    if "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
        PYTEST+=(-n "$WORKERS")
    fi
    # several processes share the GPU: none may take 75% of its memory up front. JAX's default
    # float32 matmul on a recent NVIDIA GPU is TF32 (10-bit mantissa), far outside the float32
    # cases' 1e-5 tolerance, so the tests ask for full float32 products; the benchmarks keep the
    # default. float64 cases are float64 either way.
    say ""
    say "tests: float32 cases with JAX_DEFAULT_MATMUL_PRECISION=highest (not TF32)"
    run_stage tests 110 "passed|failed|error" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        JAX_DEFAULT_MATMUL_PRECISION=highest "${PYTEST[@]}" --durations=8
else
    say ""
    say "tests: tiny mode runs a subset, -k 'relu and not conv', not the whole table"
    run_stage tests 120 "passed|failed|error" "${PYTEST[@]}" -k "relu and not conv"
fi

if [ "$MODE" = full ]; then
    BENCH=(--rounds 3 --chunk-seconds 0.25 --pause 0.05)
else
    BENCH=(--quick --models tiny --no-torch)      # tiny: no seconds spent importing torch
fi
run_stage bench_float32 100 "matmul peak|of peak:" \
    "$PY" scripts/benchmarks/bench.py "${BENCH[@]}" --dtype float32 --out "$OUT_DIR/bench_float32.md"
# torch is optional (the PyTorch column; on the GPU when torch sees CUDA): should the float32 run
# fail in torch, run it once more without the column
if [[ ${ROWS[-1]} == bench_float32\|FAILED* ]] && grep -qi torch "$WORK/stage.out"; then
    run_stage bench_float32_no_torch 90 "matmul peak|of peak:" \
        "$PY" scripts/benchmarks/bench.py "${BENCH[@]}" --dtype float32 --no-torch --out "$OUT_DIR/bench_float32.md"
fi
run_stage bench_bfloat16 75 "matmul peak|of peak:" \
    "$PY" scripts/benchmarks/bench.py "${BENCH[@]}" --dtype bfloat16 --out "$OUT_DIR/bench_bfloat16.md"

if [ -f scripts/benchmarks/fit_speed.py ]; then
    FIT=(--out "$OUT_DIR/fit_speed.json")
    if [ "$MODE" = full ]; then
        FIT+=(--batch-sizes 32,1024)
        [ "$DATA" = synthetic ] && FIT+=(--synthetic)
    else
        FIT+=(--tiny --synthetic --batch-sizes 32)      # tiny: no time spent generating MNIST-1D
    fi
    run_stage fit_speed 75 "^\| *[0-9]+ \|" "$PY" scripts/benchmarks/fit_speed.py "${FIT[@]}"
    # the key line from the JSON: steps/s of fit against the bare loop and the host-fed one
    FIT_LINE=$("$PY" - "$OUT_DIR/fit_speed.json" 2>/dev/null <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("; ".join(f"batch {r['batch']}: fit {r['fit_steps_per_s']:.0f} steps/s, "
                f"{1 / r['fit_over_bare']:.2f}x bare's, {r['fit_speedup_over_host_fed']:.2f}x host-fed's"
                for r in rows))
PYEOF
)
    if [ -n "$FIT_LINE" ]; then
        last=${ROWS[-1]}
        ROWS[-1]="${last%|*}|$FIT_LINE"
    fi
else
    say ""
    say "=== fit_speed: skipped, scripts/benchmarks/fit_speed.py is not there"
    record fit_speed "skipped (no scripts/benchmarks/fit_speed.py)" 0 ""
fi

if grep -q -- '"--preset"' scripts/examples/train_gpt.py; then
    if [ "$MODE" = full ]; then
        GPT=(--preset gpt2-small --dtype bfloat16 --steps 30 --batch 8 --print-every 10
             --eval-every 0 --sample-chars 0)
    else
        GPT=(--preset tiny --steps 3 --dim 16 --heads 2 --layers 1 --context 16 --batch 4
             --corpus-chars 20000 --print-every 1 --eval-every 0 --sample-chars 0 --peak-n 256)
    fi
    run_stage gpt 100 "tokens/s" "$PY" scripts/examples/train_gpt.py "${GPT[@]}"
else
    say ""
    say "=== gpt: skipped, scripts/examples/train_gpt.py has no --preset yet"
    record gpt "skipped (train_gpt.py has no --preset)" 0 ""
fi

# Pallas attention: TFLOP/s and memory against the jnp lean path, autodiff and
# jax.nn.dot_product_attention (its report goes to the log only); on a GPU, GPT-2 small with it
ATTN=(--t 1024,2048,4096)
[ "$MODE" = tiny ] && ATTN=(--tiny)
run_stage attention 120 "pallas vs jnp lean" "$PY" scripts/benchmarks/attention_bench.py "${ATTN[@]}"
if [ "$MODE" = full ] && grep -q -- '"--attention-impl"' scripts/examples/train_gpt.py; then
    run_stage gpt_pallas 100 "tokens/s" "$PY" scripts/examples/train_gpt.py "${GPT[@]}" --attention-impl pallas
else
    record gpt_pallas "skipped (tiny mode, or no --attention-impl)" 0 ""
fi

# bp.gpt against transformers' GPT2LMHeadModel at 124M's size, float32 (tiny in tiny mode): logits,
# loss, every gradient, AdamW steps; skipped, and said so, where torch or transformers is missing
if "$PY" -c "import torch, transformers" >/dev/null 2>&1; then
    PARITY=()
    [ "$MODE" = tiny ] && PARITY=(--tiny)
    run_stage gpt2_parity 150 "gpt2_parity:" "$PY" scripts/benchmarks/gpt2_parity.py ${PARITY[@]+"${PARITY[@]}"}
else
    say ""
    say "=== gpt2_parity: skipped, torch or transformers is not importable"
    record gpt2_parity "skipped (no torch or transformers)" 0 ""
fi

# GPT-2 124M's step exported for CUDA and its compiled memory against 80 GB (the check the CPU
# runs without a GPU; here the memory is the accelerator's own compile's)
if [ "$MODE" = full ]; then
    run_stage gpt2_memory 90 "^memory:" "$PY" scripts/benchmarks/gpt2_memory.py
else
    say ""
    say "=== gpt2_memory: skipped in tiny mode (tests/test_scripts.py runs it --tiny)"
    record gpt2_memory "skipped (tiny mode)" 0 ""
fi

# A 200-step fine-tune of a GPT-2 124M-sized folder (random weights: the machine has no
# download; scripts/examples/gpt2_folder.py) on standard-library source, bf16 compute, 8192
# tokens per step: its loss curve comes back as finetune_losses.json and finetune_curves.png
if "$PY" -c "import tokenizers" >/dev/null 2>&1; then
    FT_TEXT="$WORK/finetune.txt"
    "$PY" - "$FT_TEXT" <<'PYEOF'
import pathlib, sys, sysconfig
files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
pathlib.Path(sys.argv[1]).write_text("".join(p.read_text(errors="replace") for p in files)[:3_000_000])
PYEOF
    if [ "$MODE" = full ]; then
        FT_MAKE=()
        FT=(--steps 200 --batch-tokens 8192 --micro-batch 8 --context 256 --eval-every 20 --dtype bfloat16)
    else
        FT_MAKE=(--tiny)
        FT=(--steps 4 --batch-tokens 128 --micro-batch 4 --context 32 --eval-every 2 --print-every 2 --peak-n 64)
    fi
    timeout -k 5 120 "$PY" scripts/examples/gpt2_folder.py "$WORK/gpt2-folder" ${FT_MAKE[@]+"${FT_MAKE[@]}"} >>"$LOG" 2>&1
    run_stage finetune 150 "^final train loss" "$PY" scripts/examples/finetune_gpt2.py --from "$WORK/gpt2-folder" \
        --text "$FT_TEXT" --out "$WORK/finetune-run" --curve "$WORK/finetune-run/losses.json" "${FT[@]}"
    [ -f "$WORK/finetune-run/losses.json" ] && cp "$WORK/finetune-run/losses.json" "$OUT_DIR/finetune_losses.json"
    [ -f "$WORK/finetune-run/curves.png" ] && cp "$WORK/finetune-run/curves.png" "$OUT_DIR/finetune_curves.png"
else
    say ""
    say "=== finetune: skipped, the tokenizers package is not importable"
    record finetune "skipped (no tokenizers)" 0 ""
fi

# ----------------------------------------------------------------------------- the summary

TOTAL=$(($(date +%s) - START))
FILES="$( (cd "$OUT_DIR" && find . -type f ! -name summary.md | sed 's|^\./||' | LC_ALL=C sort | tr '\n' ' ') )summary.md"
NFILES=$(echo "$FILES" | wc -w)
{
    echo "# bpjax GPU check"
    echo
    echo "- mode: $MODE ($WHY); total ${TOTAL} s of a ${BUDGET} s budget"
    echo "- device: ${DEVICE:-unknown}; driver: $DRIVER"
    echo "- versions: ${VERSIONS:-unknown}"
    echo "- bpjax: commit $COMMIT; sources sha256 $SOURCES"
    echo "- data: $DATA_LINE"
    echo
    echo "| stage | status | s | key line |"
    echo "|---|---|---|---|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r stage status secs line <<<"$row"
        echo "| $stage | $status | $secs | $line |"
    done
    echo
    echo "$NFILES files in $OUT_DIR: $FILES"
    [ "$FAILED" -ne 0 ] && echo "Some stage failed: its output is in gpu_check.log."
} >"$SUMMARY"
[ "$NFILES" -gt 8 ] && echo "WARNING: more than 8 files in $OUT_DIR; the device tool brings back 8" >>"$SUMMARY"
echo "" | tee -a "$LOG"
tee -a "$LOG" <"$SUMMARY"
exit "$FAILED"
