#!/usr/bin/env bash
# Runs the selection study of configs/select.json (issue 7) end to end and analyses it:
# donors -> merges of donors ->
# probes of every model on the probe task -> every candidate x target fine-tune -> `recycle analyze`
# and `recycle rank` -> a ColD Fusion round, probed and analysed with the rest.
# Resumable: each recycle step skips finished jobs, merges skip an existing output.
#
#   RECYCLE_HOME=/work/home scripts/select-run.sh OUT_DIR
#
# Results go to OUT_DIR/results; wall times of each step to OUT_DIR/times.tsv; reports to OUT_DIR.
# Needs the assets of the embedded default suite (`recycle fetch`) and a
# release build (`cargo build --release`; RECYCLE=path overrides the binary).
set -euo pipefail

OUT=${1:?usage: RECYCLE_HOME=DIR scripts/select-run.sh OUT_DIR}
: "${RECYCLE_HOME:?set RECYCLE_HOME to the recycle home holding the embedded assets}"
RECYCLE=${RECYCLE:-target/release/recycle}
SUITE=configs/select.json
SUITE_NAME=select-minilm
ARCH=all-MiniLM-L6-v2
RESULTS=$OUT/results
BASE=$RECYCLE_HOME/models/all-MiniLM-L6-v2
MERGED=$RECYCLE_HOME/merged/$SUITE_NAME
mkdir -p "$RESULTS" "$MERGED"

step() { # step NAME CMD... : runs CMD, appends "NAME<TAB>seconds<TAB>load before" to times.tsv
  local name=$1
  shift
  local load start
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  echo "== $name: $*" >&2
  "$@"
  printf '%s\t%.1f\t%s\n' "$name" "$(echo "$(date +%s.%N) - $start" | bc)" "$load" >>"$OUT/times.tsv"
}

# The checkpoint directory of a trained donor, from its result record.
donor_dir() {
  python3 - "$RESULTS/$SUITE_NAME" "donor/$1" <<'EOF'
import json, pathlib, sys
root, job = pathlib.Path(sys.argv[1]), sys.argv[2]
for f in sorted(root.rglob("*.json")):
    r = json.loads(f.read_text())
    if r.get("job_id") == job and r.get("checkpoint") and not r.get("error"):
        print(r["checkpoint"])
        sys.exit(0)
sys.exit(f"no trained donor record for {job} under {root}")
EOF
}

# Stage 0, the donors, from a copy of the suite without its candidates: they are the merges of
# the donors, which do not exist yet (a suite's path models must exist when it is loaded). Same
# suite name and donor definitions, so the same job ids and config hashes.
python3 - "$SUITE" >"$OUT/select-donors.json" <<'EOF'
import json, sys
suite = json.load(open(sys.argv[1]))
suite.pop("candidates")
suite.pop("fusion")
json.dump(suite, sys.stdout, indent=2)
EOF
DONORS=(from-trec-fine from-sarcasm from-boolq from-bbc-news)
JOBS=()
for d in "${DONORS[@]}"; do JOBS+=(--job "donor/$d"); done
step donors "$RECYCLE" run "$OUT/select-donors.json" --results "$RESULTS" --no-report "${JOBS[@]}"

# Merges of the four one-per-source donors (docs/merging.md).
SOURCES=()
for d in from-trec-fine from-sarcasm from-boolq from-bbc-news; do SOURCES+=("$(donor_dir "$d")"); done
merge() { # merge NAME FLAGS...
  local name=$1
  shift
  if [ -d "$MERGED/$name" ]; then echo "== merge $name: exists, kept" >&2; return; fi
  step "merge-$name" "$RECYCLE" merge "$@" --base "$BASE" "${SOURCES[@]}" --out "$MERGED/$name"
}
merge average --method average
merge task-arithmetic --method task-arithmetic --lambda 0.5
merge ties --method ties --density 0.2
merge dare-ties --method dare-ties --drop-rate 0.9 --seed 0

# Probes first (cheap, and the proxies analyze needs): every model of the suite on the probe task.
PROBE_TASKS=${PROBE_TASKS:-disaster-tweets}
probe_all() {
  for ds in $PROBE_TASKS; do
    step "probe-$ds" "$RECYCLE" probe --suite "$SUITE" --results "$RESULTS" \
      --dataset "$RECYCLE_HOME/datasets/$ds" --name "${ds//-/_}_lp" --max-train 500 --max-eval 300
  done
}
probe_all
# The fine-tunes, one target at a time (the least saturated first), so that a run cut short
# leaves complete columns for the analysis; then every job left (none, normally).
for t in disaster-tweets trec-coarse sms-spam; do
  mapfile -t JOBS < <("$RECYCLE" plan "$SUITE" --results "$RESULTS" | awk -v t="/$t/" '$3 ~ t {print "--job"; print $3}')
  step "evaluations-$t" "$RECYCLE" run "$SUITE" --results "$RESULTS" --no-report "${JOBS[@]}"
done
step evaluations "$RECYCLE" run "$SUITE" --results "$RESULTS" --no-report
analyze() {
  step analyze "$RECYCLE" analyze --results "$RESULTS" --arch "$ARCH" --holdout leave-one-out \
    --out "$OUT/analyze.md"
  "$RECYCLE" analyze --results "$RESULTS" --arch "$ARCH" --holdout leave-one-out --format json \
    --out "$OUT/analyze.json"
  "$RECYCLE" rank --results "$RESULTS" --arch "$ARCH" >"$OUT/leaderboard.md"
}
analyze
# ColD Fusion last: its fused base joins the probes (the others' features are cached) and the analysis.
if [ "${FUSION:-1}" = 1 ]; then
  step fusion "$RECYCLE" fuse "$SUITE" --results "$RESULTS"
  probe_all
  analyze
fi
echo "done: $OUT/analyze.md, $OUT/leaderboard.md, $OUT/times.tsv" >&2
