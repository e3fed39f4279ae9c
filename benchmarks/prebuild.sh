#!/usr/bin/env bash
# Builds lora_ext in place with another Python, one whose torch matches a GPU machine's (the same torch version and
# CUDA build, the same Python minor version), so that the GPU machine runs the built tree instead of compiling it:
#
#   PYTHON=/path/to/python3.12 bash benchmarks/prebuild.sh                 # this tree
#   PYTHON=/path/to/python3.12 bash benchmarks/prebuild.sh REF DIR         # git REF exported into DIR, built there
#
# Then, on the GPU machine, with the tree (and the built .so, which git ignores) carried along:
#   PYTHONPATH=<tree> python3 -m pytest tests ...     (or any script; lora_ext is imported from the tree)
#
# The interpreter needs torch (e.g. `pip install torch==2.11.0` from PyPI for a cu130 machine), ninja and pybind11;
# the CUDA toolkit is found as setup.py finds it. TORCH_CUDA_ARCH_LIST defaults to 9.0 (built as 9.0a). Debug
# information is stripped from the .so (≈ 35 MB → 15 MB), which matters when a call carries several builds.
# Builds in DIR compile from scratch (minutes per build); a second build of this tree recompiles changed files only.
set -euo pipefail
PYTHON=${PYTHON:?set PYTHON to the interpreter whose torch the GPU machine has}
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$root
if [ $# -ge 2 ]; then
  tree=$2
  mkdir -p "$tree"
  git -C "$root" archive "$1" | tar -x -C "$tree"
fi
cd "$tree"
log=$(mktemp "${TMPDIR:-/tmp}/lora_ext_prebuild.XXXXXX")
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PYTHON" setup.py build_ext --inplace > "$log" 2>&1 || { tail -30 "$log"; echo "log: $log"; exit 1; }
suffix=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
library=lora_ext/_C$suffix
strip --strip-debug "$library"
"$PYTHON" -c "import torch; print('built', '$tree/$library', 'for torch', torch.__version__, '(log: $log)')"
