#!/usr/bin/env bash
# Run a representative subset of the CUDA tests under NVIDIA compute-sanitizer, once per tool
# (memcheck, racecheck, initcheck, synccheck), on a GPU machine with lora_ext already built with its
# CUDA kernels (e.g. `pip install --no-build-isolation .`, or `bash benchmarks/gpu_session.sh --no-bench`).
#
#   bash tests/sanitize.sh [--full] [tool ...]        # default: all four tools, the representative subset
#   OUT=/path/to/logs bash tests/sanitize.sh memcheck  # logs under $OUT (default ./sanitize-logs)
#
# Per tool it writes $OUT/<tool>.pytest.log (pytest's output) and $OUT/<tool>.sanitizer.log (the
# sanitizer's report), and prints one summary line per tool last. Exit status: 0 when every tool ran
# clean, 1 otherwise.
#
# Selection: the CUDA tests are the parametrizations whose id contains "cuda" (conftest.DEVICES,
# DEVICE_DTYPES) plus every test in test_cuda_kernel_paths.py (all CUDA; each case sits on one side of a
# kernel-choice boundary: fused decode, tensor-core shrink/expand/token-reduce with tails, FMA fallbacks,
# unaligned and strided x). The subset keeps those kernel-path cases for bf16 (both adapter dtypes), the
# multi-adapter decoding and tile kernels (test_multi_adapter.py's cuda_decode, cuda_path_edges, cuda_tiles; not
# its graph-capture and profiler tests: the uncached allocator below cannot allocate during a capture, and the
# profiler cannot attach beside the sanitizer), the
# small operator shapes of test_ops (primes, zero tokens, one token, odd tiles, r = 256), merge, the
# dropout mask, determinism and bad-input rows, and a few derandomized fuzz examples: every kernel we
# ship runs, in minutes per tool. --full runs every CUDA test (much slower under racecheck/initcheck).
# SANITIZE_K replaces the subset's pytest -k expression. Each tool run is capped by SANITIZE_TIMEOUT
# seconds (default 900); the summary line gives each tool's time, to retune the subset.
set -uo pipefail

OUT=${OUT:-./sanitize-logs}
mkdir -p "$OUT"
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
if ! command -v "$SANITIZER" > /dev/null; then
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    if [ -x "$candidate" ]; then SANITIZER=$candidate; break; fi
  done
fi
command -v "$SANITIZER" > /dev/null || { echo "sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }

full=0
tools=()
for arg in "$@"; do
  case $arg in
    --full) full=1 ;;
    memcheck|racecheck|initcheck|synccheck) tools+=("$arg") ;;
    *) echo "sanitize.sh: unknown argument $arg"; exit 2 ;;
  esac
done
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck initcheck synccheck)

python3 -c "import torch, lora_ext, sys; sys.exit(0 if torch.cuda.is_available() and lora_ext.cuda_kernels_available() else 1)" \
  || { echo "sanitize.sh: needs a CUDA device and lora_ext built with its CUDA kernels"; exit 2; }

if [ $full -eq 1 ]; then
  selection=(tests -k "cuda and not huge")
else
  selection=(
    tests/test_cuda_kernel_paths.py tests/test_ops.py tests/test_dropout.py tests/test_determinism.py
    tests/test_op_errors_table.py tests/test_fuzz.py tests/test_cuda_streams_graphs.py tests/test_multi_adapter.py
    -k "${SANITIZE_K:-(kernel_path and bf16) or (cuda and not large and not -f16- and not keep_fraction and (primes or zero_tokens or odd_tiles or r256 or merge or mask or repeat or bad_input or fuzz or side_stream or cuda_graph)) or (cuda_decode and not one_launch and not after_the_gemm) or cuda_path_edges or cuda_tiles}"
  )
fi

# Every allocation its own cudaMalloc, so memcheck sees out-of-bounds accesses that would otherwise land
# inside a block of PyTorch's caching allocator; few fuzz examples (derandomized) per test.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 LORA_EXT_FUZZ_EXAMPLES=${LORA_EXT_FUZZ_EXAMPLES:-6} PYTHONUNBUFFERED=1

declare -A extra=(
  [memcheck]="--leak-check no"
  [racecheck]="--racecheck-report hazard"
  [initcheck]=""
  [synccheck]=""
)

summary=()
status=0
for tool in "${tools[@]}"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${SANITIZE_TIMEOUT:-900}" "$SANITIZER" --tool "$tool" ${extra[$tool]} --error-exitcode 1 --print-limit 50 \
    --log-file "$OUT/$tool.sanitizer.log" \
    python3 -m pytest "${selection[@]}" -q -p no:cacheprovider -rfE > "$OUT/$tool.pytest.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  errors=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$OUT/$tool.sanitizer.log" 2>/dev/null | tail -1 | grep -Eo "[0-9]+" || true)
  tests=$(grep -E "[0-9]+ (passed|failed)" "$OUT/$tool.pytest.log" | tail -1)
  [ $rc -eq 124 ] && tests="TIMED OUT after ${SANITIZE_TIMEOUT:-900} s; ${tests}"
  [ "$rc" -ne 0 ] && status=1
  summary+=("$(printf '%-10s rc=%-3s sanitizer errors=%-4s %4ss  pytest: %s' "$tool" "$rc" "${errors:-?}" "$seconds" "${tests:-no result}")")
done

echo
echo "===== compute-sanitizer summary (logs in $OUT) ====="
for line in "${summary[@]}"; do echo "$line"; done
exit $status
