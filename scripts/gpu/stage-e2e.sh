#!/usr/bin/env bash
# Stages, in the ignored dist/e2e/ that the device tool carries, what scripts/gpu/run.sh needs to
# run the README's main job (configs/default.json, quick profile) on a GPU: the five datasets of
# the embedded default and the tokenizer and config files of all-MiniLM-L6-v2 from $RECYCLE_HOME
# (`recycle fetch` puts them there), and a copy of the suite that names the model
# `random-all-MiniLM-L6-v2`. The weights themselves (87 MiB) exceed the carry limit; run.sh writes
# random ones of the same shape there with transformers, so that stage times the job, not scores.
# Usage: scripts/gpu/stage-e2e.sh     (env: RECYCLE_HOME)
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_IN=${RECYCLE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/recycle}
OUT=dist/e2e
rm -rf "$OUT"
mkdir -p "$OUT/home/datasets" "$OUT/home/models/random-all-MiniLM-L6-v2"
for d in trec-coarse sms-spam disaster-tweets trec-fine sarcasm-headlines; do
  [ -f "$HOME_IN/datasets/$d/dataset.json" ] || {
    echo "stage-e2e: $HOME_IN/datasets/$d is missing (run: recycle fetch)" >&2
    exit 1
  }
  cp -r "$HOME_IN/datasets/$d" "$OUT/home/datasets/"
done
model=$HOME_IN/models/all-MiniLM-L6-v2
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$model/$f" "$OUT/home/models/random-all-MiniLM-L6-v2/"
done
sed 's#${RECYCLE_HOME}/models/all-MiniLM-L6-v2#${RECYCLE_HOME}/models/random-all-MiniLM-L6-v2#' \
  configs/default.json >"$OUT/default-random.json"
grep -q random-all-MiniLM "$OUT/default-random.json"
du -sh "$OUT" >&2
