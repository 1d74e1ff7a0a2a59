#!/usr/bin/env bash
# One check on a machine with a CUDA GPU, in under 8 minutes:
#   1. installs rankfast (editable, no dependency resolution: torch/triton are the machine's own);
#   2. runs the kernel and fused-training tests on the GPU, one process per file in parallel
#      (incl. the @gpu ones: inductor compile, bf16);
#   3. runs bench/bench_kernels.py case by case (eager, torch.compile, rankfast), most important
#      first, each in its own process, while the benchmark budget lasts;
#   4. writes RESULTS_DIR/<date>-<gpu>.md (device, driver, versions, medians, ratios, peak memory,
#      measured bf16 matmul ceiling and roofline fractions), the tests' log and the raw JSON.
# Usage: bash bench/gpu_check.sh            (from anywhere; commit the results file it writes)
# Env: RESULTS_DIR (default bench/results); TEST_TIMEOUT (s, default 120); BENCH_BUDGET (s for all
# benchmark cases, default 300: all seven cases took 290 s on an H200; a case starts only with 45 s of it left); CASES (space-separated
# names from bench_kernels.CASES); SKIP_TESTS=1 runs only the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
RESULTS_DIR=${RESULTS_DIR:-bench/results}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
BENCH_BUDGET=${BENCH_BUDGET:-300}
CASES=${CASES:-"mlp-bf16 din-bf16 topk-bf16 train-mlp train-neumf train-din mlp-fp32"}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS_DIR"

python - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch"; exit 2; }
import torch
assert torch.cuda.is_available()
EOF

echo "== install"
python -m pip install --no-build-isolation --no-deps -e . >"$WORK/install.log" 2>&1 \
    || { tail -30 "$WORK/install.log"; echo "gpu_check: install failed"; exit 3; }
python -m pip show pytest-benchmark >/dev/null 2>&1 || echo "gpu_check: pytest-benchmark missing (benchmarks will not run)"

DATE=$(date -u +%Y-%m-%d)
GPU=$(python -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
REPORT="$RESULTS_DIR/${DATE}-${GPU}.md"
TESTS_LOG="$RESULTS_DIR/${DATE}-${GPU}-tests.log"

TEST_RC=0
TEST_SUMMARY="not run"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== tests (GPU, RANKFAST_AUTOTUNE=0: one launch config per kernel, no tuning)"
    # One pytest process per file, in parallel: most of the time is Triton compiling (CPU-bound).
    # The two largest files get 3 workers each where pytest-xdist is installed.
    XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 3")
    PIDS=()
    for f in tests/test_kernels_mlp.py tests/test_kernels_attention.py tests/test_kernels_topk.py \
             tests/test_kernels_scoring.py tests/test_train_fused.py; do
        case "$f" in *_mlp.py|*_attention.py) workers=$XDIST ;; *) workers="" ;; esac
        # shellcheck disable=SC2086
        RANKFAST_AUTOTUNE=0 timeout "$TEST_TIMEOUT" python -m pytest -v --tb=short -p no:cacheprovider $workers "$f" \
            >"$WORK/$(basename "$f" .py).log" 2>&1 &
        PIDS+=($!)
    done
    for pid in "${PIDS[@]}"; do wait "$pid" || TEST_RC=1; done
    TEST_SUMMARY=""
    : >"$TESTS_LOG"
    for log in "$WORK"/test_*.log; do
        cat "$log" >>"$TESTS_LOG"
        last=$(grep -E "[0-9]+ (passed|failed|error)" "$log" | tail -1)
        TEST_SUMMARY="$TEST_SUMMARY $(basename "$log" .log): ${last:-no summary (timed out?)};"
    done
    grep -E "^(FAILED|ERROR)" "$TESTS_LOG" || true
    echo "$TEST_SUMMARY"
fi

echo "== benchmarks (autotuned), budget ${BENCH_BUDGET} s"
BENCH_RC=0
BENCH_START=$(date +%s)
JSONS=()
SKIPPED=""
for case in $CASES; do
    left=$((BENCH_BUDGET - ($(date +%s) - BENCH_START)))
    if [ "$left" -lt 45 ]; then SKIPPED="$SKIPPED $case"; continue; fi
    ids=()
    for impl in rankfast rankfast-unfused rankfast-factorized eager torch.compile; do ids+=("bench_kernels.py::test_kernels[$case-$impl]"); done
    echo "-- $case (up to $left s)"
    (cd bench && timeout "$left" python -m pytest -q -rfE --tb=short -p no:cacheprovider "${ids[@]}" \
        --benchmark-json="$WORK/$case.json" >"$WORK/$case.log" 2>&1)
    rc=$?
    cat "$WORK/$case.log" >>"$WORK/bench.log"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|error)" "$WORK/$case.log" | tail -4
    [ "$rc" = 0 ] || { BENCH_RC=1; echo "   $case: exit $rc"; }
    [ -s "$WORK/$case.json" ] && JSONS+=("$WORK/$case.json")
done
[ -z "$SKIPPED" ] || echo "   not run (budget spent):$SKIPPED"
cp "$WORK/bench.log" "$RESULTS_DIR/${DATE}-${GPU}-bench.log" 2>/dev/null || true

echo "== report"
NOTE=$(python - "$TEST_RC" "$TEST_SUMMARY" "$BENCH_RC" "$SKIPPED" "${JSONS[@]}" <<'EOF'
import json, sys
import torch, triton
test_rc, test_summary, bench_rc, skipped, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
lines = [f"GPU tests: exit {test_rc} ({test_summary.strip()}). Benchmarks: exit {bench_rc}"
         + (f"; not run (budget spent): {skipped.strip()}." if skipped.strip() else "."), ""]
props = torch.cuda.get_device_properties(0)
lines.append(f"Device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}); triton {triton.__version__}.")
rows = [b for p in paths for b in json.load(open(p))["benchmarks"]
        if b["extra_info"].get("impl") == "rankfast" and "tflops" in b["extra_info"]]
if rows:
    ceiling = rows[0]["extra_info"].get("ceiling_tflops")
    lines += ["", f"Measured bf16 dense matmul ceiling (8192^3, torch.matmul): {ceiling:.0f} TFLOP/s.", "",
              "| case | rankfast TFLOP/s (pair layers) | fraction of the bf16 ceiling |", "|---|---|---|"]
    for b in rows:
        e = b["extra_info"]
        frac = e.get("ceiling_fraction")
        lines.append(f"| {b['group']} | {e['tflops']:.1f} | " + (f"{frac:.1%} |" if frac is not None else "- |"))
print("\n".join(lines))
EOF
)
if [ "${#JSONS[@]}" -gt 0 ]; then
    python bench/report.py "${JSONS[@]}" --title "Fused Triton kernels (${GPU})" --out "$REPORT" --note "$NOTE"
    python - "$RESULTS_DIR/${DATE}-${GPU}.json" "${JSONS[@]}" <<'EOF'
import json, sys
runs = [json.load(open(p)) for p in sys.argv[2:]]
json.dump(dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]]), open(sys.argv[1], "w"), indent=1)
EOF
else
    { echo "# Fused Triton kernels (${GPU})"; echo; echo "- Date: ${DATE}"; echo; echo "No benchmark results."; echo; echo "$NOTE"; } >"$REPORT"
    cat "$REPORT"
fi
echo "== wrote $REPORT in $(( $(date +%s) - START )) s (tests exit $TEST_RC, benchmarks exit $BENCH_RC)"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
