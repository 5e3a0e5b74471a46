#!/usr/bin/env bash
# Build the whole extension, CUDA kernels and ATen host glue, against torch 2.14.1 (a CUDA 13
# build) in a virtual environment of its own, on a machine without a GPU. Then check that every
# op has a CUDA kernel registered, run the op tests (their CUDA cases skip without a GPU) and
# the CPU self-test on that build. The build happens in a copy of the tree, so the repository's
# own sharpfast/_C*.so (built against the README's torch) is left alone.
# Usage: bash .ci/cuda_build.sh   (TORCH_CUDA_ARCH_LIST="8.0;9.0" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null 2>&1 || { echo "cuda_build: nvcc not found" >&2; exit 2; }
# the toolkit whose headers the host glue needs (nvcc on the PATH may be a wrapper script)
if [ -z "${CUDA_HOME:-}" ]; then
  for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    [ -f "$cand/include/cuda_runtime.h" ] && { CUDA_HOME=$cand; break; }
  done
fi
[ -f "${CUDA_HOME:-/nonexistent}/include/cuda_runtime.h" ] || { echo "cuda_build: no CUDA toolkit headers found" >&2; exit 2; }
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
venv=${CUDA_VENV:-/tmp/sharpfast-cuda-venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 ninja numpy setuptools wheel pytest

git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$work"
cd "$work"
start=$(date +%s)
FORCE_CUDA=1 MAX_JOBS=2 "$venv/bin/python" setup.py -q build_ext --inplace
echo "cuda_build: built in $(( $(date +%s) - start )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

"$venv/bin/python" - <<'EOF'
import torch
from sharpfast import _ops
info = _ops.build_info()
assert _ops.IMPORT_ERROR is None, _ops.IMPORT_ERROR
assert info["cuda"], f"built without CUDA: {info}"
missing = [op for op in info["ops"]
           for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sharpfast::{op}", key)]
assert not missing, f"ops without a kernel: {missing}"
print(f"cuda_build: torch {torch.__version__}, CUDA {info['cuda_version']}, archs {info['cuda_archs']}: "
      f"CPU and CUDA kernels registered for all {len(info['ops'])} ops")
EOF
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/core/test_ops.py
"$venv/bin/python" -m sharpfast doctor --device cpu
