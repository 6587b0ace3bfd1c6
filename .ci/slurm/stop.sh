#!/usr/bin/env bash
# Stops the daemons started by start.sh, by their pid files, and waits (up to 10 s) until they
# have exited so a following start.sh can reuse the ports.
set -u
state=$(realpath -m "${1:?usage: stop.sh STATE_DIR}")
pids=()
for f in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
  if [ -f "$f" ]; then
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null && pids+=("$pid")
  fi
done
for _ in $(seq 1 40); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && exit 0
  sleep 0.25
done
echo "stop.sh: daemons still running after 10 s: ${pids[*]}" >&2
exit 0
