#!/usr/bin/env bash
# One check on a machine with a CUDA GPU, in under 8 minutes:
#   1. installs rankfast (editable, no dependency resolution: torch/triton are the machine's own);
#   2. runs the kernel tests on the GPU (incl. the @gpu ones: inductor compile, bf16);
#   3. runs bench/bench_kernels.py in one process (eager, torch.compile, rankfast);
#   4. writes bench/results/<date>-<gpu>.md: device, driver, versions, medians,
#      ratios, peak memory, measured bf16 matmul ceiling and roofline fractions.
# Usage: bash bench/gpu_check.sh            (from anywhere; commit the results file it writes)
# Env: TEST_TIMEOUT / BENCH_TIMEOUT (seconds; defaults 200 / 270). Budget: install ~1 min,
# tests <= TEST_TIMEOUT (files in parallel), benchmarks <= BENCH_TIMEOUT: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
WORK=$(mktemp -d)

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
OUT="bench/results/${DATE}-${GPU}.md"
JSON="$WORK/kernels.json"

echo "== tests (GPU, RANKFAST_AUTOTUNE=0: one launch config per kernel, no tuning)"
# One pytest process per file, in parallel: most of the time is Triton compiling (CPU-bound).
TEST_RC=0
PIDS=()
for f in tests/test_kernels_mlp.py tests/test_kernels_attention.py tests/test_kernels_topk.py tests/test_kernels_scoring.py; do
    RANKFAST_AUTOTUNE=0 timeout "$TEST_TIMEOUT" python -m pytest -q -p no:cacheprovider "$f" \
        >"$WORK/$(basename "$f" .py).log" 2>&1 &
    PIDS+=($!)
done
for pid in "${PIDS[@]}"; do wait "$pid" || TEST_RC=1; done
TEST_SUMMARY=""
for log in "$WORK"/test_kernels_*.log; do
    cat "$log" >>"$WORK/tests.log"
    TEST_SUMMARY="$TEST_SUMMARY $(basename "$log" .log): $(grep -E "passed|failed|error" "$log" | tail -1);"
done
grep -E "^(FAILED|ERROR)" "$WORK/tests.log" || true
echo "$TEST_SUMMARY"

echo "== benchmarks (autotuned)"
BENCH_RC=0
(cd bench && timeout "$BENCH_TIMEOUT" python -m pytest -q -p no:cacheprovider bench_kernels.py \
    --benchmark-json="$JSON" 2>&1 | tee "$WORK/bench.log")
BENCH_RC=${PIPESTATUS[0]}

echo "== report"
NOTE=$(python - "$JSON" "$TEST_RC" "$TEST_SUMMARY" "$BENCH_RC" <<'EOF'
import json, subprocess, sys
import torch, triton
path, test_rc, test_summary, bench_rc = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
lines = [f"Kernel tests on the GPU: exit {test_rc} ({test_summary.strip() or 'no summary'}). "
         f"Benchmarks: exit {bench_rc}.", ""]
props = torch.cuda.get_device_properties(0)
lines.append(f"Device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}); triton {triton.__version__}.")
try:
    data = json.load(open(path))
except (OSError, ValueError):
    data = {"benchmarks": []}
rows = [b for b in data["benchmarks"] if b["extra_info"].get("impl") == "rankfast" and "tflops" in b["extra_info"]]
if rows:
    ceiling = rows[0]["extra_info"].get("ceiling_tflops")
    lines += ["", f"Measured bf16 dense matmul ceiling (8192^3, torch.matmul): {ceiling:.0f} TFLOP/s.", "",
              "| case | rankfast TFLOP/s (pair layers) | fraction of the bf16 ceiling |", "|---|---|---|"]
    for b in rows:
        e = b["extra_info"]
        frac = e.get("ceiling_fraction")
        lines.append(f"| {b['group']} | {e['tflops']:.1f} | {frac:.1%} |" if frac is not None else
                     f"| {b['group']} | {e['tflops']:.1f} | - |")
print("\n".join(lines))
EOF
)
if [ -s "$JSON" ]; then
    python bench/report.py "$JSON" --title "Fused Triton kernels (${GPU})" --out "$OUT" --note "$NOTE"
else
    mkdir -p bench/results
    { echo "# Fused Triton kernels (${GPU})"; echo; echo "- Date: ${DATE}"; echo; echo "No benchmark results (exit ${BENCH_RC})."; echo; echo "$NOTE"; } >"$OUT"
fi
cp "$WORK/tests.log" "bench/results/${DATE}-${GPU}-tests.log" 2>/dev/null || true
echo "== wrote $OUT in $(( $(date +%s) - START )) s (tests exit $TEST_RC, benchmarks exit $BENCH_RC)"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
