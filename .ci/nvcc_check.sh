#!/usr/bin/env bash
# Compile every torch-free CUDA source (csrc/cuda/*.cu) with `nvcc -c`, so the kernels cannot
# rot on a machine whose torch is a CPU build. When torch's c10/cuda headers are present, the
# ATen host glue (csrc/cuda/*.cpp) is also syntax-checked with the host compiler.
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

# Host glue: syntax only, needs torch's c10/cuda headers (a CPU wheel ships them but not the
# generated cuda_cmake_macros.h, which is stubbed here) and the CUDA toolkit's headers.
glue=(csrc/cuda/*.cpp)
if [ ${#glue[@]} -gt 0 ] && python -c "import torch" >/dev/null 2>&1; then
  ti=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
  cuda_inc=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
  for cand in "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include; do
    [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=$cand
  done
  if [ -f "$ti/c10/cuda/CUDAGuard.h" ] && [ -f "$cuda_inc/cuda_runtime.h" ]; then
    mkdir -p "$tmp/stub/c10/cuda/impl"
    [ -f "$ti/c10/cuda/impl/cuda_cmake_macros.h" ] || echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    for src in "${glue[@]}"; do
      if "${CXX:-g++}" -fsyntax-only -std=c++17 -w -DSHARPFAST_WITH_CUDA -I csrc/include -I "$ti" \
          -I "$ti/torch/csrc/api/include" -I "$tmp/stub" -I "$cuda_inc" "$src"; then
        echo "nvcc_check: ok   $src (host glue, syntax)"
      else
        echo "nvcc_check: FAIL $src (host glue, syntax)" >&2
        status=1
      fi
    done
  else
    echo "nvcc_check: torch c10/cuda or CUDA headers not found; host glue syntax check skipped"
  fi
fi
exit $status
