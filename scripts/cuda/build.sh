#!/usr/bin/env bash
# Builds recycle with `--features cuda` for the lent GPU machines (H100/H200, sm_90) against the
# CUDA 13.0 wheels that scripts/cuda/install-toolkit.sh installs, in a target directory of its own
# (the CPU build in ./target stays untouched), and copies the stripped binaries into dist/cuda/,
# the ignored folder the device tool carries. See docs/cuda.md.
# Usage: scripts/cuda/build.sh     (env: CUDA_VENV, CUDA_TARGET_DIR, CUDA_COMPUTE_CAP)
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${CUDA_VENV:-/work/venv-cuda}
export CUDA_HOME=$VENV/cuda
[ -x "$CUDA_HOME/bin/nvcc" ] || scripts/cuda/install-toolkit.sh
export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Pin cudarc's bindings to the CUDA version the GPU machines' driver speaks, rather than whatever
# `nvcc --version` says.
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-/work/target-cuda}

start=$(date +%s)
cargo build --release --features cuda --bin recycle
echo "build: cargo took $(( $(date +%s) - start )) s" >&2

# Stripped, the binary is ~60 MiB (PTX text and sm_90a kernels); with the working tree that is at
# the device tool's 64 MiB limit, so it travels gzipped (~17 MiB) and run.sh unpacks it.
rm -rf dist/cuda
mkdir -p dist/cuda
strip -o dist/cuda/recycle.tmp "$CARGO_TARGET_DIR/release/recycle"
gzip -9 -c dist/cuda/recycle.tmp >dist/cuda/recycle.gz
rm dist/cuda/recycle.tmp
ls -l dist/cuda >&2
total=$(du -cb dist/cuda/* | tail -n1 | cut -f1)
if [ "$total" -gt $((40 * 1024 * 1024)) ]; then
  echo "build: dist/cuda is $total bytes, too much for the device tool's 64 MiB carry" >&2
  exit 1
fi
