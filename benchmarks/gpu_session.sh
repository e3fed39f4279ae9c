#!/usr/bin/env bash
# One call on a lent GPU machine: build lora_ext, run the whole test suite (CUDA included), run the
# side-by-side benchmark, and print a short summary last. Logs go to $OUT (or /tmp/lora_ext_out).
#   bash benchmarks/gpu_session.sh [--full] [--no-bench] [--no-tests]
set -uo pipefail
OUT=${OUT:-/tmp/lora_ext_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
bench_args=(--quick); run_bench=1; run_tests=1
for arg in "$@"; do
  case $arg in
    --full) bench_args=() ;;
    --no-bench) run_bench=0 ;;
    --no-tests) run_tests=0 ;;
  esac
done
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
build_rc=$?
build_warnings=$(grep -E "warning" "$OUT/build.log" | grep -vc "byte-compiling" || true)
echo "build rc=$build_rc in $(( $(date +%s) - start )) s, $build_warnings compiler warnings (-Wall -Wextra)"
if [ $build_rc -ne 0 ]; then grep -B3 -A12 -i "error" "$OUT/build.log" | head -120; exit 1; fi
python3 -c "import lora_ext; assert lora_ext.cuda_kernels_available(); print('CUDA kernels registered')"

test_summary="not run"
if [ $run_tests -eq 1 ]; then
  python3 -m pytest tests -q -p no:cacheprovider -rfs 2>&1 | tee "$OUT/pytest.log" | tail -40
  test_summary=$(grep -E "passed|failed|error" "$OUT/pytest.log" | tail -1)
fi

if [ $run_bench -eq 1 ]; then
  python3 benchmarks/bench_lora.py "${bench_args[@]}" --json "$OUT/bench.json" --plot "$OUT/overhead_vs_tokens.png" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^sweep" | tail -40
fi

if [ $run_bench -eq 1 ] && [ ${#bench_args[@]} -eq 0 ]; then  # --full: the multi-adapter cases too (issue 8)
  python3 benchmarks/bench_multi_adapter.py --json "$OUT/bench_multi.json" 2>&1 | tee "$OUT/bench_multi.log" | tail -6
fi

echo
echo "===== summary: commit $commit on $(head -1 "$OUT/gpu.txt") ====="
echo "build: $build_warnings compiler warnings"
echo "pytest: $test_summary"
[ $run_bench -eq 1 ] && sed -n '/^Summary/,$p' "$OUT/bench.log"
