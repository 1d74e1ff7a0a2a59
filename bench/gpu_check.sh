#!/usr/bin/env bash
# The GPU probe: one run, in phases, in under 8 minutes on an H200.
#   P0 compile, in parallel: bench/kernel_report.py for this GPU (registers, spills, shared memory,
#      wgmma, atomics of every Triton config the benchmarks can pick; it compiles them all in a
#      process pool, filling Triton's cache for the timed phases) and the kernel and fused-training
#      tests on the GPU (RANKFAST_AUTOTUNE=0), one process per file.
#   P1..P6 time, one phase at a time (bench/bench_kernels.py, each phase its own process):
#      P1 MLP scoring bf16, P2 DIN scoring (repeated and unrepeated history items), P3 training steps,
#      P4 score + top-K, P5 MLP scoring fp32, P6 the torch.compile max-autotune rows (each compile
#      under BENCH_COMPILE_TIMEOUT) while the budget lasts.
#   Each benchmark row is saved as soon as it is measured (BENCH_ROWS), and after every phase the
#   script rewrites RESULTS_DIR/<date>-<gpu>.md (bench/probe_report.py: rankfast against the best
#   PyTorch, issue 18's targets, the decisions the measured phases support, which it also prints),
#   so a run cut short keeps what it measured; the raw rows go to RESULTS_DIR/<date>-<gpu>.jsonl.
# Usage: bash bench/gpu_check.sh            (from anywhere; commit the files it writes)
# Env: PYTHON (default python); RESULTS_DIR (default bench/results); BUDGET (s for the whole run, default 470);
#      PHASES (default "P0 P1 P2 P3 P4 P5 P6"); BENCH_COMPILE_TIMEOUT (s per max-autotune compile).
#      BENCH_SMALL=1 without a GPU: every timed phase at toy sizes under Triton's interpreter (no
#      install, no tests, no kernel report: their own tests cover them), for CI
#      (tests/test_bench_scripts.py), so that the script cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
RESULTS_DIR=${RESULTS_DIR:-bench/results}
BUDGET=${BUDGET:-470}
PHASES=${PHASES:-"P0 P1 P2 P3 P4 P5 P6"}
SMALL=${BENCH_SMALL:-0}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}  # the interpreter that has rankfast installed
mkdir -p "$RESULTS_DIR"
left() { echo $((BUDGET - ($(date +%s) - START))); }

if [ "$SMALL" = 1 ]; then
    export TRITON_INTERPRET=1
    # The CI smoke run: one implementation of each kind, so every phase's code runs in little time.
    KEEP=${BENCH_IMPLS:-"rankfast eager-split torch.compile-split torch.compile-split-max"}
    DATE=$(date -u +%Y-%m-%d); GPU=cpu-interpreter
else
    "$PYTHON" -c "import torch; assert torch.cuda.is_available()" \
        || { echo "gpu_check: no CUDA device visible to torch"; exit 2; }
    echo "== install"
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$WORK/install.log" 2>&1 \
        || { tail -30 "$WORK/install.log"; echo "gpu_check: install failed"; exit 3; }
    "$PYTHON" -m pip show pytest-benchmark >/dev/null 2>&1 || echo "gpu_check: pytest-benchmark missing"
    DATE=$(date -u +%Y-%m-%d)
    GPU=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv || true
fi
REPORT="$RESULTS_DIR/${DATE}-${GPU}.md"
NOTES=""
export BENCH_ROWS="$WORK/rows.jsonl"  # bench_kernels.py appends each row as soon as it is measured
: >"$BENCH_ROWS"
write_report() {  # the results so far, and the decisions they support
    "$PYTHON" bench/probe_report.py "$BENCH_ROWS" --out "$REPORT" \
        --title "Fused Triton kernels against the best PyTorch (${GPU})" --note "$NOTES" \
        | grep -E "^DECISION" || true
}

# --- P0: compile everything in parallel (kernel report), GPU tests beside it ---------------------
TEST_RC=0
if [[ " $PHASES " == *" P0 "* && "$SMALL" != 1 ]]; then
    echo "== P0 compile: kernel report and GPU tests in parallel ($(left) s left)"
    CC=$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
    timeout 200 "$PYTHON" bench/kernel_report.py --arch "$CC" --jobs "$(nproc)" \
        --out "$RESULTS_DIR/${DATE}-kernel-report-sm${CC}.md" --json "$WORK/kernel-report.json" \
        >"$WORK/kernel-report.log" 2>&1 &
    REPORT_PID=$!
    PIDS=()
    for f in tests/test_kernels_mlp.py tests/test_kernels_attention.py tests/test_kernels_topk.py \
             tests/test_kernels_scoring.py tests/test_train_fused.py tests/test_scoring_contract.py; do
        RANKFAST_AUTOTUNE=0 timeout 200 "$PYTHON" -m pytest -q --tb=short -p no:cacheprovider "$f" \
            >"$WORK/$(basename "$f" .py).log" 2>&1 &
        PIDS+=($!)
    done
    for pid in "${PIDS[@]}"; do wait "$pid" || TEST_RC=1; done
    wait "$REPORT_PID"; REPORT_RC=$?
    summary=""
    for log in "$WORK"/test_*.log; do
        cat "$log" >>"$RESULTS_DIR/${DATE}-${GPU}-tests.log"
        last=$(grep -E "[0-9]+ (passed|failed|error)" "$log" | tail -1)
        summary="$summary $(basename "$log" .log): ${last:-no summary (timed out?)};"
    done
    grep -hE "^(FAILED|ERROR)" "$WORK"/test_*.log || true
    grep -A30 "^## Rules" "$RESULTS_DIR/${DATE}-kernel-report-sm${CC}.md" 2>/dev/null | head -20
    NOTES="P0: GPU tests exit ${TEST_RC} (${summary% ;}); kernel report exit ${REPORT_RC}."
    echo "$NOTES"
fi

# --- P1..P6: timed, one phase at a time --------------------------------------------------------
BASE="rankfast rankfast-op rankfast-unfused rankfast-factorized eager eager-split torch.compile torch.compile-split cublas-pair-layer"
MAX="torch.compile-split-max torch.compile-max"  # the split formulation first: likelier the best PyTorch
export BENCH_COMPILE_TIMEOUT=${BENCH_COMPILE_TIMEOUT:-90}
declare -A CASES=(
    [P1]="mlp-bf16" [P2]="din-bf16 din-bf16-norepeat" [P3]="train-mlp train-neumf train-din"
    [P4]="topk-bf16" [P5]="mlp-fp32" [P6]="mlp-bf16 train-mlp train-neumf train-din din-bf16-norepeat"
)
if [ "$SMALL" = 1 ]; then  # the CI smoke run: one case of each kind per phase
    CASES[P2]="din-bf16-norepeat"; CASES[P3]="train-mlp train-din"; CASES[P6]="mlp-bf16 train-mlp"
fi
declare -A CAP=([P1]=90 [P2]=100 [P3]=120 [P4]=60 [P5]=60 [P6]=600)
BENCH_RC=0
for phase in P1 P2 P3 P4 P5 P6; do
    [[ " $PHASES " == *" $phase "* ]] || continue
    impls=$BASE; [ "$phase" = P6 ] && impls=$MAX
    if [ "$SMALL" = 1 ]; then
        kept=""; for i in $impls; do [[ " $KEEP " == *" $i "* ]] && kept="$kept $i"; done; impls=$kept
    fi
    budget=$(left); [ "$SMALL" != 1 ] && [ "${CAP[$phase]}" -lt "$budget" ] && budget=${CAP[$phase]}
    if [ "$budget" -lt 30 ]; then NOTES="$NOTES $phase: not run (budget spent)."; echo "== $phase skipped"; continue; fi
    ids=()
    for case in ${CASES[$phase]}; do for impl in $impls; do ids+=("bench_kernels.py::test_kernels[$case-$impl]"); done; done
    echo "== $phase: ${CASES[$phase]} (up to $budget s)"
    # Only this phase's implementations are built and checked (max-autotune compiles wait for P6).
    (cd bench && BENCH_IMPLS="$impls" timeout "$budget" "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider \
        "${ids[@]}" >"$WORK/$phase.log" 2>&1)
    rc=$?
    cat "$WORK/$phase.log" >>"$WORK/bench.log"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|error)" "$WORK/$phase.log" | tail -4
    if [ "$rc" = 124 ]; then NOTES="$NOTES $phase: timed out after $budget s (the rows it measured are kept)."
    elif [ "$rc" != 0 ]; then NOTES="$NOTES $phase: exit $rc."; BENCH_RC=1; tail -40 "$WORK/$phase.log"; fi
    write_report
done
cp "$WORK/bench.log" "$RESULTS_DIR/${DATE}-${GPU}-bench.log" 2>/dev/null || true
cp "$BENCH_ROWS" "$RESULTS_DIR/${DATE}-${GPU}.jsonl"
write_report >/dev/null
echo "== wrote $REPORT in $(( $(date +%s) - START )) s (tests exit $TEST_RC, benchmarks exit $BENCH_RC)"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
