#!/usr/bin/env bash
# One-call GPU session: everything a GPU check of mppm_ext needs, in one invocation on a machine with an
# H100/H200 and no network (torch, triton, nvcc, cmake, ninja, scikit-build-core and pybind11 installed).
#
#   bash bench/gpu_session.sh OUT_DIR                 # the session (at most MPPM_SESSION_BUDGET s, default 470)
#   bash bench/gpu_session.sh --dry-run OUT_DIR       # on any machine: walks every stage without a device
#   bash bench/gpu_session.sh --stages bench-energy,profile OUT_DIR   # only these stages (and the summary)
#
# Stages, in order, each under its own timeout and all under one deadline (a stage that would start past
# it is recorded as skipped):
#   gpu           nvidia-smi (name, compute capability, clocks, driver)
#   build         pip install for the present architecture only (MPPM_EXT_CUDA_ARCHITECTURES=<compute cap>)
#   selftest      mppm --version; mppm selftest (every backend against the float64 reference)
#   bench-energy  energy bf16, N = 32768, B = 1 and 8, V = 50257 and 128256, beside a copy of the logits
#   bench-linear  energy_from_hidden bf16 and fp32, N = 8192, d = 2048, beside the bare GEMM
#   bench-steer   steer_step bf16 and fp32 at the bench's defaults (B = 64, d = 2048, V = 50257, m = 1, 16, 256)
#   graph         capture energy (cuda, triton) in a CUDA graph; the outcome is recorded, never fatal
#   profile       torch profiler: per-kernel device times of energy bf16, N = 32768, V = 128256
#   tests-cuda    pytest -k cuda (every test parametrized on the cuda backend or device)
#   tests-triton  pytest python_tests/test_triton_*.py (on the GPU, not the interpreter)
#   memcheck      compute-sanitizer memcheck on a small CUDA subset (skipped where it refuses the device)
#   racecheck     compute-sanitizer racecheck on a smaller subset (likewise)
#   summary       OUT_DIR/session.json (everything), bench.csv, profile.csv; prints the short table last
# The measurements come before the long test selections: the selftest has already compared every backend
# with the float64 reference by then, and a slow test suite cannot cost the numbers.
#
# OUT_DIR receives at most 4 files: session.log (every stage's output, each capped at 1 MB), session.json,
# bench.csv and profile.csv. The exit status is 0 when every stage passed or was skipped with a reason.
# Environment: PYTHON (default python3), MPPM_SESSION_BUDGET (seconds), MPPM_SESSION_MEMCHECK_TESTS and
# MPPM_SESSION_RACECHECK_TESTS (pytest arguments replacing the sanitizer subsets).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/bench/gpu_session.sh"
cd "$ROOT" || exit 2

STAGES=(gpu build selftest bench-energy bench-linear bench-steer graph profile tests-cuda tests-triton memcheck racecheck)
declare -A LIMIT=([gpu]=20 [build]=240 [selftest]=90 [bench-energy]=200 [bench-linear]=120 [bench-steer]=120
                  [graph]=90 [profile]=90 [tests-cuda]=240 [tests-triton]=240 [memcheck]=150 [racecheck]=150)

# What the stages run. The dry run checks that each of these exists (files, pytest selections, bench options).
BENCH_ENERGY=(--device cuda --ops energy --dtypes bf16 --n 32768 --batch 1 8 --vocab 50257 128256)
BENCH_LINEAR=(--device cuda --ops energy_from_hidden --dtypes bf16 fp32 --linear-n 8192 --linear-hidden 2048
              --vocab 50257 128256 --skip compile)
BENCH_STEER=(--device cuda --ops steer_step --dtypes bf16 fp32 --skip compile)
PROFILE=(--n 32768 --vocab 128256 --hidden 768 --dtype bf16)
GRAPH_IMPLS=(cuda triton)
CUDA_TESTS=(python_tests -k cuda)
TRITON_TESTS=(python_tests/test_triton_*.py)
# Small: under memcheck every kernel runs 10-100 times slower, and torch's caching allocator is switched
# off so that each tensor is its own allocation (an overrun inside a cached block would go unseen).
MEMCHECK_TESTS=(python_tests/test_energy.py::test_masks python_tests/test_energy.py::test_mixed_dtypes
                python_tests/test_energy_from_hidden.py::test_masks_and_ignore_index
                python_tests/test_streaming.py::test_non_finite_logit_names_its_position
                python_tests/test_steering.py::test_cuda_cg_matches_cpu_cg -k cuda)
RACECHECK_TESTS=(python_tests/test_energy.py::test_masks python_tests/test_energy_from_hidden.py::test_masks_and_ignore_index
                 python_tests/test_steering.py::test_cuda_cg_matches_cpu_cg -k cuda)
[[ -n "${MPPM_SESSION_MEMCHECK_TESTS:-}" ]] && read -ra MEMCHECK_TESTS <<< "$MPPM_SESSION_MEMCHECK_TESTS"
[[ -n "${MPPM_SESSION_RACECHECK_TESTS:-}" ]] && read -ra RACECHECK_TESTS <<< "$MPPM_SESSION_RACECHECK_TESTS"

# ---- stage bodies: each runs as `bash gpu_session.sh __stage NAME` under timeout, in its own process ----

# pytest --collect-only on a selection: fails unless it names at least one test.
collect() {
    local out rc
    out=$("$PY" -P -m pytest --collect-only -q -p no:cacheprovider "$@" 2>&1); rc=$?
    local count
    count=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' <<< "$out" | grep -Eo '^[0-9]+' | head -1)
    if (( rc != 0 )) || [[ -z "$count" || "$count" == 0 ]]; then
        echo "$out" | tail -20
        echo "CHECK FAILED: pytest selection '$*' collects no tests (pytest exit status $rc)"
        return 1
    fi
    echo "pytest selection '$*': $count tests"
}

need_files() {
    local f missing=0
    for f in "$@"; do
        if [[ -e "$f" ]]; then echo "file $f: present"; else echo "CHECK FAILED: $f is missing"; missing=1; fi
    done
    return $missing
}

tool() {  # reports whether a device-only tool is on the PATH (a dry run only reports it)
    if command -v "$1" > /dev/null; then echo "$1: $(command -v "$1")"; else echo "$1: not on the PATH here"; fi
}

stage_gpu() {
    if (( DRY )); then tool nvidia-smi; return 0; fi
    nvidia-smi || return
    nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version \
        --format=csv
}

stage_build() {
    if (( DRY )); then
        need_files pyproject.toml CMakeLists.txt || return
        grep -q MPPM_EXT_CUDA_ARCHITECTURES CMakeLists.txt && grep -q MPPM_EXT_WITH_CUDA CMakeLists.txt \
            || { echo "CHECK FAILED: CMakeLists.txt lacks the options the build passes"; return 1; }
        # Like the device tools, the build-time packages are only reported: this machine may build with
        # pip's build isolation, the GPU machine (no registry) builds with --no-build-isolation.
        "$PY" -c "import scikit_build_core, pybind11; print('scikit-build-core', scikit_build_core.__version__)" \
            2> /dev/null || echo "scikit-build-core, pybind11: not importable here (the GPU machine needs them)"
        tool nvcc; tool cmake; tool ninja
        return 0
    fi
    # MPPM_EXT_WITH_CUDA=ON: a build that silently left the CUDA kernels out would waste the session.
    "$PY" -m pip install --no-build-isolation --no-deps -C cmake.define.MPPM_EXT_CUDA_ARCHITECTURES="$ARCH" \
        -C cmake.define.MPPM_EXT_WITH_CUDA=ON . || return
    "$PY" -P -c "import mppm_ext; i = mppm_ext.build_info(); print(i); assert i['cuda'], 'built without CUDA'"
}

stage_selftest() {
    if (( DRY )); then "$PY" -P -m mppm_ext.cli selftest --help > /dev/null && echo "mppm selftest: present"; return; fi
    "$PY" -P -m mppm_ext.cli --version
    "$PY" -P -m mppm_ext.cli selftest --json "$WORK/selftest.json"
}

bench() {  # bench NAME OPTIONS...: bench/run.py into WORK/NAME (the dry run only parses the options)
    local name=$1; shift
    if (( DRY )); then "$PY" bench/run.py "$@" --out "$WORK/$name" --parse-only; return; fi
    "$PY" bench/run.py "$@" --out "$WORK/$name"
}
stage_bench-energy() { bench bench-energy "${BENCH_ENERGY[@]}"; }
stage_bench-linear() { bench bench-linear "${BENCH_LINEAR[@]}"; }
stage_bench-steer() { bench bench-steer "${BENCH_STEER[@]}"; }

stage_graph() {
    if (( DRY )); then  # the same code, on the CPU as far as it goes (the eager call)
        "$PY" bench/session.py graph --device cpu --impl cpp --n 64 --vocab 97 --hidden 8 --dtype fp32 \
            --out "$WORK/graph-cpp.json"
        return
    fi
    local impl rc=0
    for impl in "${GRAPH_IMPLS[@]}"; do  # one process each: a failed capture can leave the context unusable
        "$PY" bench/session.py graph --impl "$impl" --out "$WORK/graph-$impl.json" || rc=1
    done
    return $rc
}

stage_profile() {
    if (( DRY )); then
        "$PY" bench/session.py profile --device cpu --n 64 --vocab 97 --hidden 8 --dtype fp32 --out "$WORK/profile.json"
        return
    fi
    "$PY" bench/session.py profile --device cuda "${PROFILE[@]}" --out "$WORK/profile.json"
}

stage_tests-cuda() {
    if (( DRY )); then collect "${CUDA_TESTS[@]}"; return; fi
    "$PY" -P -m pytest -q -ra -p no:cacheprovider "${CUDA_TESTS[@]}"
}

stage_tests-triton() {
    if (( DRY )); then collect "${TRITON_TESTS[@]}"; return; fi
    "$PY" -P -m pytest -q -ra -p no:cacheprovider "${TRITON_TESTS[@]}"
}

sanitize() {  # sanitize TOOL PYTEST-ARGS...
    local tool_name=$1; shift
    if (( DRY )); then collect "$@" || return; tool compute-sanitizer; return 0; fi
    if ! command -v compute-sanitizer > /dev/null; then echo "SESSION-SKIP: compute-sanitizer is not on the PATH"; return 0; fi
    local out="$WORK/$tool_name.out"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool_name" --error-exitcode 86 \
        "$PY" -P -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    if grep -qiE 'device (is )?not supported|not supported on this (device|platform)' "$out"; then
        echo "SESSION-SKIP: compute-sanitizer refused the device ($(grep -iE -m1 'not supported' "$out" | tr -d '='))"
        return 0
    fi
    grep -E 'ERROR SUMMARY' "$out" | tail -1
    return "$rc"
}
stage_memcheck() { sanitize memcheck "${MEMCHECK_TESTS[@]}"; }
stage_racecheck() { sanitize racecheck "${RACECHECK_TESTS[@]}"; }

if [[ "${1:-}" == __stage ]]; then  # the re-invocation of this script for one stage
    "stage_$2"
    exit
fi

# ---- the session --------------------------------------------------------------------------------------

usage() { echo "usage: bash bench/gpu_session.sh [--dry-run] [--stages a,b,...] OUT_DIR   (stages: ${STAGES[*]})" >&2; exit 2; }
DRY=0
ONLY=""
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --stages) ONLY=${2:-}; shift 2 || usage ;;
        -h|--help) sed -n '2,35p' "$SELF"; exit 0 ;;
        -*) usage ;;
        *) break ;;
    esac
done
(( $# == 1 )) || usage
OUT_DIR=$1
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/session.log"
: > "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
BUDGET=${MPPM_SESSION_BUDGET:-470}
RESERVE=25  # seconds kept for the summary
ARCH=90
if (( ! DRY )) && command -v nvidia-smi > /dev/null; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
    [[ "$cap" =~ ^[0-9]+$ ]] && ARCH=$cap
fi
export DRY WORK PY ARCH
selected=("${STAGES[@]}")
if [[ -n "$ONLY" ]]; then
    IFS=, read -ra selected <<< "$ONLY"
    for s in "${selected[@]}"; do
        [[ -n "${LIMIT[$s]:-}" ]] || { echo "unknown stage '$s' (stages: ${STAGES[*]})" >&2; exit 2; }
    done
fi

say() { echo "$*" | tee -a "$LOG"; }
say "== mppm_ext GPU session$( (( DRY )) && echo ' (dry run)'), $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY, architecture $ARCH, budget ${BUDGET}s"

failed=0
for name in "${STAGES[@]}"; do
    [[ " ${selected[*]} " == *" $name "* ]] || continue
    left=$(( BUDGET - RESERVE - SECONDS ))
    limit=${LIMIT[$name]}
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        printf '%s\tskipped\t0\t0\tsession deadline (%ss budget) reached\n' "$name" "$BUDGET" >> "$WORK/stages.tsv"
        say "== $name: skipped, session deadline reached"
        continue
    fi
    say "== $name (limit ${limit}s)"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash "$SELF" __stage "$name" > "$WORK/$name.log" 2>&1
    rc=$?
    took=$(( SECONDS - start ))
    note=$(grep -m1 '^SESSION-SKIP: ' "$WORK/$name.log" | cut -d' ' -f2-)
    if (( rc == 124 || rc == 137 )); then
        status=timeout; note="killed after ${limit}s"; failed=1
    elif (( rc != 0 )); then
        status=failed; note="exit status $rc: $(grep -E 'CHECK FAILED|FAILED|Error|error' "$WORK/$name.log" | tail -1 | cut -c1-200)"; failed=1
    elif [[ -n "$note" ]]; then
        status=skipped
    else
        status=$( (( DRY )) && echo checked || echo ok)
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$limit" "${note//$'\t'/ }" >> "$WORK/stages.tsv"
    size=$(stat -c %s "$WORK/$name.log")
    if (( size > 1048576 )); then  # keep each stage's start and end: the files that come back are limited
        { head -c 262144 "$WORK/$name.log"; echo; echo "[... $(( size - 1048576 )) bytes of this stage's log left out ...]"
          tail -c 786432 "$WORK/$name.log"; } >> "$LOG"
    else
        cat "$WORK/$name.log" >> "$LOG"
    fi
    say "== $name: $status in ${took}s${note:+ ($note)}"
done

say "== summary"
timeout --kill-after=5 "$RESERVE" "$PY" bench/session.py summary --work "$WORK" --out "$OUT_DIR" \
    $( (( DRY )) && echo --dry-run ) > "$WORK/summary.txt" 2>&1 || failed=1
cat "$WORK/summary.txt" >> "$LOG"
files=$(find "$OUT_DIR" -type f | wc -l)
big=$(find "$OUT_DIR" -type f -size +16M | wc -l)
say "OUT_DIR $OUT_DIR: $files files, $big over 16 MB"
(( files <= 8 && big == 0 )) || { say "too many or too large files in OUT_DIR"; failed=1; }
cat "$WORK/summary.txt"  # the short table, last
exit $failed
