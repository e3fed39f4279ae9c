#!/usr/bin/env bash
OUT=${OUT:-/tmp/out}
R=$(pwd)
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install --no-build-isolation --no-deps . > $OUT/build.log 2>&1 || { grep -B2 -A10 error $OUT/build.log | head -60; exit 1; }
(cd /tmp && python3 -m pytest $R/tests/test_multi_adapter.py -q -p no:cacheprovider -k "fused or cuda" 2>&1 | tail -4)
bash benchmarks/gpu_session.sh --full --no-tests 2>&1 | tail -45
