#!/usr/bin/env bash
# The GPU micro-benchmarks of benches/cuda, built here and run on a lent GPU machine (docs/cuda.md):
#   benches/cuda/run.sh build   builds dist/kbench/: the kernel bench (kernel_bench.cu) and the
#                               kernel tracer (trace.cpp, a CUPTI injection library, with the
#                               libcupti it needs), with the toolkit of scripts/cuda/install-toolkit.sh
#   benches/cuda/run.sh         on the device (dist/kbench and dist/cuda carried): the kernel bench
#                               at batch 128 and 256 into $OUT/kernel-bench.txt, then a trace of
#                               roberta-base bf16 training (recycle gpu-check --train-only) at batch
#                               32 and 128, summarised into $OUT/trace-summary.txt (the raw
#                               traces into $OUT/trace-b*.raw.gz)
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = build ]; then
  set -e
  VENV=${CUDA_VENV:-/work/venv-cuda}
  [ -x "$VENV/cuda/bin/nvcc" ] || scripts/cuda/install-toolkit.sh
  bash scripts/cuda/install-toolkit.sh >/dev/null  # CUPTI, where an older install lacks it
  CU=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
  export PATH=$VENV/cuda/bin:$PATH
  mkdir -p dist/kbench
  nvcc -std=c++17 -O3 -arch=sm_90 --extended-lambda -Isrc/model/kernels/cuda \
    benches/cuda/kernel_bench.cu -o dist/kbench/kernel_bench \
    -L"$CU"/lib -L"$VENV"/cuda/lib -lcublas -lcublasLt
  g++ -std=c++17 -O2 -shared -fPIC -Wall benches/cuda/trace.cpp -I"$CU"/include \
    -I"$VENV"/cuda/include -L"$CU"/lib -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN' \
    -o dist/kbench/libtrace.so
  cp "$CU"/lib/libcupti.so.13 dist/kbench/
  ls -l dist/kbench >&2
  exit 0
fi
OUT=${OUT:-/tmp/kbench-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# cuBLAS from the machine's Python environment (as scripts/gpu/run.sh finds it).
libs=$("$PY" -c 'import glob, os, site; print(":".join(sorted({d for r in site.getsitepackages() for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))')
libs="$libs:/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for batch in 128 256; do
  LD_LIBRARY_PATH="$libs" timeout 120 dist/kbench/kernel_bench --batch "$batch" 2>&1 |
    tee -a "$OUT/kernel-bench.txt"
done
BIN=${RECYCLE_BIN:-/tmp/recycle-cuda}
[ -x "$BIN" ] || { gzip -dc dist/cuda/recycle.gz >"$BIN" && chmod +x "$BIN"; }
for batch in 32 128; do
  trace=/tmp/trace-b$batch.txt
  CUDA_INJECTION64_PATH="$PWD/dist/kbench/libtrace.so" RECYCLE_TRACE="$trace" \
    LD_LIBRARY_PATH="$PWD/dist/kbench:$libs" timeout 120 "$BIN" gpu-check --device cuda \
    --skip-parity --skip-ops --matmul 0 --shapes roberta-base --precisions bf16 --batch "$batch" \
    --seq 128 --warmup 2 --steps 5 --flash false --weight-grad-split 1 --train-only \
    >"$OUT/trace-b$batch.jsonl" 2>"$OUT/trace-b$batch.log"
  echo "== trace: roberta-base bf16 training, batch $batch (exit $?)" | tee -a "$OUT/trace-summary.txt"
  "$PY" benches/cuda/trace_summary.py "$trace" --min-kernels 0 --steps 5 2>&1 |
    tee -a "$OUT/trace-summary.txt"
  # The raw trace too (about half a megabyte compressed), for questions the summary did not ask.
  [ -f "$trace" ] && gzip -c "$trace" >"$OUT/trace-b$batch.raw.gz"
done
