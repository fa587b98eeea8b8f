#!/usr/bin/env bash
# One prepared GPU check of the working tree, under 8 minutes on one H100 (docs/gpu_check.md).
#
#   tools/gpu_check.sh OUTDIR             run every step; writes OUTDIR/summary.json, summary.md, log.txt, junit.xml
#   tools/gpu_check.sh OUTDIR --dry-run   print the plan and check that every file and tool it needs exists (CPU)
#   tools/gpu_check.sh --prepare          (a machine with internet) download the wheels it installs into .gpu_wheels/
#
# Steps, each with its own time budget (`timeout`), each run whatever the previous ones did:
#   env         nvidia-smi, python/torch/triton versions, which of deepspeed/megatron-core/fla import
#   install     wheels from .gpu_wheels/ into $GPU_CHECK_SITE (pip --no-index --no-deps --target),
#               miras_kernels linked to the checkout's kernels/
#   tests       kernel + operator tests on the GPU: MIRAS_TEST_DEVICE=cuda (exact fp32 dots),
#               MIRAS_NAN_EMPTY=1 (fresh kernel buffers NaN-filled: an unwritten output fails);
#               the benchmarks' Triton compiles warm the cache in the background meanwhile
#   model_step  one checked training step of a 2-layer moneta_340m (Triton vs chunked loss, finite grads)
#   bench_kernels       tools/bench_kernels.py: gated-delta preset vs fla's chunk_gated_delta_rule
#   bench_kernels_mlp   tools/bench_kernels_mlp.py: moneta, yaad, memora, titans at T = 4096
#   train       tokens/s, MFU, peak memory of moneta_340m training steps (DeepSpeed when importable,
#               else plain torch, said in the output)
# Environment: PYTHON (default python3), GPU_WHEELS (default .gpu_wheels), GPU_CHECK_SITE
# (default /tmp/miras_gpu_site), GPU_CHECK_WORK (default /tmp/miras_gpu_check).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-$REPO/.gpu_wheels}"
SITE="${GPU_CHECK_SITE:-/tmp/miras_gpu_site}"
WORK="${GPU_CHECK_WORK:-/tmp/miras_gpu_check}"

# wheels the GPU image lacks (pure Python; versions pinned in constraints.txt)
PREPARE_WHEELS=(fla-core==0.6.0 einops==0.8.2)
# step budgets in seconds (sum 465: the whole check stays under 8 minutes)
B_ENV=25; B_INSTALL=35; B_TESTS=160; B_STEP=45; B_BENCH=55; B_BENCH_MLP=75; B_TRAIN=70
# the GPU test subset: every kernel and operator test file; the ahead-of-time compile tests are
# CPU work already done in CI and are left out here
TEST_GLOBS=("tests/test_kernels_*.py" "tests/test_ops_*.py")
TEST_DESELECT="not aot_compile and not kernel_report and not compiled_ttir and not bench_quick"
REQUIRED_FILES=(tools/gpu_check_env.py tools/gpu_check_train.py tools/bench_kernels.py tools/bench_kernels_mlp.py
                miras_pretrain/testing/devices.py kernels/common/fresh.py kernels/common/precision.py tests/conftest.py)
REQUIRED_TOOLS=(timeout "$PY")

usage() { echo "usage: tools/gpu_check.sh OUTDIR [--dry-run] | --prepare" >&2; exit 2; }

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" "${PREPARE_WHEELS[@]}" || exit 1
    ls -l "$WHEELS"
    exit 0
fi
[ $# -ge 1 ] || usage
OUTDIR="$1"; shift
DRY=0
for a in "$@"; do
    case "$a" in --dry-run) DRY=1 ;; *) usage ;; esac
done
case "$OUTDIR" in -*) usage ;; esac

cd "$REPO" || exit 1
mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/log.txt"

test_files() {
    local g f
    for g in "${TEST_GLOBS[@]}"; do for f in $g; do [ -f "$f" ] && echo "$f"; done; done
}

plan() {
    cat <<EOF
GPU check plan (repo $REPO, python $PY, out $OUTDIR):
  env                ${B_ENV}s   tools/gpu_check_env.py env
  install            ${B_INSTALL}s   pip install --no-index --no-deps --target $SITE $WHEELS/*.whl; link miras_kernels
  tests              ${B_TESTS}s  MIRAS_TEST_DEVICE=cuda MIRAS_NAN_EMPTY=1 pytest $(test_files | wc -l) files -k "$TEST_DESELECT"
  model_step         ${B_STEP}s   tools/gpu_check_train.py --check-step (moneta_340m, 2 layers, T 512, MIRAS_NAN_EMPTY=1)
  bench_kernels      ${B_BENCH}s   tools/bench_kernels.py --specs gated_delta --T 4096 (vs fla chunk_gated_delta_rule)
  bench_kernels_mlp  ${B_BENCH_MLP}s   tools/bench_kernels_mlp.py --presets moneta,yaad,memora,titans --seq-lens 4096
  train              ${B_TRAIN}s   tools/gpu_check_train.py --model moneta_340m --seq-len 4096 --batch 2 --steps 3
  total budget $((B_ENV + B_INSTALL + B_TESTS + B_STEP + B_BENCH + B_BENCH_MLP + B_TRAIN))s
EOF
}

if [ "$DRY" = 1 ]; then
    plan
    missing=0
    for f in "${REQUIRED_FILES[@]}"; do
        [ -f "$f" ] || { echo "missing file: $f"; missing=1; }
    done
    for t in "${REQUIRED_TOOLS[@]}"; do
        command -v "$t" >/dev/null 2>&1 || { echo "missing tool: $t"; missing=1; }
    done
    [ -n "$(test_files)" ] || { echo "missing: no test files match ${TEST_GLOBS[*]}"; missing=1; }
    for w in "${PREPARE_WHEELS[@]}"; do
        name="${w%%==*}"; ver="${w##*==}"
        ls "$WHEELS"/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1 \
            || echo "note: wheel $w not in $WHEELS (run tools/gpu_check.sh --prepare; without fla the fla column is refused)"
    done
    "$PY" - "$OUTDIR/plan.json" "$missing" <<'EOF'
import json, sys
json.dump({"dry_run": True, "missing": sys.argv[2] == "1"}, open(sys.argv[1], "w"))
EOF
    [ "$missing" = 0 ] && echo "dry run: every file and tool is present" || echo "dry run: something is missing"
    exit "$missing"
fi

rm -rf "$WORK"; mkdir -p "$WORK"
: > "$LOG"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

# run_step NAME BUDGET CMD...: its output goes to log.txt, its name/budget/milliseconds/exit to
# steps.tsv; a CMD that is one of this script's functions runs in `bash -c` with its definitions
# (timeout runs programs, not shell functions)
run_step() {
    local name="$1" budget="$2"; shift 2
    local t0 rc
    t0=$(date +%s%N)
    echo "===== $name (budget ${budget}s, $(date -u +%H:%M:%S))" | tee -a "$LOG"
    if declare -F "$1" >/dev/null; then
        timeout -k 2 "$budget" bash -c "$(declare -p PY WHEELS SITE OUTDIR WORK TEST_GLOBS TEST_DESELECT); \
$(declare -f install_step tests_step test_files); $*" >> "$LOG" 2>&1
    else
        timeout -k 2 "$budget" "$@" >> "$LOG" 2>&1
    fi
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$rc" >> "$WORK/steps.tsv"
    echo "----- $name: exit $rc" | tee -a "$LOG"
}

install_step() {
    local whl=("$WHEELS"/*.whl)
    if [ -e "${whl[0]}" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}" || return 1
    else
        echo "no wheels in $WHEELS: fla is imported only if the image has it (run tools/gpu_check.sh --prepare)"
    fi
    "$PY" tools/gpu_check_env.py site "$SITE"
}

tests_step() {
    local xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 6)
    # shellcheck disable=SC2046
    MIRAS_TEST_DEVICE=cuda MIRAS_NAN_EMPTY=1 "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
        -m "not distributed" -k "$TEST_DESELECT" --junitxml="$OUTDIR/junit.xml" -o timeout=150 $(test_files)
}

# compile the benchmarks' kernels (bf16, D 64, e 4, C 64 -- also the 340M model's) in parallel
# processes while the tests run, so the timed steps find them in the Triton cache
warm_cache() {
    local p pids=()
    for p in moneta yaad memora titans; do
        timeout "$B_TESTS" "$PY" tools/bench_kernels_mlp.py --presets "$p" --seq-lens 128 --reps 1 \
            --out "$WORK/warm_$p.json.tmp" > "$WORK/warm_$p.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
}

run_step env "$B_ENV" "$PY" tools/gpu_check_env.py env "$WORK/env.json"
run_step install "$B_INSTALL" install_step
warm_cache & WARM_PID=$!
run_step tests "$B_TESTS" tests_step
wait "$WARM_PID" 2>/dev/null
cat "$WORK"/warm_*.log >> "$LOG" 2>/dev/null
run_step model_step "$B_STEP" env MIRAS_NAN_EMPTY=1 "$PY" tools/gpu_check_train.py --check-step --model moneta_340m \
    --layers 2 --seq-len 512 --batch 1 --out "$WORK/model_step.json"
run_step bench_kernels "$B_BENCH" "$PY" tools/bench_kernels.py --specs gated_delta --T 4096 --reps 3 \
    --out "$WORK/bench_kernels.json"
run_step bench_kernels_mlp "$B_BENCH_MLP" "$PY" tools/bench_kernels_mlp.py --presets moneta,yaad,memora,titans \
    --seq-lens 4096 --reps 3 --out "$WORK/bench_kernels_mlp.json"
run_step train "$B_TRAIN" "$PY" tools/gpu_check_train.py --model moneta_340m --seq-len 4096 --batch 2 --steps 3 \
    --out "$WORK/train.json"

echo "total $(( $(date +%s) - T_START ))s" | tee -a "$LOG"
"$PY" tools/gpu_check_env.py summary "$WORK" "$OUTDIR"
