#!/usr/bin/env bash
# Issue 6's end-to-end figure: one (model, target) cell of the embedded default suite — the
# baseline MiniLM-L6 fine-tuned on a target for every baseline seed, dev after every epoch, early
# stopping, test score — by `recycle run` and by its PyTorch + transformers peer
# (scripts/bench/e2e_job.py), alternately, ROUNDS times; prints wall-time ratios (peer / recycle:
# higher means recycle is faster) with min/median/max and both sides' test accuracies.
#
# Same data (a prefix of the target's splits written to a scratch dataset, so neither side
# subsamples), same protocol (max length, batch, lr, warm-up, weight decay, epochs, patience, seeds),
# same number of optimiser steps. What differs is what each does with it: the peer pads to the max
# length (transformers' run_glue default; PADDING=dynamic for dynamic padding), recycle pads
# per batch, buckets by length, tokenizes once and evaluates without a graph.
#
# usage: scripts/bench/e2e.sh
# env:   ROUNDS (2), TARGET (disaster-tweets), N_TRAIN (1000), N_EVAL (400), EPOCHS (2), SEEDS (3),
#        PADDING (max_length | dynamic), PYTHON (/work/venv-ref/bin/python), RECYCLE (binary;
#        default: cargo build --release), RECYCLE_HOME (assets from `recycle fetch`)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${ROUNDS:-2}"
target="${TARGET:-disaster-tweets}"
n_train="${N_TRAIN:-1000}"
n_eval="${N_EVAL:-400}"
epochs="${EPOCHS:-2}"
seeds="${SEEDS:-3}"
padding="${PADDING:-max_length}"
python="${PYTHON:-/work/venv-ref/bin/python}"
home="${RECYCLE_HOME:?set RECYCLE_HOME to the directory recycle fetch filled}"
model="$home/models/all-MiniLM-L6-v2"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
if [ -z "${RECYCLE:-}" ]; then
  cargo build --release --quiet
  RECYCLE=target/release/recycle
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# A capped copy of the target dataset, card updated (row counts, sha256).
"$python" - "$home/datasets/$target" "$out/data" "$n_train" "$n_eval" <<'PY'
import hashlib, json, os, sys
src, dst, n_train, n_eval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.makedirs(dst)
card = json.load(open(os.path.join(src, "dataset.json")))
for s in card["splits"]:
    n = n_train if s["name"] == "train" else n_eval
    lines = open(os.path.join(src, s["file"]), "rb").read().splitlines(keepends=True)[:n]
    data = b"".join(lines)
    open(os.path.join(dst, s["file"]), "wb").write(data)
    s["rows"], s["sha256"] = len(lines), hashlib.sha256(data).hexdigest()
json.dump(card, open(os.path.join(dst, "dataset.json"), "w"), indent=2)
PY

cat > "$out/suite.json" <<EOF
{
  "name": "e2e-bench",
  "arch": "all-MiniLM-L6-v2",
  "baseline": { "name": "all-MiniLM-L6-v2", "path": "$model" },
  "targets": [ { "name": "$target", "dataset": { "path": "$out/data" }, "metric": "accuracy" } ],
  "protocol": { "max_length": 128, "learning_rate": 0.0001, "batch_size": 32, "micro_batch_size": 32,
                "max_epochs": $epochs, "patience": 1, "warmup_ratio": 0.006, "weight_decay": 0.01 },
  "seeds": { "baseline": $seeds, "candidates": 1 }
}
EOF

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "job: $target, $n_train train / $n_eval dev / $n_eval test, $epochs epochs, $seeds seeds, batch 32, max length 128; peer padding: $padding"
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds (load $(cut -d' ' -f1 /proc/loadavg))"
  if [ $((r % 2)) -eq 1 ]; then order="rust torch"; else order="torch rust"; fi
  for side in $order; do
    if [ "$side" = rust ]; then
      rm -rf "$out/results"
      t0=$(date +%s.%N)
      "$RECYCLE" run "$out/suite.json" --results "$out/results" --device cpu --no-report >"$out/rust.log" 2>&1 \
        || { cat "$out/rust.log"; exit 1; }
      t1=$(date +%s.%N)
      echo "RESULT wall_s $(echo "$t1 - $t0" | bc)" > "$out/rust.$r"
      "$python" - "$out/results" >>"$out/rust.$r" <<'PY'
import glob, json, sys
for p in sorted(glob.glob(f"{sys.argv[1]}/**/*.json", recursive=True)):
    d = json.load(open(p))
    if isinstance(d, dict) and d.get("test_score") is not None:
        print(f"RESULT seed{d.get('seed')}_test {d['test_score']:.6f}")
PY
    else
      "$python" scripts/bench/e2e_job.py --model "$model" --dataset "$out/data" --seeds "$seeds" \
        --epochs "$epochs" --patience 1 --padding "$padding" > "$out/torch.$r" 2>"$out/torch.err" \
        || { cat "$out/torch.err"; exit 1; }
    fi
    sed "s/^/  $side /" "$out/$side.$r"
  done
done

PYTHONPATH=scripts/bench "$python" - "$out" "$rounds" <<'PY'
import statistics, sys
from results import rounds, spread
out, n = sys.argv[1], int(sys.argv[2])
ratios, accs = [], {"rust": [], "torch": []}
for rust, torch in rounds(out, n):
    ratios.append(torch["wall_s"] / rust["wall_s"])
    for side, d in (("rust", rust), ("torch", torch)):
        accs[side] += [v for k, v in d.items() if k.endswith("_test")]
lo, mid, hi = spread(ratios)
print(f"wall time peer / recycle: min {lo:.2f}  median {mid:.2f}  max {hi:.2f}  (n={n}; target >= 3)")
for side, a in accs.items():
    if a:
        print(f"test accuracy {side:5}: mean {100*statistics.mean(a):.2f}  sd {100*statistics.pstdev(a):.2f}  (n={len(a)})")
PY
