#!/usr/bin/env bash
# The ONE command the device tool runs on a lent GPU machine (docs/cuda.md): points the dynamic
# loader at the CUDA 13 libraries of the machine's Python environment, then runs the CUDA/CPU
# parity checks and the throughput bench of the prebuilt dist/cuda/recycle, the same workload in
# PyTorch + transformers, and writes a summary (ratios, MFU) to $OUT/gpu-report.txt.
# Keeps going past a failed stage, so one run brings back everything it could measure.
#   DEVICE=cpu scripts/gpu/run.sh    tiny shapes on the CPU: checks the control flow here.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
BIN=${RECYCLE_BIN:-}
if [ -z "$BIN" ]; then
  # scripts/cuda/build.sh ships the binary gzipped (the carry limit).
  BIN=/tmp/recycle-cuda
  gzip -dc dist/cuda/recycle.gz >"$BIN" && chmod +x "$BIN"
fi
if [ "$DEVICE" = cpu ]; then
  SIZE=(--tiny --batch 4 --seq 16 --warmup 1 --steps 2 --matmul 256)
else
  SIZE=(--batch 32 --seq 128 --warmup 3 --steps 10 --matmul 8192)
fi
REPORT=$OUT/gpu-report.txt
log() { echo "run.sh: $*" | tee -a "$REPORT" >&2; }
: >"$REPORT"

# CUDA libraries: every nvidia/**/lib folder of the Python environment (cublas, cudart, nvrtc,
# curand for CUDA 13), then the driver's usual homes in case ld.so.conf lacks them.
libs=$("$PY" - <<'PYEOF'
import glob, os, site, sysconfig
roots = set(site.getsitepackages() + [sysconfig.get_paths()["purelib"]])
dirs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})
print(":".join(dirs))
PYEOF
)
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && libs="$libs:$d"
done
# For the recycle binary only: Python finds its own libraries, and a changed path can break it.
CUDA_LIBS="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "device=$DEVICE recycle's LD_LIBRARY_PATH=$CUDA_LIBS"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$REPORT"
if [ -x "$BIN" ]; then
  missing=$(LD_LIBRARY_PATH=$CUDA_LIBS ldd "$BIN" | grep "not found" || true)
  [ -n "$missing" ] && log "ldd: missing libraries: $missing"
else
  log "no binary at $BIN (build it with scripts/cuda/build.sh and carry dist/cuda)"
fi

start=$(date +%s)
log "recycle gpu-check ..."
LD_LIBRARY_PATH=$CUDA_LIBS timeout 330 "$BIN" gpu-check --device "$DEVICE" "${SIZE[@]}" >"$OUT/recycle.jsonl" 2> >(tee "$OUT/recycle.log" >&2)
rc=$?
log "recycle gpu-check exit $rc after $(( $(date +%s) - start )) s"
[ $rc -ne 0 ] && tail -n 20 "$OUT/recycle.log" >>"$REPORT"

start=$(date +%s)
log "torch bench ..."
PYTHONUNBUFFERED=1 timeout 200 "$PY" scripts/gpu/torch_gpu_bench.py --device "$DEVICE" "${SIZE[@]}" >"$OUT/torch.jsonl" 2> >(tee "$OUT/torch.log" >&2)
trc=$?
log "torch bench exit $trc after $(( $(date +%s) - start )) s"
[ $trc -ne 0 ] && tail -n 20 "$OUT/torch.log" >>"$REPORT"

"$PY" scripts/gpu/summarize.py "$OUT/recycle.jsonl" "$OUT/torch.jsonl" | tee -a "$REPORT"
exit $(( rc != 0 || trc != 0 ))
