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
  SHAPE=(--tiny --seq 16 --warmup 1 --steps 2) B=4 M=256
else
  SHAPE=(--seq 128 --warmup 3 --steps 10) B=32 M=8192
fi
SIZE=("${SHAPE[@]}" --batch "$B" --matmul "$M")
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

# Every stage gets at most what is left of BUDGET (seconds; keep it under the device call's
# timeout: 300 fits the documented 380 s call with the kernel bench after it; run 12a's stages
# took 221 s on an H200, and the A/B rows and the chosen levers' stages add about 65), and
# the optional stages run only while enough is left.
BUDGET=${BUDGET:-300}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); echo $(( $1 < l - 10 ? $1 : l - 10 )); }
# stage NAME CAP OUTFILE CMD...: runs CMD under timeout, stdout to OUTFILE, stderr to NAME.log.
stage() {
  local name=$1 limit out=$3 start rc
  limit=$(cap "$2")
  shift 3
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, $(left) s of the budget left"
    return 99
  fi
  start=$(date +%s)
  log "$name (at most $limit s) ..."
  # stderr through tee in a pipeline (not a process substitution, which bash does not wait for),
  # so that the log is whole when it is read below and by `died`.
  timeout -k 10 "$limit" "$@" 2>&1 >"$out" | tee "$OUT/$name.log" >&2
  rc=${PIPESTATUS[0]}
  log "$name: exit $rc after $(( $(date +%s) - start )) s"
  [ $rc -ne 0 ] && tail -n 20 "$OUT/$name.log" >>"$REPORT"
  return $rc
}
# died RC NAME: whether stage NAME's process died: a signal or the time limit (exit 124 and up;
# gpu-check exits 125 when its CUDA context is lost), or a lost context in its log all the same
# (a kernel fault: every later call on the device fails; device::context_lost lists the codes).
died() {
  [ "$1" -ne 99 ] && { [ "$1" -ge 124 ] ||
    grep -Eq 'CUDA_ERROR_(ILLEGAL_ADDRESS|MISALIGNED_ADDRESS|LAUNCH_FAILED|ASSERT|HARDWARE_STACK_ERROR|ILLEGAL_INSTRUCTION|INVALID_ADDRESS_SPACE|INVALID_PC|LAUNCH_TIMEOUT|ECC_UNCORRECTABLE)([^A-Z_]|$)' \
      "$OUT/$2.log" 2>/dev/null; }
}
# The levers no GPU had run when they were written (sessions 12 to 16; an H200 first ran them, and
# passed them, in session 19's run `19a`), which a stage that died turns off for the stages after,
# for a card or a change they may fault on; GELU's backward in the epilogue goes with the
# cuBLASLt products.
UNMEASURED=(RECYCLE_CUBLASLT=0 RECYCLE_HEADS_IN_PLACE=0 RECYCLE_EMBEDDINGS_SUM=0 RECYCLE_ADD_NORM=0 RECYCLE_STACK=0)
# unmeasured_off_after RC NAME WHAT: where stage NAME (WHAT: its process) died, UNMEASURED for
# every stage after (once).
unmeasured_off=
unmeasured_off_after() {
  if [ -z "$unmeasured_off" ] && died "$1" "$2"; then
    export "${UNMEASURED[@]}"
    unmeasured_off=1
    log "$2: $3 died (exit $1): ${UNMEASURED[*]} for the stages after"
  fi
}
RECYCLE=(env "LD_LIBRARY_PATH=$CUDA_LIBS" "$BIN")
# The device tool brings back a limited number of files: everything also travels as one archive.
bundle() { (cd "$OUT" && tar czf all.tgz ./*.jsonl ./*.log ./*.txt ./*.raw.gz 2>/dev/null); }

# ONLY=ops: the op-by-op profile alone (both precisions at the main batch, bf16 at 4x), a short
# call for chasing a slow phase.
if [ "${ONLY:-}" = ops ]; then
  stage ops 150 "$OUT/recycle-ops.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
    --skip-parity --matmul 0 --shapes "" "${SHAPE[@]}" --batch "$B"
  stage ops-b128 100 "$OUT/recycle-ops-b128.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
    --skip-parity --matmul 0 --shapes "" --precisions bf16 "${SHAPE[@]}" --batch $(( 4 * B ))
  "$PY" scripts/gpu/summarize.py "$OUT"/recycle-ops*.jsonl | tee -a "$REPORT"
  bundle
  exit 0
fi

# Sessions 12 to 16's levers (UNMEASURED) had not run on a GPU when this was written. gpu-check
# turns a lever off for its run when its check fails, but a kernel fault loses the process's CUDA
# context: a short run of the checks alone first, and if that process dies (`died`), all of them
# off for every stage after, so that the measurements still come back; the same if the main stage
# dies.
stage preflight 60 "$OUT/preflight.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
  "${SHAPE[@]}" --batch "$B" --shapes "" --matmul 0 --skip-ops --flash false
prc=$?
unmeasured_off_after $prc preflight "the checks' process"
# One-pass attention (session 9, not yet run on a GPU) stays out of the main stage: a kernel fault
# ends the process that hit it. It runs, checked first, in the stages after.
stage recycle 300 "$OUT/recycle.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" "${SIZE[@]}" --flash false
rc=$?
unmeasured_off_after $rc recycle "the process"
# A lever that failed its check in those stages (the cuBLASLt products, GELU's backward in their
# epilogue, the one-pass tail, attention's heads in place) is off for the rest of that process,
# with a note naming its switch; the stages after skip the checks, so the switch goes to them.
notes=()
for f in "$OUT/preflight.jsonl" "$OUT/recycle.jsonl"; do
  [ -f "$f" ] && notes+=("$f")
done
failed=
[ ${#notes[@]} -gt 0 ] && failed=$("${RECYCLE[@]}" gpu-levers --failed "${notes[@]}" 2>>"$REPORT")
for a in $failed; do
  export "${a?}"
  log "$a for the stages after: that lever failed its check (the notes say which)"
done
# One-pass attention at the main batch: its parity rows, then (where they pass) training with it
# on and off, and with split weight gradients too.
if [ "$DEVICE" = cpu ]; then
  FLASH=(--tiny --batch "$B" --seq 16 --warmup 1 --steps 2)
else
  FLASH=(--batch "$B" --seq 128 --warmup 3 --steps 10)
fi
stage recycle-flash 60 "$OUT/recycle-flash.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
  --skip-parity --skip-ops --matmul 0 --shapes roberta-base --precisions bf16 "${FLASH[@]}"
# Where that process died (`died`: a kernel fault loses its context), the batch 128 and 256
# stages leave one-pass attention out (`--flash false`), or the same fault would take their rows.
frc=$?
NOFLASH=()
if died $frc recycle-flash; then
  NOFLASH=(--flash false)
  log "recycle-flash: the process died (exit $frc): one-pass attention left out of the later stages"
fi

# Extra, if time is left: roberta-base bf16 training at 4x the batch, where the matmuls are larger
# (does the MFU gap close with size, or is it per-op overhead?); then the main job in bf16.
if [ "$DEVICE" = cpu ]; then
  BIG=(--tiny --batch 16 --seq 16 --warmup 1 --steps 2)
else
  BIG=(--batch 128 --seq 128 --warmup 2 --steps 5)
fi
if [ "$(left)" -gt 90 ]; then
  stage recycle-b128 60 "$OUT/recycle-b128.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
    --skip-parity --matmul 0 --shapes roberta-base --precisions bf16 "${NOFLASH[@]}" "${BIG[@]}"
fi
# Then batch 256, the study's own batch size (its protocol: batch 256), training only (no op
# profile): the issue's MFU target names no batch.
if [ "$DEVICE" = cpu ]; then
  HUGE=(--tiny --batch 32 --seq 16 --warmup 1 --steps 2)
else
  HUGE=(--batch 256 --seq 128 --warmup 2 --steps 4)
fi
if [ "$(left)" -gt 75 ]; then
  stage recycle-b256 50 "$OUT/recycle-b256.jsonl" "${RECYCLE[@]}" gpu-check --device "$DEVICE" \
    --skip-parity --skip-ops --matmul 0 --shapes roberta-base --precisions bf16 "${NOFLASH[@]}" \
    "${HUGE[@]}"
fi
# The best measured configuration (session 17): the switches that the A/B rows at batches 128
# and 256 say to flip (`recycle gpu-levers`: a default changes only where every such batch agrees
# by more than 1 %; GELU's backward in the epilogue must save 1 %), then training alone at both
# batches with them, so that one call measures the levers together, not only each against the
# defaults. Its rows say "config": "best" and which levers were on. LEVERS="VAR=value ..." sets
# the choice instead (a rerun of a chosen set; the CPU check of this control flow).
if [ -n "${LEVERS:-}" ]; then
  best=$LEVERS
  log "levers: as LEVERS sets them: $best"
else
  ab_files=()
  for f in "$OUT/recycle-b128.jsonl" "$OUT/recycle-b256.jsonl"; do
    [ -s "$f" ] && ab_files+=("$f")
  done
  best=
  if [ ${#ab_files[@]} -gt 0 ]; then
    best=$("${RECYCLE[@]}" gpu-levers "${ab_files[@]}" 2>"$OUT/gpu-levers.log")
    cat "$OUT/gpu-levers.log" >>"$REPORT"
  fi
  best=${best//$'\n'/ }
  log "levers: the A/B rows' choice: ${best:-the defaults}"
fi
# best_stage NAME ARGS...: training alone with the chosen switches and without them, in
# interleaved rounds in one process (`--levers`), so that their ratio is not a comparison across
# stages; more steps than the A/B stages, since this row is the one held against the target.
# Where the defaults are the choice, the same stage times them alone (`--config defaults`).
if [ -n "$best" ]; then
  CHOSEN=(--config best --levers "${best// /,}")
else
  CHOSEN=(--config defaults)
fi
best_stage() {
  local name=$1
  shift
  stage "recycle-best-$name" 40 "$OUT/recycle-best-$name.jsonl" "${RECYCLE[@]}" gpu-check \
    --device "$DEVICE" --skip-parity --skip-ops --train-only --flash false --matmul 0 \
    --shapes roberta-base --precisions bf16 "${CHOSEN[@]}" "$@"
}
if [ "$(left)" -gt 45 ]; then
  if [ "$DEVICE" = cpu ]; then
    best_stage b256 "${HUGE[@]}"
    best_stage b128 "${BIG[@]}"
  else
    best_stage b256 --batch 256 --seq 128 --warmup 3 --steps 8
    best_stage b128 --batch 128 --seq 128 --warmup 3 --steps 10
  fi
fi
# PyTorch at the main batch (the ratio to eager), then the README's main job: after the MFU
# target's stages above, so that a run short of time loses these first (session 12 measured
# both; their figures are the least likely to have moved).
# NO_TORCH=1: recycle's stages only (a shorter call where an earlier run has the PyTorch figures).
trc=0
if [ -z "${NO_TORCH:-}" ]; then
  stage torch 180 "$OUT/torch.jsonl" env PYTHONUNBUFFERED=1 "$PY" scripts/gpu/torch_gpu_bench.py --device "$DEVICE" "${SIZE[@]}"
  trc=$?
fi

# The README's main job on the device: the embedded default suite (quick profile) over random
# all-MiniLM-L6-v2-shaped weights (scripts/gpu/stage-e2e.sh), timed; then the same command again,
# which must resume to "nothing to do" and print the same leaderboard.
erc=0
e2e_ready=0
if [ -f dist/e2e/default-random.json ]; then
  E=/tmp/recycle-e2e
  rm -rf "$E" && cp -r dist/e2e "$E"
  if "$PY" scripts/gpu/random_weights.py "$E/home/models/random-all-MiniLM-L6-v2"; then
    e2e_ready=1
    E2E=(env "RECYCLE_HOME=$E/home" "${RECYCLE[@]}" run "$E/default-random.json" --profile quick --device "$DEVICE")
    stage e2e 200 "$OUT/e2e.txt" "${E2E[@]}" --results "$E/res"
    erc=$?
    if [ $erc -eq 0 ]; then
      stage e2e-resume 40 "$OUT/e2e-resume.txt" "${E2E[@]}" --results "$E/res"
      erc=$?
      grep -h "job\|skip\|resum" "$OUT/e2e-resume.log" | head -5 >>"$REPORT"
      # The same table; only the footer's "generated <time>" may differ.
      if cmp -s <(grep -v generated "$OUT/e2e.txt") <(grep -v generated "$OUT/e2e-resume.txt"); then
        log "e2e-resume: the same leaderboard as the first run"
      else
        log "e2e-resume: the leaderboard DIFFERS from the first run's"
        erc=1
      fi
      cat "$OUT/e2e.txt" >>"$REPORT"
    fi
  else
    log "e2e: could not write random weights"
    erc=1
  fi
else
  log "e2e: no dist/e2e (run scripts/gpu/stage-e2e.sh and carry dist/e2e)"
fi

# PyTorch at batches 128 and 256, after the chosen levers (the PyTorch side of these rows has
# not changed since session 12 measured them), each only while the budget has room.
if [ -z "${NO_TORCH:-}" ]; then
  for b in b128 b256; do
    if [ $b = b128 ]; then size=("${BIG[@]}"); else size=("${HUGE[@]}"); fi
    [ -s "$OUT/recycle-$b.jsonl" ] && [ "$(left)" -gt 40 ] &&
      stage "torch-$b" 50 "$OUT/torch-$b.jsonl" env PYTHONUNBUFFERED=1 "$PY" scripts/gpu/torch_gpu_bench.py \
        --device "$DEVICE" --matmul 0 --shapes roberta-base --precisions bf16 --attn eager "${size[@]}"
  done
fi
if [ $erc -eq 0 ] && [ $e2e_ready -eq 1 ] && [ "$(left)" -gt 60 ]; then
  stage e2e-bf16 100 "$OUT/e2e-bf16.txt" "${E2E[@]}" --results "$E/res-bf16" --precision bf16 &&
    cat "$OUT/e2e-bf16.txt" >>"$REPORT"
fi

"$PY" scripts/gpu/summarize.py "$OUT"/recycle*.jsonl "$OUT"/torch*.jsonl | tee -a "$REPORT"
# The archive now, so that a bench that outlives the device call's timeout still leaves it.
bundle
# WITH_BENCH=1 (on a GPU): then the kernel micro-benchmark and the kernel traces of
# benches/cuda/run.sh (dist/kbench carried; about 60 s past the budget, each part with its own
# timeout), into $OUT/kernel-bench.txt and $OUT/trace-summary.txt. The traces run with the
# chosen levers (what the defaults would become), which their rows' "levers" record.
if [ -n "${WITH_BENCH:-}" ] && [ "$DEVICE" != cpu ]; then
  if [ -x dist/kbench/kernel_bench ]; then
    log "kernel bench and traces (levers: ${best:-the defaults}) ..."
    # shellcheck disable=SC2086
    env $best OUT="$OUT" RECYCLE_BIN="$BIN" PYTHON="$PY" bash benches/cuda/run.sh >"$OUT/kbench.log" 2>&1
    log "kernel bench and traces: exit $?"
  else
    log "no dist/kbench (build it with benches/cuda/run.sh build and carry it)"
  fi
fi
bundle
exit $(( rc != 0 || trc != 0 || erc != 0 ))
