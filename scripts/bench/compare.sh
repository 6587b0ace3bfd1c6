#!/usr/bin/env bash
# Runs the Rust benches (benches/train_step.rs, benches/inference.rs) and their PyTorch peer
# (scripts/bench/torch_bench.py) alternately, ROUNDS times, and prints Rust/PyTorch ratios of each
# figure with min/median/max over the rounds. Alternating spreads the load of a shared machine
# over both sides; the ratios, not the absolute figures, are the result.
#
# Build: cargo's bench profile (the release settings), the build users run. Not the dev profile:
# its dependencies keep debug assertions and overflow checks even at opt-level 3, which cost gemm
# about 2.7x on this machine (docs/performance.md).
#
# usage: scripts/bench/compare.sh [train|infer|all]
# env:   ROUNDS (3), REPS (3; timed batches per figure), PYTHON (/work/venv-ref/bin/python),
#        RECYCLE_BENCH_KERNELS / RECYCLE_BENCH_ALLOC (passed to the Rust benches)
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-all}"
rounds="${ROUNDS:-3}"
reps="${REPS:-3}"
python="${PYTHON:-/work/venv-ref/bin/python}"
export RECYCLE_BENCH_REPS="$reps"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

benches=()
case "$what" in
  train) benches=(train_step) ;;
  infer) benches=(inference) ;;
  all) benches=(train_step inference) ;;
  *) echo "usage: $0 [train|infer|all]" >&2; exit 2 ;;
esac

# Build once, then run the bench binaries directly.
bins=()
for b in "${benches[@]}"; do
  bin=$(cargo bench --no-run --bench "$b" --message-format=json 2>/dev/null \
    | "$python" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["kind"]==["bench"] and m.get("executable"): print(m["executable"])')
  bins+=("$bin")
done

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds (load $(cut -d' ' -f1 /proc/loadavg))"
  # Alternate which side goes first.
  if [ $((r % 2)) -eq 1 ]; then order="rust torch"; else order="torch rust"; fi
  for side in $order; do
    if [ "$side" = rust ]; then
      for bin in "${bins[@]}"; do
        RECYCLE_BENCH_PARTS=main "$bin" | tee -a "$out/rust.$r" | grep -v '^RESULT' | sed 's/^/  rust  /'
      done
    else
      "$python" scripts/bench/torch_bench.py "$what" --reps "$reps" --threads 2 \
        | tee -a "$out/torch.$r" | grep -v '^RESULT' | sed 's/^/  torch /'
    fi
  done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"

PYTHONPATH=scripts/bench "$python" - "$out" "$rounds" <<'PY'
import sys
from results import rounds, spread
out, n = sys.argv[1], int(sys.argv[2])
ratios = {}
for rust, torch in rounds(out, n):
    for k, v in rust.items():
        base = k.replace("_composed", "")
        if base in torch and torch[base] > 0:
            ratios.setdefault(k, []).append(v / torch[base])
print(f"{'figure':<28} {'rust/torch min':>14} {'median':>8} {'max':>8}   (n={n})")
for k, v in sorted(ratios.items()):
    note = "  (lower is better)" if "rss" in k else ""
    lo, mid, hi = spread(v)
    print(f"{k:<28} {lo:>14.2f} {mid:>8.2f} {hi:>8.2f}{note}")
PY
