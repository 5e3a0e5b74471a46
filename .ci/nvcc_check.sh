#!/usr/bin/env bash
# Compile every torch-free CUDA source (csrc/cuda/*.cu) with `nvcc -c` and every warning an
# error, for each architecture in ARCHS. (.ci/cuda_build.sh builds the whole extension, host
# glue included, against a CUDA build of torch.)
# Usage: bash .ci/nvcc_check.sh   (ARCHS="90 80" by default; exits non-zero on any failure)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"90 80"}
command -v "$NVCC" >/dev/null 2>&1 || { echo "nvcc_check: $NVCC not found" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
sources=(csrc/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "nvcc_check: no csrc/cuda/*.cu sources" >&2; exit 1; }
status=0
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    obj="$tmp/$(basename "$src" .cu).sm_$arch.o"
    # the exact-math flags of setup.py, and the half/bf16 restrictions torch's CUDAExtension adds
    if "$NVCC" -c -std=c++17 -O3 -fmad=false --prec-div=true --prec-sqrt=true --ftz=false -I csrc/include -arch="sm_$arch" \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ -Werror all-warnings -o "$obj" "$src"; then
      echo "nvcc_check: ok   $src (sm_$arch)"
    else
      echo "nvcc_check: FAIL $src (sm_$arch)" >&2
      status=1
    fi
  done
done

exit $status
