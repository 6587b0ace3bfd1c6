#!/usr/bin/env bash
# Builds (here: `benches/cuda/run.sh build`, with the CUDA toolkit of scripts/cuda/install-toolkit.sh)
# or runs (on the device machine: `benches/cuda/run.sh`, dist/kbench carried) the kernel
# micro-benchmark benches/cuda/kernel_bench.cu, at batch 128 and 256; the tables go to
# $OUT/kernel-bench.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = build ]; then
  set -e
  VENV=${CUDA_VENV:-/work/venv-cuda}
  export PATH=$VENV/cuda/bin:$PATH
  mkdir -p dist/kbench
  nvcc -std=c++17 -O3 -arch=sm_90 --extended-lambda -Isrc/model/kernels/cuda \
    benches/cuda/kernel_bench.cu -o dist/kbench/kernel_bench \
    -L"$VENV"/lib/python3.11/site-packages/nvidia/cu13/lib -L"$VENV"/cuda/lib -lcublas -lcublasLt
  exit 0
fi
OUT=${OUT:-/tmp/kbench-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# cuBLAS from the machine's Python environment (as scripts/gpu/run.sh finds it).
libs=$("$PY" -c 'import glob, os, site; print(":".join(sorted({d for r in site.getsitepackages() for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))')
for batch in 128 256; do
  LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 120 \
    dist/kbench/kernel_bench --batch "$batch" 2>&1 | tee -a "$OUT/kernel-bench.txt"
done
