#!/usr/bin/env bash
# Stops the daemons started by start.sh, by their pid files.
set -u
state=$(realpath -m "${1:?usage: stop.sh STATE_DIR}")
for pid in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
  [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
exit 0
